"""The napari plugin (manifest: ``cellnest/napari.yaml``): a dock widget that segments
the selected image layer, and a reader for cellnest's label maps.

Install with ``pip install -c constraints.txt -e '.[napari]'``; napari then lists
*Plugins > cellnest > Segment cells*, and ``napari OUT/x_label.tiff`` opens a cellnest
output as a Labels layer. The widget runs the same pipeline as ``cellnest segment``
(cell-size rescaling, blocks, the model's post-processing) in a worker thread, so napari
stays responsive, and adds ``<image> cells`` as a Labels layer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QLabel, QProgressBar, QPushButton, QSpinBox,
                            QVBoxLayout, QWidget)

from cellnest.catalog import DEFAULT_MODEL, available_models

LABEL_SUFFIXES = ("_label.tiff", "_label.tif")


def layer_image(data: np.ndarray, rgb: bool) -> np.ndarray:
    """A napari image layer's data -> the (H, W, 3) image cellnest segments, by the rule
    files follow (:func:`cellnest.io.three_channels`); a stack is refused with a message."""
    from cellnest.io import three_channels

    data = np.asarray(data)
    if data.ndim == 2 or (data.ndim == 3 and (rgb or data.shape[-1] <= 4)):
        return three_channels(data, view=True)
    raise ValueError(f"cellnest segments 2-D images; this layer has shape {data.shape}")


class SegmentWidget(QWidget):
    """Segment the chosen image layer with a cellnest model.

    Options: the model (``cellnest models``), the cell diameter (the model's default,
    ``auto``, ``native`` or pixels), the window tile (0 = the model's) and flip TTA, as on
    the command line.
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.layer = QComboBox()
        self.model = QComboBox()
        self.model.addItems(available_models())
        self.model.setCurrentText(DEFAULT_MODEL)
        self.diameter = QComboBox()
        self.diameter.setEditable(True)  # the model's default, auto, native, or a number of pixels
        self.diameter.addItems(["model's default", "auto", "native"])
        self.tile = QSpinBox()
        self.tile.setRange(0, 8192)
        self.tile.setSingleStep(64)
        self.tile.setSpecialValueText("model's")
        self.tta = QCheckBox("flip test-time augmentation (4x slower)")
        self.run_button = QPushButton("Segment")
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        for label, field in (("image", self.layer), ("model", self.model), ("cell diameter", self.diameter), ("tile", self.tile)):
            form.addRow(label, field)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for widget in (self.tta, self.run_button, self.progress, self.status):
            layout.addWidget(widget)
        layout.addStretch()
        self.run_button.clicked.connect(self.run)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self.worker = None

    def _refresh_layers(self, *_) -> None:
        from napari.layers import Image

        current = self.layer.currentText()
        self.layer.clear()
        self.layer.addItems([layer.name for layer in self.viewer.layers if isinstance(layer, Image)])
        if current:
            self.layer.setCurrentText(current)

    def options(self) -> dict:
        """The widget's choices as :func:`cellnest.models.load_segmenter` arguments."""
        from cellnest.cli import parse_diameter

        text = self.diameter.currentText().strip()
        # as the command line without --diameter, else argparse's own check: 'auto', 'native' or pixels > 0
        diameter = None if text in ("", "model's default") else parse_diameter(text)
        predictor = {k: v for k, v in (("tile", self.tile.value() or None), ("tta", self.tta.isChecked() or None)) if v}
        return {"models": self.model.currentText(), "diameter": diameter, "predictor": predictor}

    def run(self) -> None:
        """Segment in a worker thread; the result arrives in :meth:`_add_labels`."""
        from napari.qt.threading import create_worker

        name = self.layer.currentText()
        if not name:
            self.status.setText("open an image first")
            return
        layer = self.viewer.layers[name]
        try:
            image, options = layer_image(layer.data, layer.rgb), self.options()
        except Exception as err:  # a stack layer, or a diameter that is not one
            self.status.setText(f"cannot segment: {err}")
            return
        self.run_button.setEnabled(False)
        self.progress.setRange(0, 0)  # busy: the pipeline reports no fraction
        self.progress.setVisible(True)
        self.status.setText(f"segmenting {name} with {options['models']}...")
        self.worker = create_worker(segment_layer, image, options, _start_thread=False)
        self.worker.returned.connect(lambda result: self._add_labels(name, layer, *result))
        self.worker.errored.connect(self._failed)
        self.worker.finished.connect(self._done)
        self.worker.start()

    def _add_labels(self, name: str, layer, labels: np.ndarray, note: str) -> None:
        self.viewer.add_labels(labels, name=f"{name} cells", scale=layer.scale[-2:], translate=layer.translate[-2:])
        self.status.setText(note)

    def _failed(self, err: Exception) -> None:
        self.status.setText(f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}")

    def _done(self) -> None:
        self.progress.setVisible(False)
        self.run_button.setEnabled(True)


def segment_layer(image: np.ndarray, options: dict) -> tuple[np.ndarray, str]:
    """Segment an (H, W, C) image as ``cellnest segment`` would -> (labels, a one-line note)."""
    from cellnest.models import load_segmenter

    start = time.perf_counter()
    segmenter = load_segmenter(options["models"], device="auto", predictor=options["predictor"] or None,
                               diameter=options["diameter"])
    labels, size = segmenter.run(image)
    cells = int(len(np.unique(labels)) - (labels.min() == 0))
    sized = f", cell diameter {size.diameter:.1f} px (x{size.scale:.2f})" if size.diameter else ""
    return labels, f"{cells} cells in {time.perf_counter() - start:.1f} s ({segmenter.name}{sized})"


def get_reader(path: str | list[str]) -> Callable | None:
    """npe2 reader: cellnest label maps (``*_label.tiff``) open as Labels layers."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(str(p).lower().endswith(LABEL_SUFFIXES) for p in paths):
        return None
    return read_label_layers


LAZY_PIXELS = 64 * 2**20  # larger label maps (the tiled BigTIFFs of --cluster) are read tile by tile as napari draws


def read_label_layers(path: str | list[str]) -> list[tuple]:
    import tifffile

    from cellnest.io import read_labels

    layers = []
    for p in [path] if isinstance(path, str) else list(path):
        with tifffile.TiffFile(p) as tif:
            height, width = tif.series[0].shape[-2:]
        if height * width > LAZY_PIXELS:
            import zarr

            data = zarr.open(tifffile.imread(p, aszarr=True), mode="r")
        else:
            data = read_labels(p)
        layers.append((data, {"name": Path(p).name.removesuffix(".tiff").removesuffix(".tif")}, "labels"))
    return layers
