"""cellnest: multi-modality microscopy cell instance segmentation."""

__version__ = "0.1.0"
