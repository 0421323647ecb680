from __future__ import annotations

import csv
import json

import numpy as np

from conftest import disk
from cellnest.export import cell_polygons, measure_cells, write_geojson, write_measurements


def _two_cells():
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 10:30] = 1  # 10 x 20 rectangle
    labels[disk((40, 50), (28, 35), 6)] = 2
    image = np.zeros((40, 50, 3), np.float32)
    image[labels == 1] = [10, 20, 30]
    image[labels == 2] = [1, 2, 3]
    return labels, image


def test_measurements(tmp_path):
    labels, image = _two_cells()
    table = measure_cells(labels, image)
    assert table["label"].tolist() == [1, 2] and table["area"][0] == 200
    assert table["centroid-0"][0] == 9.5 and table["centroid-1"][0] == 19.5
    assert [table[f"bbox-{i}"][0] for i in range(4)] == [5, 10, 15, 30]
    assert table["intensity_mean-2"].tolist() == [30, 3]
    path = write_measurements(tmp_path / "c.csv", table)
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 2 and float(rows[0]["area"]) == 200


def test_geojson_polygons_enclose_the_cells(tmp_path):
    from skimage.draw import polygon as fill_polygon

    labels, _ = _two_cells()
    path = write_geojson(tmp_path / "c.geojson", labels, name="img")
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    feature = data["features"][0]
    assert feature["properties"] == {"objectType": "detection", "name": "img", "label": 1}
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert (ring[0] == ring[-1]).all()
    xs, ys = ring[:, 0], ring[:, 1]  # x = column, y = row
    assert xs.min() >= 9 and xs.max() <= 30 and ys.min() >= 4 and ys.max() <= 15
    # Rasterising the polygon recovers the cell up to the half-pixel contour offset.
    rr, cc = fill_polygon(ys, xs, labels.shape)
    filled = np.zeros(labels.shape, bool)
    filled[rr, cc] = True
    overlap = (filled & (labels == 1)).sum() / (filled | (labels == 1)).sum()
    assert overlap > 0.8
    assert len(cell_polygons(np.zeros((5, 5), np.int32))) == 0
