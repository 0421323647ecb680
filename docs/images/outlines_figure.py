"""Make docs/images/outlines.png: the GeoJSON (QuPath) and ROI-set (Fiji) outlines that
`cellnest segment --geojson --rois` wrote for a demo image, drawn back over it from the
files themselves (QuPath and Fiji are not installed here).

    .venv/bin/python docs/images/outlines_figure.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import roifile

from cellnest.export import new_figure, write_figure
from cellnest.io import read_image

HERE = Path(__file__).resolve().parent
image_path = HERE.parents[1] / "demo" / "images" / "stained_rgb.png"
with tempfile.TemporaryDirectory() as out:
    subprocess.run([sys.executable, "-m", "cellnest", "-q", "segment", str(image_path), "--out", out, "--geojson", "--rois"],
                   check=True)
    features = json.loads((Path(out) / "stained_rgb_cells.geojson").read_text())["features"]
    rois = roifile.roiread(Path(out) / "stained_rgb_rois.zip")
image = read_image(image_path, dtype=None)
fig, axes = new_figure(1, 2, figsize=(9, 4.9))
for ax, title, rings in ((axes[0, 0], f"GeoJSON for QuPath: {len(features)} detections",
                          [f["geometry"]["coordinates"][0] for f in features]),
                         (axes[0, 1], f"ImageJ ROI set for Fiji: {len(rois)} ROIs", [r.coordinates() for r in rois])):
    ax.imshow(image, extent=(0, image.shape[1], image.shape[0], 0))  # pixel corners at integers, as both tools
    for ring in rings:
        xs, ys = zip(*ring)
        ax.plot(list(xs) + [xs[0]], list(ys) + [ys[0]], color="yellow", linewidth=0.8)
    ax.set(title=title, xticks=[], yticks=[])
write_figure(HERE / "outlines.png", fig)
