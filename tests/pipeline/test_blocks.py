"""Blockwise segmentation (``executor.block_size``): cells on block seams and corners come out once, uncut.

A 288 x 288 plane with known discs, many centred exactly on the seams, edges
and corners of the 3 x 3 blocks that ``plane_regions(..., 128, 48)`` cuts it
into, is segmented by the real pipeline (classical segmenter, real OME-Zarr
in and out) unblocked and blocked, with the local executor and (slow) on a
real two-worker Dask cluster. Each run must find every true cell exactly
once: one label per cell, covering it, and no label reaching into two cells.
A cut cell (two labels in it), a duplicated one (an extra label) or a lost
one all fail.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from scipy import ndimage

from cellseg1d.config import ExecutorSettings, PathMap, build_config
from cellseg1d.errors import ConfigError
from cellseg1d.pipeline.executor import plane_regions
from cellseg1d.pipeline import Pipeline
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.testing.synthetic import to_uint16, write_ome_zarr
from tests.dask_cluster import dask_cluster  # noqa: F401  (fixture)

SIZE = 288
BLOCK = 128
OVERLAP = 48  # cells reach at most 11 px from their centre: < OVERLAP / 2
RADII = (9.0, 10.0, 11.0)
MIN_DISTANCE = 32  # between centres: a gap of >= 10 px between any two cells


def seam_positions(size: int = SIZE) -> list[int]:
    """Along one axis: every interior block edge and the middle of every overlap."""
    regions = plane_regions((size, size), BLOCK, OVERLAP)
    starts = sorted({r[0] for r in regions if r[0] > 0})
    ends = sorted({r[2] for r in regions if r[2] < size})
    middles = [(s + e) // 2 for s, e in zip(starts, ends, strict=True)]
    return sorted({*starts, *ends, *middles})


def make_truth() -> np.ndarray:
    """Label mask of discs: seam and corner positions first, then a filler grid; cells are well apart."""
    seams = seam_positions()
    spots = list(itertools.product(seams, seams))
    margin = 14
    fillers = list(itertools.product(range(margin, SIZE - margin + 1, 34), repeat=2))
    centres: list[tuple[int, int]] = []
    for y, x in spots + fillers:
        if not margin <= y <= SIZE - margin or not margin <= x <= SIZE - margin:
            continue
        if all((y - cy) ** 2 + (x - cx) ** 2 >= MIN_DISTANCE**2 for cy, cx in centres):
            centres.append((y, x))
    truth = np.zeros((SIZE, SIZE), np.uint32)
    yy, xx = np.ogrid[:SIZE, :SIZE]
    for i, (y, x) in enumerate(centres):
        r = RADII[i % len(RADII)]
        truth[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = i + 1
    return truth


def crossing_cells(truth: np.ndarray) -> int:
    """How many cells a block edge cuts (in at least one block the cell is not whole)."""
    cut = set()
    for y0, x0, y1, x1 in plane_regions(truth.shape, BLOCK, OVERLAP):
        inside = set(np.unique(truth[y0:y1, x0:x1])) - {0}
        ring = np.zeros(truth.shape, bool)
        ring[y0:y1, x0:x1] = True
        outside = set(np.unique(truth[~ring])) - {0}
        cut |= inside & outside
    return len(cut)


def write_image(folder: Path, truth: np.ndarray, seed: int = 0) -> Path:
    """A one-channel OME-Zarr image of the discs (soft edges, noise), chunks smaller than a block."""
    rng = np.random.default_rng(seed)
    signal = ndimage.gaussian_filter((truth > 0).astype(np.float64) * 0.8, 1.0)
    plane = to_uint16(signal + 0.08 + rng.normal(0.0, 0.03, truth.shape))
    return write_ome_zarr(folder / "seams.zarr", plane[None], axes="cyx", chunks=(1, 64, 64), n_levels=2,
                          channel_names=["nuclei"])


def check_cells(labels: np.ndarray, truth: np.ndarray) -> None:
    """Every true cell is covered by one label of its own; no label reaches into two cells."""
    n_cells = int(truth.max())
    dominant: dict[int, int] = {}
    problems = []
    for cell in range(1, n_cells + 1):
        inside = labels[truth == cell]
        values, counts = np.unique(inside[inside > 0], return_counts=True)
        if values.size == 0:
            problems.append(f"cell {cell}: not found")
            continue
        top = int(values[np.argmax(counts)])
        covered = counts.max() / inside.size
        purity = counts.max() / counts.sum()
        if covered < 0.8 or purity < 0.95:  # a cut cell has two labels, about half each
            problems.append(f"cell {cell}: label {top} covers {covered:.2f} of it, "
                            f"{values.size} labels inside (purity {purity:.2f})")
        dominant[cell] = top
    owners: dict[int, list[int]] = {}
    for cell, label in dominant.items():
        owners.setdefault(label, []).append(cell)
    problems += [f"label {label} is the label of cells {cells}" for label, cells in owners.items() if len(cells) > 1]
    for label in np.unique(labels[labels > 0]):
        under = np.unique(truth[labels == label])
        if (under > 0).sum() > 1:
            problems.append(f"label {label} reaches into cells {sorted(int(u) for u in under if u)}")
    assert not problems, "\n".join(problems)
    found = len(np.unique(labels)) - 1
    assert found == n_cells, f"{found} objects for {n_cells} cells (extra: duplicated or spurious)"


def run(image: Path, executor_settings: dict[str, Any], labels_name: str, executor: Any = None,
        extra: dict[str, Any] | None = None) -> tuple[Any, np.ndarray]:
    """The real pipeline on ``image`` (classical segmenter unless ``extra`` configures another); the
    result and its published level-0 labels (Y, X)."""
    root = image.parent
    config = build_config({
        "state_dir": str(root / ".state"),
        "watch": {"roots": [{"path": str(root)}]},
        "segmentation": {"labels_name": labels_name},
        "executor": executor_settings,
        **(extra or {}),
    })
    pm = build_plugin_manager(config.plugins.enable, config.plugins.disable)
    pm.hook.configure(config=config)
    path = image.resolve()
    result = Pipeline(config, pm, executor).run(path, config.watch.roots[0], path)
    published = path / "labels" / labels_name
    assert Path(result.labels_path) == published
    level0 = np.asarray(zarr.open_array(str(published / "0"), mode="r"))
    return result, level0.reshape(level0.shape[-2:])


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return make_truth()


@pytest.fixture
def image(tmp_path: Path, truth: np.ndarray) -> Path:
    folder = tmp_path / "acq"
    folder.mkdir()
    return write_image(folder, truth)


def test_the_layout_puts_cells_on_seams_and_corners(truth: np.ndarray) -> None:
    # The test plane is what it claims: 3 x 3 blocks, many cells cut by some block edge,
    # cells centred on the 4 corners where four blocks overlap.
    assert len(plane_regions(truth.shape, BLOCK, OVERLAP)) == 9
    assert crossing_cells(truth) >= 20, crossing_cells(truth)
    seams = seam_positions()
    middles = [p for p in seams if p not in {r[0] for r in plane_regions(truth.shape, BLOCK, OVERLAP)}
               and p not in {r[2] for r in plane_regions(truth.shape, BLOCK, OVERLAP)}]
    assert len(middles) == 2
    for y, x in itertools.product(middles, middles):
        assert truth[y, x] > 0, (y, x)


def test_blocked_run_finds_the_same_cells_once_and_uncut(image: Path, truth: np.ndarray) -> None:
    whole, whole_labels = run(image, {"block_size": 4096}, "unblocked")
    blocked, blocked_labels = run(image, {"block_size": BLOCK, "block_overlap": OVERLAP}, "blocked")

    check_cells(whole_labels, truth)
    check_cells(blocked_labels, truth)
    assert blocked.object_count == whole.object_count == int(truth.max())

    assert whole.provenance["executor"]["kind"] == "local"
    assert whole.provenance["executor"]["blocks_per_plane"] == 1
    executor = blocked.provenance["executor"]
    assert executor["kind"] == "local" and executor["blocks_per_plane"] == 9
    assert executor["block_size"] == BLOCK and executor["block_overlap"] == OVERLAP
    assert [(p["t"], p["z"]) for p in executor["planes"]] == [(0, 0)]
    assert len(executor["planes"][0]["workers"]) == 1 and executor["planes"][0]["workers"][0].startswith("local:")

    # The same cells with (nearly) the same outlines: block-local thresholds differ a little.
    for cell in range(1, int(truth.max()) + 1):
        a = whole_labels == np.bincount(whole_labels[truth == cell]).argmax()
        b = blocked_labels == np.bincount(blocked_labels[truth == cell]).argmax()
        iou = (a & b).sum() / (a | b).sum()
        assert iou >= 0.8, (cell, iou)


def test_check_cells_catches_a_cut_and_a_duplicated_cell(truth: np.ndarray) -> None:
    """The checks above can fail: a cell cut along a seam, or an extra label, is reported."""
    cut = truth.copy()
    cell = truth[seam_positions()[1], seam_positions()[1]]
    ys, xs = np.nonzero(truth == cell)
    cut[ys[xs > xs.mean()], xs[xs > xs.mean()]] = truth.max() + 1
    with pytest.raises(AssertionError, match="purity"):
        check_cells(cut, truth)
    extra = truth.copy()
    extra[0:8, 0:8] = truth.max() + 1
    with pytest.raises(AssertionError, match="objects for"):
        check_cells(extra, truth)


@pytest.mark.slow
def test_blocked_run_on_a_dask_cluster_matches_the_unblocked_one(image: Path, truth: np.ndarray,
                                                                  dask_cluster) -> None:  # noqa: F811
    from cellseg1d.pipeline.executor.dask import DaskExecutor

    cluster = dask_cluster(2)
    whole, _ = run(image, {"block_size": 4096}, "unblocked")
    settings = {"kind": "dask", "scheduler": cluster.address, "connect_timeout_seconds": 10,
                "block_size": BLOCK, "block_overlap": OVERLAP}
    config = build_config({"state_dir": str(image.parent / ".state"), "executor": settings})
    executor = DaskExecutor(config)
    executor.start()
    try:
        result, labels = run(image, settings, "dask", executor)
    finally:
        executor.close()
    check_cells(labels, truth)
    assert result.object_count == whole.object_count == int(truth.max())
    prov = result.provenance["executor"]
    assert prov["kind"] == "dask" and prov["scheduler"] == cluster.address
    assert prov["blocks_per_plane"] == 9 and prov["block_size"] == BLOCK
    assert [(p["t"], p["z"]) for p in prov["planes"]] == [(0, 0)]
    workers = prov["planes"][0]["workers"]
    assert workers and set(workers) <= set(cluster.worker_addresses()), (workers, cluster.logs())


# -- units -----------------------------------------------------------------------


def test_plane_regions_is_the_whole_plane_when_it_fits() -> None:
    assert plane_regions((300, 200), 4096, 256) == [(0, 0, 300, 200)]
    assert plane_regions((128, 128), 128, 48) == [(0, 0, 128, 128)]  # exactly one block
    # One pixel too tall: two equal blocks overlapping by at least 48, not a 128 block and a sliver.
    assert plane_regions((129, 100), 128, 48) == [(0, 0, 89, 100), (40, 0, 129, 100)]
    # 8192 px in blocks of at most 4096 overlapping >= 256: 3 equal blocks of 2902 (not 3 of 4096).
    assert plane_regions((8192, 100), 4096, 256) == [(0, 0, 2902, 100), (2645, 0, 5547, 100),
                                                     (5290, 0, 8192, 100)]
    for shape, block, overlap in [((SIZE, 200), BLOCK, OVERLAP), ((1000, 333), 100, 30), ((517, 4099), 512, 0)]:
        regions = plane_regions(shape, block, overlap)
        assert len(regions) > 1
        covered = np.zeros(shape, int)
        for y0, x0, y1, x1 in regions:
            assert y1 - y0 <= block and x1 - x0 <= block
            covered[y0:y1, x0:x1] += 1
        assert covered.min() >= 1
        ys = sorted({r[0] for r in regions})
        height = regions[0][2] - regions[0][0]
        assert all(a + height - b >= overlap for a, b in zip(ys, ys[1:]))  # neighbours overlap enough


def _executor(**settings: Any) -> Any:
    return build_config({"executor": settings}).executor


def test_executor_settings_reject_overlap_of_half_a_block_or_more() -> None:
    with pytest.raises(ConfigError, match=r"executor.*block_overlap \(64\) must be less than half"):
        _executor(block_size=128, block_overlap=64)
    with pytest.raises(ConfigError, match="block_overlap"):
        _executor(block_size=128, block_overlap=100)
    assert _executor(block_size=128, block_overlap=63).block_overlap == 63


def test_executor_settings_need_a_scheduler_address_for_dask() -> None:
    with pytest.raises(ConfigError, match="kind = 'dask' needs scheduler"):
        _executor(kind="dask")
    with pytest.raises(ConfigError, match="kind = 'dask' needs scheduler"):
        _executor(kind="dask", scheduler="   ")
    with pytest.raises(ConfigError, match="not a scheduler address"):
        _executor(kind="dask", scheduler="gpu-server:8786")
    assert _executor(kind="dask", scheduler=" tcp://gpu:8786 ").scheduler == "tcp://gpu:8786"
    assert _executor().kind == "local"


def test_to_worker_maps_the_longest_matching_prefix() -> None:
    settings = ExecutorSettings(path_map=[
        PathMap(daemon=Path("/mnt"), worker=Path("/w")),
        PathMap(daemon=Path("/mnt/scope1"), worker=Path("/data/s1")),
    ])
    assert settings.to_worker(Path("/mnt/scope1/a/b.zarr")) == Path("/data/s1/a/b.zarr")
    assert settings.to_worker(Path("/mnt/scope1")) == Path("/data/s1")
    assert settings.to_worker(Path("/mnt/scope10/x")) == Path("/w/scope10/x")  # whole components only
    assert settings.to_worker(Path("/mnt/other/x")) == Path("/w/other/x")
    assert settings.to_worker(Path("/elsewhere/x")) == Path("/elsewhere/x")
    reversed_order = ExecutorSettings(path_map=list(reversed(settings.path_map)))
    assert reversed_order.to_worker(Path("/mnt/scope1/a")) == Path("/data/s1/a")
    with pytest.raises(ConfigError, match="not an absolute path"):
        build_config({"executor": {"path_map": [{"daemon": "relative", "worker": "/w"}]}})
