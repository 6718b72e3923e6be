"""Per-plane statistics: every block of a plane is normalised and thresholded like the whole plane.

A plane split into blocks (``executor.block_size``) is segmented block by
block. On real-looking images (uneven illumination, textured background,
cells from dim to bright) a segmenter that took its statistics from the block
gave a cell another outline in a block than in the whole plane; with the
plane's statistics sent along, the blocked labels match the whole-plane
labels (AP@0.5 >= 0.95), for the classical segmenter and for SAM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cellseg1d.pipeline import runner as pipeline_module
from cellseg1d.pipeline.executor import plane_regions
from cellseg1d.model.metrics import average_precision
from cellseg1d.ngff import stats as stats_module
from cellseg1d.ngff.reader import open_image
from cellseg1d.ngff.stats import image_plane_stats, plane_stats
from cellseg1d.model.classical import ClassicalParams, segment_classical
from cellseg1d.model.stitch import tile_boxes
from cellseg1d.testing.synthetic import make_realistic_cells, to_uint16, write_ome_zarr
from tests.helpers import TINY_BASE
from tests.pipeline.test_blocks import run

SIZE = 1024
BLOCK, OVERLAP = 256, 64

# ------------------------------------------------------------------ the statistics themselves


def test_plane_stats_values():
    plane = np.arange(16, dtype=np.uint16).reshape(1, 4, 4)
    stats = plane_stats(plane)
    channel = stats.channels[0]
    assert (channel.min, channel.max) == (0.0, 15.0)
    assert channel.percentile(1.0) == pytest.approx(np.percentile(np.arange(16), 1.0))
    assert channel.sample_stride == (1, 1) and np.array_equal(channel.sample, plane[0])
    with pytest.raises(KeyError, match="percentile 50"):
        channel.percentile(50)
    nan = plane_stats(np.array([[[np.nan, 1.0], [3.0, np.inf]]]))
    assert (nan.channels[0].min, nan.channels[0].max) == (1.0, 3.0)


def test_sample_is_the_plane_shrunk_by_area_means():
    plane = np.random.default_rng(0).random((1, 1024, 1000))
    channel = plane_stats(plane).channels[0]
    assert channel.sample_stride == (4, 4) and channel.sample.shape == (256, 250)
    assert channel.sample[3, 7] == pytest.approx(plane[0, 12:16, 28:32].mean(), rel=1e-6)


def test_huge_planes_take_their_statistics_from_a_pyramid_level(tmp_path: Path, monkeypatch):
    plane = to_uint16(make_realistic_cells((256, 256), 60, seed=1)[0])
    path = write_ome_zarr(tmp_path / "big.zarr", plane[None], axes="cyx", chunks=(1, 64, 64), n_levels=3)
    image = open_image(path)
    assert image_plane_stats(image, 0, 0, [0]).source == "plane"
    monkeypatch.setattr(stats_module, "STATS_MAX_PIXELS", 128 * 128)  # as if the plane were huge
    stats = image_plane_stats(image, 0, 0, [0])
    assert stats.source == "level 1"
    assert abs(stats.channels[0].percentile(99.8) - np.percentile(plane, 99.8)) < 0.05 * plane.max()
    monkeypatch.setattr(stats_module, "_stats_level", lambda image: None)  # no usable level: a strided read
    strided = image_plane_stats(image, 0, 0, [0])
    assert strided.source == "every 2th pixel" and strided.channels[0].max == plane[::2, ::2].max()


def test_classical_block_uses_the_planes_normalisation_and_threshold():
    image, _ = make_realistic_cells((256, 256), 60, seed=3)
    plane = to_uint16(image)[None]
    stats = plane_stats(plane)
    dim_corner = plane[:, 128:, 128:]  # the dim corner, alone: its own statistics stretch it
    own = segment_classical(dim_corner)
    shared = segment_classical(dim_corner, ClassicalParams(), stats)
    whole = segment_classical(plane, ClassicalParams(), stats)[128:, 128:]
    # with the plane's statistics the block's foreground is the whole plane's there (bar the block edge)
    inner = (slice(8, -8), slice(8, -8))
    agree_shared = ((shared > 0) == (whole > 0))[inner].mean()
    agree_own = ((own > 0) == (whole > 0))[inner].mean()
    assert agree_shared > 0.99 and agree_shared > agree_own


# ------------------------------------------------------------------ the pipeline, whole vs blocked


def _write(folder: Path, seed: int, size: int = SIZE) -> tuple[Path, np.ndarray]:
    image, truth = make_realistic_cells((size, size), size * size // 900, radius=(6, 12), seed=seed)
    path = write_ome_zarr(folder / "real.zarr", to_uint16(image)[None], axes="cyx", chunks=(1, 128, 128),
                          n_levels=2, channel_names=["nuclei"])
    return path, truth


def _run(image: Path, executor: dict[str, Any], labels_name: str, extra: dict[str, Any] | None = None) -> np.ndarray:
    return run(image, executor, labels_name, extra=extra)[1]


def _ap(pred: np.ndarray, truth: np.ndarray) -> float:
    return average_precision(pred, truth, 0.5)[0].ap


def test_blocked_classical_matches_the_whole_plane_on_real_looking_images(tmp_path: Path, monkeypatch):
    image, truth = _write(tmp_path, seed=11)
    assert len(plane_regions((SIZE, SIZE), BLOCK, OVERLAP)) > 9  # many seams
    whole = _run(image, {"block_size": 4096}, "whole")
    blocked = _run(image, {"block_size": BLOCK, "block_overlap": OVERLAP}, "blocked")
    ap = _ap(blocked, whole)
    assert ap >= 0.95, ap
    assert _ap(whole, truth) >= 0.6  # the image is segmentable at all
    # the test can fail: with each block's own statistics (the behaviour before) the outlines move
    monkeypatch.setattr(pipeline_module, "image_plane_stats", lambda *args: None)
    per_block = _run(image, {"block_size": BLOCK, "block_overlap": OVERLAP}, "per-block")
    assert _ap(per_block, whole) < ap




@pytest.mark.slow
def test_blocked_sam_matches_the_whole_plane_on_real_looking_images(tmp_path: Path, monkeypatch):
    if not TINY_BASE.is_file():
        pytest.skip(f"{TINY_BASE} not present")
    import torch
    from safetensors.torch import load_file

    from cellseg1d.model.sam import build_sam

    sam = build_sam("tiny", image_size=256)
    sam.load_state_dict({k: v.float() for k, v in load_file(str(TINY_BASE)).items()})
    checkpoint = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), checkpoint)
    folder = tmp_path / "acq"
    folder.mkdir()
    # SAM resizes what it is given to its input: the whole plane is tiled by sam.tile and each block
    # fits one tile, so both runs give SAM the same windows (what can differ is only the 8-bit stretch)
    size = 448
    assert plane_regions((size, size), BLOCK, OVERLAP) == tile_boxes((size, size), BLOCK, OVERLAP)
    image, truth = _write(folder, seed=12, size=size)
    sam_settings = {"sam": {"checkpoint": str(checkpoint), "allow_custom_checkpoint": True, "image_size": 256,
                            "points_per_side": 16, "crop_n_layers": 0, "tile": BLOCK, "tile_overlap": OVERLAP,
                            "device": "cpu"}}
    whole = _run(image, {"block_size": 4096}, "whole", sam_settings)
    blocked = _run(image, {"block_size": BLOCK, "block_overlap": OVERLAP}, "blocked", sam_settings)
    assert whole.max() > 50 and _ap(whole, truth) > 0.1  # the tiny base segments (it was trained on plain cells)
    ap = _ap(blocked, whole)
    assert ap >= 0.95, ap
    monkeypatch.setattr(pipeline_module, "image_plane_stats", lambda *args: None)
    per_block = _run(image, {"block_size": BLOCK, "block_overlap": OVERLAP}, "per-block", sam_settings)
    assert _ap(per_block, whole) < ap
