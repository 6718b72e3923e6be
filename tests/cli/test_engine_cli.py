"""``cellseg1d train`` then ``cellseg1d segment`` as a user runs them, with a tiny SAM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg1d.ngff.imageio import read_labels, write_labels
from cellseg1d.model.sam import build_sam
from cellseg1d.testing.synthetic import make_cells
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellseg1d", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})


def test_train_then_segment(tmp_path: Path) -> None:
    import imageio.v3 as iio

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny", 1024).state_dict(), ckpt)
    image, mask = make_cells((128, 128), 12, seed=3)
    iio.imwrite(tmp_path / "cells.png", (image * 255).clip(0, 255).astype(np.uint8))
    (tmp_path / "masks").mkdir()
    write_labels(tmp_path / "masks" / "cells_mask.tif", mask)
    write_labels(tmp_path / "masks" / "other.tif", mask[::-1])  # must not be picked: pairing is by name
    model = ["--checkpoint", str(ckpt), "--allow-custom-checkpoint", "--image-size", "256"]  # backbone: from the file

    out = run("train", str(tmp_path / "cells.png"), "--mask", str(tmp_path / "masks"), "--out",
              str(tmp_path / "adapter"), *model, "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1")
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["base_model_type"] == "tiny" and meta["metrics"]["steps"] == 2
    assert meta["settings"]["mask"].endswith("cells_mask.tif")

    out = run("segment", str(tmp_path / "cells.png"), "--adapter", str(tmp_path / "adapter"), *model,
              "--out", str(tmp_path / "pred.tif"), "--points-per-side", "4", "--crop-layers", "0")
    assert out.returncode == 0, out.stderr
    labels = read_labels(tmp_path / "pred.tif")
    assert labels.shape == mask.shape and labels.dtype.kind == "u"

    # the backbone is read from the checkpoint; --model-type is a check
    refused = run("train", str(tmp_path / "cells.png"), "--mask", str(tmp_path / "masks"), "--out",
                  str(tmp_path / "adapter2"), "--checkpoint", str(ckpt), "--model-type", "vit_b")
    assert refused.returncode == 2 and "is a tiny SAM" in refused.stderr and "--model-type is 'vit_b'" in refused.stderr
    refused = run("train", str(tmp_path / "cells.png"), "--mask", str(tmp_path / "masks"), "--out",
                  str(tmp_path / "adapter2"), "--checkpoint", str(ckpt))  # a custom file needs the option
    assert refused.returncode == 2 and "sha256" in refused.stderr
    wrong = tmp_path / "wrong.tif"
    write_labels(wrong, np.zeros((50, 50), np.uint16))
    bad = run("train", str(tmp_path / "cells.png"), "--mask", str(wrong), "--out", str(tmp_path / "a3"), *model)
    assert bad.returncode == 2 and "same size" in bad.stderr
