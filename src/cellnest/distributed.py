"""Huge images on a dask.distributed cluster, seamless across blocks; OME-Zarr and big TIFF.

``cellnest segment BIG.tif --cluster local:2`` (a ``LocalCluster``) or ``--scheduler
ADDRESS`` (any running scheduler, e.g. one started by ``dask_jobqueue.SLURMCluster``)
segments an image that never has to fit in memory:

1. The image is opened lazily: an OME-Zarr image (its full-resolution level) or a TIFF
   through tifffile's zarr store, which reads only the tiles or strips asked for.
2. Normalisation bounds come from a regular subsample (at most :data:`SAMPLE_PIXELS`)
   and the cell size from a central crop (``--diameter auto``), once, so every block is
   treated alike.
3. Each block of ``block`` x ``block`` pixels is read with a halo on every side (the
   segmenter's margin: at least four cell diameters at the model's scale, so twice the
   largest cell the model expects) and segmented on a worker, where the model is loaded
   once and kept. A block whose normalised pixels are flat (range below
   :data:`FLAT_RANGE`) is empty and skipped. The worker writes the block's core, its
   cells numbered 1..n, into a chunk-aligned zarr array (no two tasks share a chunk).
   For each face it returns the ids along the core's edge and whether its own
   segmentation continues the cell across the face (halo included).
4. Ids become global (the offset of each block), and a cell cut by a face is joined: an
   edge links the two ids on either side of a face pixel when either block saw the cell
   continue there. ``scipy.sparse.csgraph.connected_components`` of that graph gives
   one id per cell (the approach of Cellpose's ``distributed_segmentation.py``, written
   here for cellnest's halos: continuity, not mere contact, joins ids, so two cells that
   touch at a face stay two).
5. A second pass relabels every chunk into the output: ``labels/cellnest`` inside an
   OME-Zarr input (NGFF 0.4 image-label, chunked; napari with napari-ome-zarr, Fiji's
   MoBIE and BigDataViewer open it), or a tiled BigTIFF ``<name>_label.tiff`` for a TIFF
   input, written tile by tile.

Tasks are retried (``retries``), so a worker lost mid-run costs its tasks, not the run.
The intermediate arrays live in ``OUT/.cellnest-<name>.zarr`` and are removed at the end;
on a cluster of several machines ``--out`` must be on a file system every worker sees.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cellnest.io import TIFF_SUFFIXES, ImageReadError, OutputExistsError, atomic_write, three_channels

log = logging.getLogger(__name__)

SAMPLE_PIXELS = 16 * 2**20  # the normalisation bounds' subsample (pixels)
FLAT_RANGE = 0.05  # a block whose normalised range is below this holds no cells
SIZE_CROP = 2048  # side of the central crop the cell size is estimated on
WHOLE_TIFF_PIXELS = 64 * 2**20  # label maps up to this size are written whole (ImageJ TIFF), larger ones tiled
FACES = ("top", "bottom", "left", "right")


# -- the source image -------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A lazily read 2-D image: a TIFF or an OME-Zarr image's full-resolution array.

    ``axes`` names the array's axes (``y``, ``x``, ``c``; other axes must have size 1).
    """

    path: str
    array_path: str | None  # inside an OME-Zarr group; None for a TIFF; "" for other files (read whole)
    axes: str

    @property
    def zarr_image(self) -> bool:
        return bool(self.array_path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Source":
        path = Path(path)
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                axes = tif.series[0].axes.lower().replace("s", "c")
            return cls(str(path), None, axes)
        if path.is_dir() and path.suffix.lower() == ".zarr":
            import zarr

            group = zarr.open_group(str(path), mode="r")
            multiscales = group.attrs.get("multiscales")
            if not multiscales:
                raise ImageReadError(path, "a zarr group without OME-NGFF 'multiscales' metadata")
            image = multiscales[0]
            axes = "".join(a["name"] if isinstance(a, dict) else a for a in image.get("axes", ["y", "x"])).lower()
            return cls(str(path), image["datasets"][0]["path"], axes)
        if path.is_file():  # PNG, JPEG, BMP: no lazy reader; a worker reads the (small) file whole
            return cls(str(path), "", "yxc")
        raise ImageReadError(path, "not an image file or an OME-Zarr (.zarr) image")

    def array(self):
        """The zarr array (opened on the worker that reads it)."""
        import zarr

        if self.array_path == "":
            from cellnest.io import read_image

            return read_image(self.path, dtype=None)
        if self.array_path is None:
            import tifffile

            return zarr.open(tifffile.imread(self.path, aszarr=True), mode="r")
        return zarr.open_array(str(Path(self.path) / self.array_path), mode="r")

    @functools.cached_property
    def shape(self) -> tuple[int, int]:
        """(height, width), from the header: read once per process (a PNG is decoded for it)."""
        shape = dict(zip(self.axes, self.array().shape))
        return shape["y"], shape["x"]

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels of a region as (h, w, 3), in the file's dtype."""
        index = tuple(rows if a == "y" else cols if a == "x" else slice(None) if a == "c" else 0 for a in self.axes)
        region = np.asarray(self.array()[index])
        kept = [a for a in self.axes if a in "yxc"]
        order = [kept.index(a) for a in "yxc" if a in kept]
        region = np.transpose(region, order)
        if region.ndim == 3 and region.shape[-1] > 4:
            raise ImageReadError(self.path, f"{region.shape[-1]} channels; cellnest segments up to 4")
        return three_channels(region)


# -- the segmenter on the workers -------------------------------------------------------

@dataclass(frozen=True)
class SegmenterSpec:
    """What a worker builds its segmenter from (loaded once per worker process)."""

    models: tuple[str, ...]
    device: str = "cpu"
    backend: str = "auto"
    predictor: tuple[tuple[str, Any], ...] = ()

    def build(self):
        return _build(self)


@functools.lru_cache(maxsize=4)
def _build(spec: SegmenterSpec):
    import torch

    from cellnest.models import load_segmenter

    try:  # on a worker: the network gets the worker's share of the cores, not all of them
        from distributed import get_worker

        torch.set_num_threads(int(os.environ.get("CELLNEST_THREADS") or get_worker().state.nthreads))
    except (ImportError, ValueError):
        pass  # the driver
    log.info("loading %s on this worker", "+".join(spec.models))
    return load_segmenter(list(spec.models), device=spec.device, predictor=dict(spec.predictor) or None,
                          diameter="native", backend=spec.backend)


def _segmenter(segmenter):
    return segmenter.build() if isinstance(segmenter, SegmenterSpec) else segmenter


# -- the two passes ---------------------------------------------------------------------

def block_grid(shape: tuple[int, int], block: int) -> list[tuple[int, int, slice, slice]]:
    """``(i, j, rows, cols)`` of every block core, row by row."""
    return [(i, j, slice(r, min(r + block, shape[0])), slice(c, min(c + block, shape[1])))
            for i, r in enumerate(range(0, shape[0], block)) for j, c in enumerate(range(0, shape[1], block))]


def segment_block(source: Source, rows: slice, cols: slice, halo: int, segmenter, bounds, scale: float,
                  scratch: str) -> tuple[int, dict]:
    """Segment one block with its halo; write its core's cells (1..n) to ``scratch``.

    Returns ``n`` and, per face, ``(ids along the core's edge, continues)`` where
    ``continues`` marks edge pixels whose cell this block also sees just across the face.
    """
    import zarr

    from cellnest.normalize import apply_image_percentiles

    height, width = source.shape
    outer = (slice(max(rows.start - halo, 0), min(rows.stop + halo, height)),
             slice(max(cols.start - halo, 0), min(cols.stop + halo, width)))
    raw = source.read(*outer)
    seg = _segmenter(segmenter)
    # the normalised range from each channel's extremes alone: no normalised copy of the block
    extremes = np.stack([raw.min(axis=(0, 1)), raw.max(axis=(0, 1))])[None]  # (1, 2, C)
    spans = np.diff(apply_image_percentiles(extremes, bounds)[0], axis=0)
    if float(spans.max()) < FLAT_RANGE:
        labels = np.zeros(raw.shape[:2], np.int32)
    else:
        labels = np.asarray(seg.segment_at(raw, bounds, scale), np.int32)
    top, left = rows.start - outer[0].start, cols.start - outer[1].start
    core = labels[top: top + rows.stop - rows.start, left: left + cols.stop - cols.start]
    ids, local = np.unique(core, return_inverse=True)
    local = local.reshape(core.shape).astype(np.uint32)
    if ids[0] != 0:
        local += 1  # no background in this core: ids start at 1
    count = int((ids > 0).sum())
    zarr.open_array(scratch, mode="r+")[rows, cols] = local
    h, w = core.shape
    # the row or column just across each face, where the halo has it
    above = labels[top - 1, left: left + w] if top > 0 else None
    below = labels[top + h, left: left + w] if top + h < labels.shape[0] else None
    before = labels[top: top + h, left - 1] if left > 0 else None
    after = labels[top: top + h, left + w] if left + w < labels.shape[1] else None
    faces = {name: (mine.copy(), np.zeros(mine.shape, bool) if across is None else (edge == across) & (edge > 0))
             for name, edge, across, mine in (("top", core[0], above, local[0]), ("bottom", core[-1], below, local[-1]),
                                              ("left", core[:, 0], before, local[:, 0]),
                                              ("right", core[:, -1], after, local[:, -1]))}
    return count, faces


def join_cells(grid: Sequence[tuple[int, int, slice, slice]], counts: Sequence[int], faces: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """One id per cell across blocks: ``(offsets, mapping)`` where block k's local id ``l``
    becomes ``mapping[offsets[k] + l]`` (0 stays background; ids are 1..cells)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    index = {(i, j): k for k, (i, j, _, _) in enumerate(grid)}
    total = int(np.sum(counts))
    pairs = []
    for k, (i, j, _, _) in enumerate(grid):
        for face, other, other_face in (("right", (i, j + 1), "left"), ("bottom", (i + 1, j), "top")):
            if other not in index:
                continue
            m = index[other]
            a, a_continues = faces[k][face]
            b, b_continues = faces[m][other_face]
            joined = (a > 0) & (b > 0) & (a_continues | b_continues)
            pairs.append(np.stack([offsets[k] + a[joined], offsets[m] + b[joined]], axis=1))
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(total + 1, total + 1))
    _, component = connected_components(graph, directed=False)
    # ids 1..cells in order of each cell's first local id, whatever scipy's numbering
    _, first, inverse = np.unique(component[1:], return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first)) + 1
    mapping = np.concatenate([[0], rank[inverse]]).astype(np.uint32)
    return offsets, mapping


def relabel_block(scratch: str, output: str, rows: slice, cols: slice, mapping: np.ndarray) -> None:
    """Write a block's final ids: ``mapping`` is its slice of the global mapping (index 0 =
    background, then its local ids 1..n)."""
    import zarr

    local = zarr.open_array(scratch, mode="r")[rows, cols]
    zarr.open_array(output, mode="r+")[rows, cols] = mapping[local]


# -- the run ----------------------------------------------------------------------------

def cluster_client(cluster: str | None = None, scheduler: str | None = None):
    """A dask.distributed ``Client``: of a running scheduler (``ADDRESS``), or of a new
    ``LocalCluster`` (``"local"`` or ``"local:N"``: N worker processes, one thread each)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("distributed segmentation needs dask.distributed and zarr: "
                         "pip install -c constraints.txt -e '.[distributed]'") from None
    logging.getLogger("distributed").setLevel(logging.WARNING)  # dask's own INFO chatter is not the user's
    if scheduler:
        return Client(scheduler)
    spec = cluster or "local"
    if not (spec == "local" or (spec.startswith("local:") and spec[6:].isdigit() and int(spec[6:]) >= 1)):
        raise ValueError(f"--cluster {spec!r}: expected local or local:N (N workers)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = int(spec[6:]) if ":" in spec else max(1, cores // 2)
    # one task at a time per worker, its network on the worker's share of the cores
    client = Client(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, silence_logs=logging.ERROR,
                                 env={"CELLNEST_THREADS": str(max(1, cores // workers))}))
    log.info("dask cluster of %d worker(s); dashboard %s", workers, client.dashboard_link)
    return client


@dataclass
class DistributedResult:
    output: Path
    cells: int
    blocks: int
    skipped: int
    diameter: float | None
    scale: float


def segment_distributed(
    path: str | os.PathLike,
    out: str | os.PathLike,
    segmenter,
    client,
    block: int = 2048,
    diameter: float | str | None = "auto",
    overwrite: bool = False,
    retries: int = 2,
    progress: bool = False,
) -> DistributedResult:
    """Segment one huge image on ``client``'s cluster (see the module docstring).

    Parameters
    ----------
    path : a TIFF or OME-Zarr image.
    out : folder for a TIFF input's ``<name>_label.tiff`` and the intermediate arrays.
    segmenter : a :class:`SegmenterSpec` (loaded once per worker) or a picklable
        :class:`cellnest.models.Segmenter`.
    block : core side in image pixels; the zarr chunk side of the output.
    diameter : the cells' diameter in pixels, "auto" (estimated on a central crop) or None
        (native scale).
    """
    import zarr
    from dask.distributed import as_completed

    from cellnest.diameter import scale_for
    from cellnest.normalize import image_percentiles

    source = Source.open(path)
    name = Path(path).name.split(".")[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = Path(path) / "labels" / "cellnest" if source.zarr_image else out / f"{name}_label.tiff"
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: exists; use --overwrite to replace it")
    seg = _segmenter(segmenter)
    height, width = source.shape
    step = max(1, math.ceil(math.sqrt(height * width / SAMPLE_PIXELS)))
    sample = source.read(slice(0, height, step), slice(0, width, step))
    bounds = image_percentiles(sample, seg.lower_percentile, seg.upper_percentile)
    chosen = None if diameter in (None, "native") else diameter
    if chosen == "auto" and seg.cell_diameter:
        r0, c0 = max(0, height // 2 - SIZE_CROP // 2), max(0, width // 2 - SIZE_CROP // 2)
        chosen = seg.estimate_diameter(source.read(slice(r0, r0 + SIZE_CROP), slice(c0, c0 + SIZE_CROP)), bounds)
    elif chosen == "auto":
        chosen = None
    scale = scale_for(seg.cell_diameter, float(chosen)) if chosen and seg.cell_diameter else 1.0
    halo = max(seg.margin, int(math.ceil(4 * seg.cell_diameter / scale))) if seg.cell_diameter else seg.margin
    grid = block_grid((height, width), block)
    log.info("%s: %d x %d in %d blocks of %d px, halo %d px, scale %.3f", path, height, width, len(grid), block, halo, scale)

    scratch = out / f".cellnest-{name}.zarr"
    shutil.rmtree(scratch, ignore_errors=True)
    group = zarr.open_group(str(scratch), mode="w", zarr_format=2)
    group.create_array("local", shape=(height, width), chunks=(block, block), dtype="uint32", fill_value=0)
    try:
        segmenter_future = client.scatter(segmenter, broadcast=True) if not isinstance(segmenter, SegmenterSpec) else segmenter
        from tqdm import tqdm

        def submit(k: int):
            rows, cols = grid[k][2:]
            return client.submit(segment_block, source, rows, cols, halo, segmenter_future, bounds, scale,
                                 str(scratch / "local"), retries=retries, pure=False)

        position = {submit(k): k for k in range(len(grid))}
        results: list = [None] * len(grid)
        resubmitted = 0
        pending = as_completed(list(position))
        bar = tqdm(total=len(grid), desc="blocks", unit="block", disable=not progress)
        for future in pending:
            k = position.pop(future)
            if future.cancelled():
                # a task lost with its worker can come back cancelled rather than retried
                if resubmitted >= retries * len(grid):
                    raise RuntimeError(f"{path}: block {k} was lost {resubmitted} times; the cluster is failing")
                resubmitted += 1
                again = submit(k)
                position[again] = k
                pending.add(again)
                continue
            results[k] = future.result()
            bar.update()
        bar.close()
        counts = [r[0] for r in results]
        offsets, mapping = join_cells(grid, counts, [r[1] for r in results])
        final_path = _label_group(Path(path), target, (height, width), block, overwrite) if source.zarr_image else scratch / "final"
        if not source.zarr_image:
            group.create_array("final", shape=(height, width), chunks=(block, block), dtype="uint32", fill_value=0)
        relabels = [client.submit(relabel_block, str(scratch / "local"), str(final_path), rows, cols,
                                  np.concatenate([[0], mapping[offsets[k] + 1: offsets[k] + counts[k] + 1]]).astype(np.uint32),
                                  retries=retries, pure=False)
                    for k, (_, _, rows, cols) in enumerate(grid)]
        client.gather(relabels)
        if not source.zarr_image:
            _write_label_tiff(target, str(final_path), block)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    skipped = sum(1 for r in results if r is not None and r[0] == 0)
    return DistributedResult(target, int(mapping.max()) if len(mapping) else 0, len(grid), skipped,
                             float(chosen) if chosen else None, scale)


def _label_group(image: Path, target: Path, shape: tuple[int, int], block: int, overwrite: bool) -> Path:
    """Create ``labels/cellnest`` in an OME-Zarr image (NGFF 0.4 image-label, one level)
    and return the path of its array."""
    import zarr

    if target.exists() and overwrite:
        shutil.rmtree(target)
    labels = zarr.open_group(str(image / "labels"), mode="a", zarr_format=2)
    names = list(labels.attrs.get("labels", []))
    if "cellnest" not in names:
        labels.attrs["labels"] = names + ["cellnest"]
    group = zarr.open_group(str(target), mode="w", zarr_format=2)
    group.create_array("0", shape=shape, chunks=(block, block), dtype="uint32", fill_value=0)
    # NGFF 0.4 metadata written as data (the spec's fields; ome-zarr-py's writer needs a
    # pydantic that bioimageio.spec and napari's npe2 cannot share)
    group.attrs["multiscales"] = [{"version": "0.4", "name": "cellnest",
                                   "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}]}]
    group.attrs["image-label"] = {"version": "0.4", "source": {"image": "../../"}}
    return target / "0"


def _write_label_tiff(target: Path, array_path: str, block: int) -> None:
    """The final labels as ``<name>_label.tiff``: up to :data:`WHOLE_TIFF_PIXELS` the usual
    ImageJ TIFF, above it a tiled BigTIFF written tile by tile (bounded memory)."""
    import tifffile
    import zarr

    from cellnest.io import write_labels

    final = zarr.open_array(array_path, mode="r")
    if final.shape[0] * final.shape[1] <= WHOLE_TIFF_PIXELS:
        write_labels(target, np.asarray(final[...]))
        return
    tile = min(block, 1024) // 16 * 16 or 16
    height, width = final.shape

    def tiles():  # row by row, each padded to the full tile (tifffile's contract for iterators)
        for r in range(0, height, tile):
            for c in range(0, width, tile):
                part = np.asarray(final[r: r + tile, c: c + tile])
                yield np.pad(part, ((0, tile - part.shape[0]), (0, tile - part.shape[1])))

    atomic_write(target, lambda tmp: tifffile.imwrite(tmp, tiles(), shape=(height, width), dtype=np.uint32, tile=(tile, tile),
                                                      compression="zlib", bigtiff=True))


def segment_inputs(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, segmenter, client, block: int = 2048,
                   diameter: float | str | None = "auto", overwrite: bool = False, progress: bool = True) -> list:
    """Every input (files, folders, globs, OME-Zarr images) on the cluster, into ``out``
    with a ``summary.csv`` as ``cellnest segment`` writes. Images run concurrently, one
    driver thread per worker, so a folder of small images (one block each) keeps every
    worker busy, as the blocks of one huge image do. Returns one
    :class:`cellnest.segment.ImageResult` per input, in input order."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from cellnest.io import folder_lock, refuse_existing
    from cellnest.segment import ImageResult, expand_inputs, write_summary

    out = Path(out)
    images = [Path(i) for i in inputs if Path(i).is_dir() and Path(i).suffix.lower() == ".zarr"]
    rest = [i for i in inputs if Path(i) not in images]
    paths, results = expand_inputs(rest) if rest else ([], [])
    paths = list(paths) + images
    if not overwrite:
        refuse_existing([out / "summary.csv"])
    name = _segmenter(segmenter).name

    def one(path: Path) -> ImageResult:
        result = ImageResult(str(path), path.name.split(".")[0], model=name)
        start = time.perf_counter()
        try:
            done = segment_distributed(path, out, segmenter, client, block, diameter, overwrite, progress=progress and len(paths) == 1)
            result.cells, result.output, result.scale = done.cells, str(done.output), f"{done.scale:.3f}"
            result.diameter = f"{done.diameter:.1f}" if done.diameter else ""
        except (ValueError, OSError) as err:  # a bad file fails alone; ImageReadError and OutputExistsError are ValueErrors
            result.error = str(err) if str(err).startswith(str(path)) else f"{path}: {type(err).__name__}: {err}"
            log.error(result.error)
        result.seconds = time.perf_counter() - start
        return result

    with folder_lock(out):
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        with ThreadPoolExecutor(workers) as pool:
            results.extend(pool.map(one, paths))
        write_summary(out / "summary.csv", results)
    return results
