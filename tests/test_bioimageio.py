"""bioimage.io packages of the shipped models pass bioimageio.core's own test and compute
what cellnest computes."""

from __future__ import annotations

import numpy as np
import pytest

from cellnest.cli import main

pytest.importorskip("bioimageio.core")


@pytest.mark.parametrize("name", ["attn-unetpp", "re-unet"])
def test_shipped_model_package_passes_bioimageio_test(name, tmp_path):
    from bioimageio.core import test_description

    from cellnest.models import load_segmenter

    out = tmp_path / name
    assert main(["-q", "export-bioimageio", name, "--out", str(out)]) == 0
    summary = test_description(str(out / "rdf.yaml"))
    failed = [d.name for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    tested = {d.loc[1] for d in summary.details if d.name.startswith("Reproduce test outputs") and d.status == "passed"}
    assert {"torchscript", "onnx", "pytorch_state_dict"} <= tested, tested
    # The package's probabilities are cellnest's own network output on the same scaled input.
    raw, packaged = np.load(out / "test_input.npy"), np.load(out / "test_output.npy")
    lo, hi = np.percentile(raw, 1, axis=(2, 3), keepdims=True), np.percentile(raw, 99, axis=(2, 3), keepdims=True)
    scaled = ((raw - lo) / (hi - lo + 1e-6)).astype(np.float32)[0]
    ours = load_segmenter(name, device="cpu", backend="torch").predictor(scaled)
    np.testing.assert_allclose(packaged[0], ours, atol=1e-4)
    assert main(["-q", "export-bioimageio", name, "--out", str(out)]) == 2  # never replaces a package silently
