"""``python -m cellnest`` (also the entry point torchrun launches)."""

from cellnest.cli import main

raise SystemExit(main())
