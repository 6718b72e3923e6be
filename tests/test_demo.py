"""End to end: ``cellseg1d demo`` starts the daemon, simulates a microscope and scores the labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers import REPO


def _images_under(acquisition: Path) -> list[Path]:
    """Every OME-Zarr image group (a folder with multiscales metadata) outside ``labels/``."""
    found = []
    for meta in sorted([*acquisition.rglob("zarr.json"), *acquisition.rglob(".zgroup")]):
        folder = meta.parent
        if "labels" in folder.relative_to(acquisition).parts:
            continue
        if meta.name == "zarr.json" and json.loads(meta.read_text()).get("node_type") != "group":
            continue  # an array
        attrs = dict(zarr.open_group(str(folder), mode="r").attrs)
        ome = attrs.get("ome", attrs)
        if "multiscales" in ome:
            found.append(folder)
    return found


def _label_level0(label_image: Path) -> np.ndarray:
    group = zarr.open_group(str(label_image), mode="r")
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)
    assert "image-label" in ome, f"{label_image} is not an NGFF label image"
    return np.asarray(group[ome["multiscales"][0]["datasets"][0]["path"]][...])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_segments_every_image(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env.pop("CELLSEG1D_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cellseg1d", "demo", "--images", "3", "--settle-seconds", "1",
         "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=110, cwd=REPO, env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "classical" in output, output

    acquisition = workdir / "acquisition"
    images = _images_under(acquisition)
    assert len(images) == 3, f"expected 3 images, found {images}"
    assert any(len(img.relative_to(acquisition).parts) == 4 for img in images), "no plate field written"
    for image in images:
        labels = _label_level0(image / "labels" / "cellseg1d")
        n_objects = np.count_nonzero(np.unique(labels))
        assert n_objects > 0, f"no objects in the labels of {image}"
    # The workdir is the user's: the demo keeps it.
    assert (workdir / "daemon.log").is_file()
