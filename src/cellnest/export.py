"""What other tools read: per-cell measurements (CSV), cell outlines as GeoJSON for QuPath
and as an ImageJ ROI set for Fiji, overlays and figures.

Measurements come from scikit-image ``regionprops_table`` (its column names); outlines
from ``find_contours`` on each cell's mask. Outline coordinates are ``[x, y]`` =
``[column, row]`` with pixel corners at integers, as QuPath and ImageJ place them (pixel
(r, c) covers [c, c+1] x [r, r+1]), so filling an outline gives back exactly the cell's
pixels. In GeoJSON each cell is a ``Feature`` with a closed ``Polygon`` and the
properties QuPath reads on import (``objectType: "detection"``, ``name``) plus the
cell's label id; in the ROI set (``roifile``) each is a polygon named ``cell-<label>``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import find_contours, regionprops_table
from skimage.segmentation import find_boundaries

from cellnest.io import atomic_write, write_csv
from cellnest.normalize import normalize_image

MEASUREMENTS = ("label", "area", "centroid", "bbox", "eccentricity", "intensity_mean")


def overlay_outlines(image: np.ndarray, labels: np.ndarray, color: tuple[int, int, int] = (255, 255, 0)) -> np.ndarray:
    """Cell outlines drawn over the normalised image.

    Parameters
    ----------
    image : (H, W, 3) raw intensities. labels : (H, W) instance map.

    Returns
    -------
    (H, W, 3) uint8 picture.
    """
    picture = (normalize_image(image) * 255).astype(np.uint8)
    picture[find_boundaries(labels, mode="inner")] = color
    return picture


def measure_cells(labels: np.ndarray, image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-cell measurements.

    Parameters
    ----------
    labels : (H, W) integer instance map.
    image : optional (H, W, C) intensities for ``intensity_mean-<c>`` columns.

    Returns
    -------
    Column name -> (N,) array: ``label, area, centroid-0 (row), centroid-1 (col),
    bbox-0..3 (min row, min col, max row, max col), eccentricity, intensity_mean-<c>``.
    """
    properties = [p for p in MEASUREMENTS if image is not None or p != "intensity_mean"]
    return regionprops_table(labels, intensity_image=image, properties=properties)


def new_figure(rows: int, columns: int, figsize: tuple[float, float]):
    """``(figure, axes)`` from matplotlib's file-only backend (no display needed); axes is
    a (rows, columns) array. Save it with :func:`write_figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=figsize, squeeze=False)


def write_figure(path: str | os.PathLike, figure) -> Path:
    """Save a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def write_measurements(path: str | os.PathLike, table: dict[str, np.ndarray]) -> Path:
    """Write a :func:`measure_cells` table as CSV, atomically."""
    columns = list(table)
    rows = [{c: f"{v:.6g}" if isinstance(v, (float, np.floating)) else v for c, v in zip(columns, values)}
            for values in zip(*(table[c] for c in columns))]
    return write_csv(path, rows, columns)


def cell_polygons(labels: np.ndarray) -> list[tuple[int, list[list[float]]]]:
    """Outer outline of each cell as a closed ``[[x, y], ...]`` ring (pixel corners at
    integers: the 0.5 iso-line between the cell's pixel centres and its neighbours').

    Returns ``(label, ring)`` pairs in label order. For a cell in several pieces, the
    largest outline is used; a hole in a cell (another cell inside it) is not outlined.
    """
    polygons = []
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        mask = np.pad(labels[box] == label, 1)  # pad so the contour closes at the crop edge
        contours = find_contours(mask.astype(np.float32), 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        rows = ring[:, 0] - 0.5 + box[0].start  # -1 for the pad, +0.5 from centres to corners
        cols = ring[:, 1] - 0.5 + box[1].start
        coords = np.round(np.stack([cols, rows], axis=1), 2).tolist()
        if coords[0] != coords[-1]:
            coords.append(coords[0])
        if len(coords) >= 4:
            polygons.append((label, coords))
    return polygons


def write_geojson(path: str | os.PathLike, labels: np.ndarray, name: str = "cell") -> Path:
    """Write cell outlines as a GeoJSON FeatureCollection that QuPath imports, atomically."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "detection", "name": name, "label": int(label)},
        }
        for label, ring in cell_polygons(labels)
    ]
    text = json.dumps({"type": "FeatureCollection", "features": features})
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_imagej_rois(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write cell outlines as an ImageJ ROI set (``.zip``) that Fiji's ROI Manager opens,
    atomically; one polygon ROI per cell, named ``cell-<label>``."""
    import roifile

    rois = []
    for label, ring in cell_polygons(labels):
        roi = roifile.ImagejRoi.frompoints(np.asarray(ring[:-1], np.float32), name=f"cell-{label}")
        roi.roitype = roifile.ROI_TYPE.POLYGON  # frompoints says freehand; a cell outline is a polygon
        rois.append(roi)
    return atomic_write(path, lambda tmp: roifile.roiwrite(tmp, rois, mode="w") if rois else _empty_zip(tmp))


def _empty_zip(path: Path) -> None:
    import zipfile

    zipfile.ZipFile(path, "w").close()
