from __future__ import annotations

import csv
import json

import numpy as np
from scipy import ndimage as ndi

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


# -- round trips into the consumers' own formats (issue: checked, not assumed) -----------

def _cells(seed: int = 0) -> np.ndarray:
    from cellnest.synthetic import SyntheticSpec, synthetic_cells

    return synthetic_cells(SyntheticSpec(shape=(160, 192), n_cells=40, radius=(4, 14), min_gap=0.4), seed=seed)[1]


def _fill(ring: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre (c + 0.5, r + 0.5) lies inside a ring given in corner coordinates,
    the rule QuPath and ImageJ rasterise ROIs by."""
    from matplotlib.path import Path as Outline

    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)
    return Outline(ring).contains_points(centres).reshape(shape)


def test_geojson_is_what_qupath_imports(tmp_path):
    """A FeatureCollection of valid, closed Polygon detections whose fill is the cell."""
    from shapely.geometry import shape as geometry

    labels = _cells()
    data = json.loads(write_geojson(tmp_path / "c.geojson", labels, name="img").read_text())
    assert data["type"] == "FeatureCollection"
    ids = [f["properties"]["label"] for f in data["features"]]
    assert sorted(ids) == sorted(np.unique(labels[labels > 0]).tolist())
    for feature in data["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "detection" and feature["properties"]["name"] == "img"
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert len(feature["geometry"]["coordinates"]) == 1 and len(ring) >= 4 and (ring[0] == ring[-1]).all()
        polygon = geometry(feature["geometry"])
        assert polygon.is_valid and polygon.area > 0, feature["properties"]["label"]  # no self-intersections
        cell = ndi.binary_fill_holes(labels == feature["properties"]["label"])  # an outline has no holes
        np.testing.assert_array_equal(_fill(ring, labels.shape), cell)  # filling the outline gives back the cell


def test_label_tiff_is_an_imagej_image_fiji_opens(tmp_path):
    import tifffile

    from cellnest.io import read_labels, write_labels

    labels = _cells()
    path = write_labels(tmp_path / "x_label.tiff", labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej and tif.imagej_metadata["images"] == 1 and tif.series[0].axes == "YX"
        assert tif.pages[0].dtype == np.uint16
        np.testing.assert_array_equal(tif.asarray(), labels)
    many = np.arange(70_000 * 4, dtype=np.int64).reshape(280, 1000) // 4  # > 65,535 ids: ImageJ has no uint32
    with tifffile.TiffFile(write_labels(tmp_path / "many_label.tiff", many)) as tif:
        assert not tif.is_imagej and tif.pages[0].dtype == np.uint32
    np.testing.assert_array_equal(read_labels(tmp_path / "many_label.tiff"), many)


def test_imagej_roi_set_round_trips_through_roifile(tmp_path):
    import roifile

    from cellnest.export import write_imagej_rois

    labels = _cells(seed=3)
    rois = roifile.roiread(write_imagej_rois(tmp_path / "x_rois.zip", labels))
    assert sorted(r.name for r in rois) == sorted(f"cell-{i}" for i in np.unique(labels[labels > 0]))
    for roi in rois:
        assert roi.roitype == roifile.ROI_TYPE.POLYGON
        cell = ndi.binary_fill_holes(labels == int(roi.name.split("-")[1]))
        np.testing.assert_array_equal(_fill(roi.coordinates(), labels.shape), cell)
    assert roifile.roiread(write_imagej_rois(tmp_path / "none.zip", np.zeros((8, 8), np.int32))) == []


def test_measurement_columns_are_regionprops_table_names(tmp_path):
    from skimage.measure import regionprops_table

    from cellnest.export import MEASUREMENTS

    labels, image = _two_cells()
    path = write_measurements(tmp_path / "c.csv", measure_cells(labels, image))
    header = next(csv.reader(open(path)))
    assert header == list(regionprops_table(labels, intensity_image=image, properties=MEASUREMENTS))
