"""``cellseg1d evaluate`` and the single-image readers/writers it uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellseg1d.cli.evaluate import evaluate
from cellseg1d.errors import ImageError
from cellseg1d.ngff.imageio import read_image, read_labels, write_labels
from cellseg1d.testing.synthetic import make_cells
from tests.helpers import REPO


def squares() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((40, 40), np.uint16)
    gt[2:12, 2:12] = 1
    gt[20:30, 20:30] = 2
    gt[2:12, 25:35] = 3
    pred = np.zeros_like(gt)
    pred[2:12, 2:12] = 7          # exact match
    pred[20:30, 23:33] = 9        # IoU 70/130 = 0.54: a match at 0.5, not at 0.75
    pred[32:38, 2:8] = 4          # false positive; object 3 is missed
    return pred, gt


@pytest.mark.parametrize("suffix", [".tif", ".png", ".npy"])
def test_label_files_round_trip(tmp_path: Path, suffix: str) -> None:
    _, mask = make_cells((64, 64), 5, seed=1)
    path = write_labels(tmp_path / f"m{suffix}", mask)
    np.testing.assert_array_equal(read_labels(path), mask)


def test_evaluate_hand_made_case(tmp_path: Path) -> None:
    pred, gt = squares()
    report = evaluate(write_labels(tmp_path / "p.tif", pred), write_labels(tmp_path / "g.tif", gt))
    (row,) = report["images"]
    assert row["tp/fp/fn@0.5"] == [2, 1, 1] and row["ap@0.5"] == pytest.approx(2 / 4)
    assert row["tp/fp/fn@0.75"] == [1, 2, 2] and row["ap@0.75"] == pytest.approx(1 / 5)


def test_folders_are_paired_by_name_not_order(tmp_path: Path) -> None:
    pred, gt = squares()
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    write_labels(tmp_path / "pred" / "b.png", gt)      # perfect
    write_labels(tmp_path / "pred" / "a.png", pred)    # imperfect
    write_labels(tmp_path / "gt" / "a.tif", gt)
    write_labels(tmp_path / "gt" / "b.tif", gt)
    report = evaluate(tmp_path / "pred", tmp_path / "gt", (0.5,))
    by_name = {Path(r["pred"]).stem: r["ap@0.5"] for r in report["images"]}
    assert by_name == {"a": 0.5, "b": 1.0} and report["mean"]["ap@0.5"] == 0.75
    write_labels(tmp_path / "pred" / "c.png", gt)
    with pytest.raises(ImageError, match="no ground truth named 'c"):
        evaluate(tmp_path / "pred", tmp_path / "gt")


def test_shape_mismatch_and_bad_labels(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="shape"):
        evaluate(write_labels(tmp_path / "p.npy", np.zeros((5, 5), np.int32)),
                 write_labels(tmp_path / "g.npy", np.zeros((6, 5), np.int32)))
    np.save(tmp_path / "f.npy", np.full((4, 4), 0.5))
    with pytest.raises(ImageError, match="integers"):
        read_labels(tmp_path / "f.npy")


def test_read_image_channels_first(tmp_path: Path) -> None:
    import imageio.v3 as iio

    rgb = np.random.default_rng(0).integers(0, 255, (30, 20, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "x.png", rgb)
    data = read_image(tmp_path / "x.png")
    assert data.shape == (3, 30, 20)
    assert read_image(tmp_path / "x.png", [1]).shape == (1, 30, 20)
    with pytest.raises(ImageError, match="out of range"):
        read_image(tmp_path / "x.png", [5])


def test_evaluate_command_json(tmp_path: Path) -> None:
    pred, gt = squares()
    out = subprocess.run(
        [sys.executable, "-m", "cellseg1d", "evaluate", str(write_labels(tmp_path / "p.tif", pred)),
         str(write_labels(tmp_path / "g.tif", gt)), "--json", "--thresholds", "0.5"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["mean"] == {"ap@0.5": 0.5}
