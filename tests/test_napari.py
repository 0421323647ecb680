"""The napari plugin in a headless viewer: the widget segments the selected image layer in
a worker thread and adds a Labels layer; cellnest label maps open as Labels layers.

Needs napari, a Qt binding and an OpenGL display (``make test`` runs the suite under
``xvfb-run`` where Xvfb is installed); without one these tests skip with the reason.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

PROBE = ("from qtpy.QtWidgets import QApplication\napp = QApplication([])\nimport napari, numpy\n"
         "viewer = napari.Viewer(show=False)\nviewer.add_image(numpy.zeros((8, 8)))\n"
         "viewer.screenshot(canvas_only=True)\nviewer.close()\n")  # OpenGL is needed from the first layer


@pytest.fixture(scope="module", autouse=True)
def display():
    """Skip unless a napari viewer can start here (a Qt platform with OpenGL); a crash of
    Qt in a child process costs only that process."""
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"no display for a napari viewer: {(probe.stderr.strip().splitlines() or ['?'])[-1][:200]}")


def _image() -> tuple[np.ndarray, np.ndarray]:
    from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint

    grey, truth = synthetic_cells(SyntheticSpec(shape=(128, 160), n_cells=14, radius=(6, 10), min_gap=1.0), seed=5)
    return to_uint(grey), truth


def test_widget_segments_the_selected_layer(make_napari_viewer, qtbot):
    from cellnest.models import load_segmenter

    viewer = make_napari_viewer()
    grey, _ = _image()
    viewer.add_image(grey, name="cells")
    _, widget = viewer.window.add_plugin_dock_widget("cellnest", "Segment cells")  # found through the npe2 manifest
    assert widget.layer.currentText() == "cells"
    widget.model.setCurrentText("classical")
    # the diameter left at "model's default": the classical model sizes nothing (once an error with "auto")
    widget.run_button.click()
    qtbot.waitUntil(lambda: "cells cells" in viewer.layers, timeout=60_000)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)
    labels = viewer.layers["cells cells"]
    assert type(labels).__name__ == "Labels" and labels.data.shape == grey.shape
    np.testing.assert_array_equal(labels.data, load_segmenter("classical")(grey[..., None]))
    assert widget.status.text().startswith(f"{len(np.unique(labels.data)) - 1} cells in")


def test_widget_runs_the_default_network_and_reports_bad_options(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    grey, truth = _image()
    viewer.add_image(np.stack([grey] * 3, axis=-1), name="rgb", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("cellnest", "Segment cells")
    widget.diameter.setCurrentText("-4")
    widget.run_button.click()
    assert widget.status.text().startswith("cannot segment:") and "rgb cells" not in viewer.layers
    widget.diameter.setCurrentText("auto")
    widget.run_button.click()  # the shipped default model, sized automatically
    qtbot.waitUntil(lambda: "rgb cells" in viewer.layers, timeout=120_000)
    found = viewer.layers["rgb cells"].data
    assert found.shape == grey.shape and abs(len(np.unique(found)) - len(np.unique(truth))) <= 4
    viewer.add_image(grey, name="grey")  # one channel: repeated to three, as files are
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)
    widget.layer.setCurrentText("grey")
    widget.run_button.click()
    qtbot.waitUntil(lambda: "grey cells" in viewer.layers, timeout=120_000)
    np.testing.assert_array_equal(viewer.layers["grey cells"].data, found)


def test_label_maps_open_as_labels_layers(make_napari_viewer, tmp_path):
    from cellnest.io import write_labels

    _, truth = _image()
    path = write_labels(tmp_path / "x_label.tiff", truth)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="cellnest")
    assert len(layers) == 1 and type(layers[0]).__name__ == "Labels" and layers[0].name == "x_label"
    np.testing.assert_array_equal(layers[0].data, truth)


def test_a_huge_label_map_opens_lazily(make_napari_viewer, tmp_path, monkeypatch):
    """A tiled BigTIFF from --cluster is not read whole: napari gets a zarr view of it."""
    import tifffile

    import cellnest.napari_plugin as plugin

    _, truth = _image()
    tifffile.imwrite(tmp_path / "big_label.tiff", truth.astype(np.uint32), tile=(64, 64), bigtiff=True)
    monkeypatch.setattr(plugin, "LAZY_PIXELS", 1000)  # as if it were 20k x 20k
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "big_label.tiff"), plugin="cellnest")
    assert type(layer).__name__ == "Labels" and type(layer.data).__module__.startswith("zarr")
    np.testing.assert_array_equal(np.asarray(layer.data[...]), truth)
