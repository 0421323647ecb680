"""Make docs/images/napari.png: napari with the cellnest widget after segmenting a demo image.

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python docs/images/napari_screenshot.py
"""

import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from cellnest.io import read_image

HERE = Path(__file__).resolve().parent
image = read_image(HERE.parents[1] / "demo" / "images" / "fluo_nuclei.png", dtype=None)[..., 0]
viewer = napari.Viewer(show=True)
viewer.window.resize(1300, 800)
viewer.add_image(image, name="fluo_nuclei")
_, widget = viewer.window.add_plugin_dock_widget("cellnest", "Segment cells")
widget.run_button.click()
while "fluo_nuclei cells" not in viewer.layers or not widget.run_button.isEnabled():
    QApplication.processEvents()
    time.sleep(0.05)
viewer.layers["fluo_nuclei cells"].contour = 2  # outlines over the image
viewer.screenshot(str(HERE / "napari.png"), canvas_only=False)
print(widget.status.text())
viewer.close()
