"""Distributed segmentation: the same cells as one process, whatever the blocks; OME-Zarr
in, labels beside it; a worker killed mid-run costs nothing."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("dask.distributed")
zarr = pytest.importorskip("zarr")

from scipy import ndimage as ndi  # noqa: E402
from skimage.measure import label as label_regions  # noqa: E402

from cellnest.cli import main  # noqa: E402
from cellnest.distributed import segment_distributed  # noqa: E402
from cellnest.io import OutputExistsError  # noqa: E402
from cellnest.models import Segmenter  # noqa: E402
from cellnest.normalize import image_percentiles  # noqa: E402
from cellnest.synthetic import SyntheticSpec, synthetic_cells, to_uint  # noqa: E402


@dataclass
class Threshold(Segmenter):
    """Threshold and connected components: a segmenter whose answer for a pixel depends only
    on the cell around it, so blocks with a halo must reproduce the whole image exactly."""

    name: str = "threshold"
    kill_once: str = ""  # a marker file: the first call that finds it missing kills its worker

    def segment_normalized(self, image, tile=None):
        if self.kill_once and not os.path.exists(self.kill_once):
            Path(self.kill_once).touch()
            os._exit(1)  # a worker lost mid-run, as a node going down
        return ndi.label(image.mean(-1) > 0.5)[0]


@dataclass
class Regions(Segmenter):
    """Regions of equal brightness are cells: two touching cells stay two."""

    name: str = "regions"

    def segment_normalized(self, image, tile=None):
        return label_regions(np.round(image[..., 0] * 4).astype(int), background=0, connectivity=1)


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    with Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)) as c:
        yield c


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, np.ndarray]:
    grey, _ = synthetic_cells(SyntheticSpec(shape=(700, 900), n_cells=150, radius=(6, 16), min_gap=1.0), seed=2)
    path = tmp_path_factory.mktemp("big") / "big.tif"
    tifffile.imwrite(path, to_uint(grey), tile=(128, 128))
    return path, to_uint(grey)


def _whole(segmenter: Segmenter, image: np.ndarray) -> np.ndarray:
    rgb = np.repeat(image[..., None], 3, axis=-1)
    return segmenter.segment_at(rgb, image_percentiles(rgb), 1.0)


def assert_same_cells(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to a permutation of ids: every cell one id, none split, none merged."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    assert ((a > 0) == (b > 0)).all()


@pytest.mark.parametrize("block", [128, 200, 333])
def test_blocks_give_the_cells_of_one_process(big, client, tmp_path, block):
    path, image = big
    segmenter = Threshold(margin=40)
    result = segment_distributed(path, tmp_path, segmenter, client, block=block, diameter=None)
    found = tifffile.imread(result.output)
    whole = _whole(segmenter, image)
    assert result.blocks == -(-700 // block) * -(-900 // block) and result.cells == whole.max() > 100
    assert_same_cells(found, whole)  # cells cut by block faces are joined, each with one id
    assert not list(tmp_path.glob(".cellnest-*"))  # intermediate arrays removed


def test_touching_cells_across_a_face_stay_two(client, tmp_path):
    image = np.full((64, 96), 10, np.uint8)  # blocks of 32: faces at columns 32 and 64
    image[10:50, 12:32] = 100  # ends at the face ...
    image[10:50, 32:52] = 200  # ... where another cell starts: two cells touching across it
    image[20:30, 56:80] = 100  # one cell cut by the face at column 64
    tifffile.imwrite(tmp_path / "t.tif", image)
    segmenter = Regions(margin=16)
    found = tifffile.imread(segment_distributed(tmp_path / "t.tif", tmp_path / "out", segmenter, client, block=32,
                                                diameter=None).output)
    whole = _whole(segmenter, image)
    assert whole.max() == 3
    assert_same_cells(found, whole)


def _ome_zarr(path: Path, image: np.ndarray) -> Path:
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=(1, *image.shape), chunks=(1, 256, 256), dtype=image.dtype)[...] = image[None]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
                                                               {"name": "x", "type": "space"}],
                                   "datasets": [{"path": "0"}]}]
    return path


def test_ome_zarr_gets_its_labels_beside_the_image(big, client, tmp_path):
    path, image = big
    source = _ome_zarr(tmp_path / "img.zarr", image)
    segmenter = Threshold(margin=40)
    result = segment_distributed(source, tmp_path / "out", segmenter, client, block=256, diameter=None)
    assert result.output == source / "labels" / "cellnest"
    labels = zarr.open_group(str(source / "labels"), mode="r")
    assert labels.attrs["labels"] == ["cellnest"]
    cells = zarr.open_group(str(result.output), mode="r")
    assert cells.attrs["image-label"]["source"]["image"] == "../../"
    assert cells.attrs["multiscales"][0]["datasets"][0]["path"] == "0"
    found = np.asarray(cells["0"][...])
    assert cells["0"].chunks == (256, 256)
    assert_same_cells(found, _whole(segmenter, image))
    np.testing.assert_array_equal(zarr.open_array(str(source / "0"))[0], image)  # the image itself untouched
    with pytest.raises(OutputExistsError, match="labels/cellnest: exists"):
        segment_distributed(source, tmp_path / "out", segmenter, client, block=256, diameter=None)


def test_a_worker_killed_mid_run_loses_nothing(big, tmp_path):
    """Process workers; one dies inside a block; dask runs the block again elsewhere."""
    import cloudpickle
    from dask.distributed import Client, LocalCluster

    path, image = big
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests
    try:
        with Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)) as client:
            killer = Threshold(margin=40, kill_once=str(tmp_path / "killed"))
            found = tifffile.imread(segment_distributed(path, tmp_path / "out", killer, client, block=256, diameter=None).output)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "killed").exists()  # a worker did die
    assert_same_cells(found, _whole(Threshold(margin=40), image))


def test_cli_cluster_and_a_folder(big, tmp_path):
    path, _ = big
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "big.tif").write_bytes(path.read_bytes())
    tifffile.imwrite(folder / "small.tif", to_uint(synthetic_cells(SyntheticSpec(shape=(96, 96), n_cells=6), seed=1)[0]))
    out = tmp_path / "out"
    assert main(["-q", "segment", str(folder), "--out", str(out), "--model", "classical", "--cluster", "local:1",
                 "--block", "256"]) == 0
    import csv

    rows = {r["name"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert set(rows) == {"big", "small"} and all(not r["error"] and int(r["cells"]) > 0 for r in rows.values())
    assert tifffile.imread(out / "big_label.tiff").shape == (700, 900)
    assert main(["-q", "segment", str(folder), "--out", str(out), "--model", "classical", "--cluster", "local:1"]) == 2
    assert main(["-q", "segment", str(folder), "--out", str(tmp_path / "o2"), "--cluster", "local:x"]) == 2
