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
    # The dashboard ran during the demo; its address is in the last lines.
    assert "Dashboard (read-only, live): http://127.0.0.1:" in output
    assert any(line.startswith("Dashboard: http://127.0.0.1:") for line in output.splitlines()[-6:]), output


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_sam_runs_the_cellseg1_flow(tmp_path: Path) -> None:
    """--sam: tiny base, an adapter trained on one image, registered, assigned, used by the daemon; both APs shown."""
    workdir = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "220"}
    env.pop("CELLSEG1D_CONFIG", None)
    code = ("import sys; from pathlib import Path; from cellseg1d.cli.demo import run_demo; "
            f"sys.exit(run_demo(n_images=2, settle_seconds=1.0, workdir=Path({str(workdir)!r}), sam=True))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=880, cwd=REPO,
                          env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "trained on ONE synthetic image" in output and "assigned to experiment demo-cells" in output
    assert "AP@0.5 SAM + adapter" in output and "AP@0.5 classical" in output
    assert "Mean AP@0.5 classical fallback on the same images" in output
    assert "stand-in base is tiny" in output and "sam_vit_h_4b8939.pth" in output
    assert "sam:tiny+demo-cells@v1" in output  # the daemon's segmenter: SAM with the demo's adapter
    images = _images_under(workdir / "acquisition")
    assert len(images) == 2
    for image in images:
        attrs = dict(zarr.open_group(str(image / "labels" / "cellseg1d"), mode="r").attrs)
        provenance = attrs.get("ome", attrs).get("cellseg1d") or attrs.get("cellseg1d")
        assert provenance["adapter"]["name"] == "demo-cells" and provenance["experiment"] == "demo-cells"
