"""Tests of the synthetic images and the OME-Zarr writers of cellseg1d.testing.synthetic."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Plate, Reader
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from cellseg1d.testing.synthetic import make_cells, make_czyx, to_uint16, write_ome_zarr, write_plate


def _read_image(path: Path):
    """Return the first node of an OME-Zarr image read with ome-zarr's Reader."""
    location = parse_url(str(path))
    assert location is not None, f"{path} is not a zarr location"
    nodes = list(Reader(location)())
    assert nodes, f"ome-zarr found no node in {path}"
    return nodes[0]


# --------------------------------------------------------------------------
# Images and masks
# --------------------------------------------------------------------------


def test_make_cells_has_requested_distinct_non_touching_cells():
    image, mask = make_cells((256, 256), 30, seed=3)
    assert image.shape == mask.shape == (256, 256)
    assert image.dtype == np.float32 and mask.dtype == np.uint32
    labels = np.unique(mask)
    assert list(labels) == list(range(31))  # 0 plus labels 1..30, each used
    # every label is one connected blob, and no two cells touch
    for label in range(1, 31):
        _, n = ndi.label(mask == label)
        assert n == 1
    _, n_components = ndi.label(mask > 0)
    assert n_components == 30


def test_make_cells_is_deterministic_and_seed_dependent():
    a_img, a_mask = make_cells((128, 128), 10, seed=7)
    b_img, b_mask = make_cells((128, 128), 10, seed=7)
    _, c_mask = make_cells((128, 128), 10, seed=8)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_mask, c_mask)


def test_make_cells_places_as_many_as_fit():
    _, mask = make_cells((48, 48), 200, seed=0)
    placed = int(mask.max())
    assert 1 <= placed < 200
    assert len(np.unique(mask)) == placed + 1
    _, again = make_cells((48, 48), 200, seed=0)
    assert np.array_equal(mask, again)


def test_cells_are_brighter_than_background():
    image, mask = make_cells((200, 200), 20, seed=1)
    inside, outside = image[mask > 0], image[mask == 0]
    assert inside.mean() > outside.mean() + 0.4
    for label in range(1, int(mask.max()) + 1):
        assert image[mask == label].mean() > outside.mean() + 0.3
    assert 0.01 < outside.std() < 0.06  # gaussian noise on the background


def test_cells_are_separable_by_otsu_and_distance_watershed():
    image, mask = make_cells((256, 256), 40, seed=2)
    foreground = image > threshold_otsu(image)
    assert (foreground == (mask > 0)).mean() > 0.97
    distance = ndi.distance_transform_edt(foreground)
    components, _ = ndi.label(foreground)
    peaks = peak_local_max(distance, min_distance=5, labels=components)
    markers = np.zeros(image.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    found = watershed(-distance, markers, mask=foreground)
    assert abs(int(found.max()) - int(mask.max())) <= 2


def test_to_uint16_range():
    out = to_uint16(np.array([0.0, 1.0, -10.0, 100.0], dtype=np.float32))
    assert out.dtype == np.uint16
    assert list(out) == [100, 4000, 0, 65535]


def test_make_czyx_layout_and_channels():
    data, mask = make_czyx((96, 128), 8, n_channels=2, n_z=3, n_t=2, seed=4)
    assert data.shape == (2, 2, 3, 96, 128) and data.dtype == np.uint16
    assert mask.shape == (96, 128) and mask.dtype == np.uint32
    assert np.array_equal(mask, make_cells((96, 128), 8, seed=4)[1])
    nuclei, membrane = data[0, 0, 1].astype(float), data[0, 1, 1].astype(float)
    cells, background = mask > 0, mask == 0
    assert nuclei[cells].mean() > nuclei[background].mean() + 1000
    assert membrane[cells].mean() > membrane[background].mean()
    # the membrane channel is a different pattern: its cell centers are dark
    centers = ndi.binary_erosion(cells, iterations=4)
    rims = cells & ~ndi.binary_erosion(cells, iterations=1)
    assert membrane[rims].mean() > membrane[centers].mean() + 300
    assert nuclei[centers].mean() > nuclei[rims].mean()
    assert not np.array_equal(data[0], data[1])  # independent noise per time point


# --------------------------------------------------------------------------
# OME-Zarr images
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ngff_version", ["0.4", "0.5"])
def test_write_ome_zarr_is_readable_by_ome_zarr(tmp_path, ngff_version):
    data, _ = make_czyx((300, 200), 10, n_channels=2, n_z=2, seed=0)
    image = data[0]  # czyx
    path = write_ome_zarr(
        tmp_path / "img.zarr",
        image,
        ngff_version=ngff_version,
        n_levels=3,
        channel_names=["nuclei", "membrane"],
    )
    assert path == tmp_path / "img.zarr"
    node = _read_image(path)
    assert node.load(Multiscales) is not None
    assert len(node.data) == 3
    assert [tuple(level.shape) for level in node.data] == [
        (2, 2, 300, 200),
        (2, 2, 150, 100),
        (2, 2, 75, 50),
    ]
    assert np.array_equal(np.asarray(node.data[0]), image)
    assert node.data[1].dtype == np.uint16
    assert [axis["name"] for axis in node.metadata["axes"]] == ["c", "z", "y", "x"]
    assert node.metadata["channel_names"] == ["nuclei", "membrane"]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales[2] == pytest.approx([1, 1, 0.65 * 4, 0.65 * 4])


def test_ngff_04_is_zarr_v2(tmp_path):
    path = write_ome_zarr(tmp_path / "img.zarr", np.zeros((1, 64, 64), np.uint16), axes="cyx",
                          ngff_version="0.4")
    assert (path / ".zgroup").exists() and (path / ".zattrs").exists()
    assert not (path / "zarr.json").exists()
    zattrs = json.loads((path / ".zattrs").read_text())
    assert zattrs["multiscales"][0]["version"] == "0.4"
    assert zattrs["omero"]["channels"][0]["label"] == "ch0"
    zarray = json.loads((path / "0" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2


def test_ngff_05_is_zarr_v3(tmp_path):
    path = write_ome_zarr(tmp_path / "img.zarr", np.zeros((2, 64, 64), np.uint16), axes="tyx")
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    assert meta["attributes"]["ome"]["version"] == "0.5"
    axes = meta["attributes"]["ome"]["multiscales"][0]["axes"]
    assert axes == [
        {"name": "t", "type": "time"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    array_meta = json.loads((path / "0" / "zarr.json").read_text())
    assert array_meta["dimension_names"] == ["t", "y", "x"]
    assert not (path / ".zattrs").exists()


@pytest.mark.parametrize("ngff_version", ["0.4", "0.5"])
def test_extra_attrs_written_last_and_chunks_reported(tmp_path, ngff_version):
    path = tmp_path / "img.zarr"
    meta_file = path / (".zattrs" if ngff_version == "0.4" else "zarr.json")
    seen: list[dict] = []

    def on_chunk() -> None:
        # metadata and arrays exist from the first chunk on, the marker not yet
        assert meta_file.exists() and (path / "1").exists()
        seen.append(json.loads(meta_file.read_text()))

    data = np.arange(2 * 100 * 70, dtype=np.uint16).reshape(2, 100, 70)
    start = time.monotonic()
    write_ome_zarr(path, data, axes="cyx", ngff_version=ngff_version, chunks=(1, 32, 32),
                   pause=0.01, attrs={"acquisition_complete": True}, on_chunk=on_chunk)
    elapsed = time.monotonic() - start
    assert len(seen) == 2 * 4 * 3  # one call per level-0 chunk
    assert elapsed >= 0.01 * (len(seen) - 1)
    assert all("acquisition_complete" not in attrs_ for attrs_ in seen)
    final = json.loads(meta_file.read_text())
    attrs = final if ngff_version == "0.4" else final["attributes"]
    assert attrs["acquisition_complete"] is True
    if ngff_version == "0.5":
        assert "acquisition_complete" not in attrs["ome"]
    assert np.array_equal(np.asarray(_read_image(path).data[0]), data)


def test_default_chunks(tmp_path):
    data = np.ones((1, 2, 3, 300, 40), np.uint16)
    calls = []
    path = write_ome_zarr(tmp_path / "img.zarr", data, axes="tczyx",
                          on_chunk=lambda: calls.append(1))
    array_meta = json.loads((path / "0" / "zarr.json").read_text())
    assert array_meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 1, 1, 256, 40]
    assert len(calls) == 2 * 3 * 2


@pytest.mark.parametrize(
    ("axes", "shape"),
    [("cxy", (1, 8, 8)), ("cz", (1, 8)), ("ccyx", (1, 1, 8, 8)), ("zyx", (8, 8))],
)
def test_invalid_axes_rejected(tmp_path, axes, shape):
    with pytest.raises(ValueError):
        write_ome_zarr(tmp_path / "bad.zarr", np.zeros(shape, np.uint16), axes=axes)


# --------------------------------------------------------------------------
# Plates
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ngff_version", ["0.4", "0.5"])
def test_write_plate_is_readable(tmp_path, ngff_version):
    fields = {
        ("A", "1", "0"): make_czyx((64, 64), 4, seed=1)[0][0],
        ("A", "1", "1"): make_czyx((64, 64), 4, seed=2)[0][0],
        ("A", "2", "0"): make_czyx((64, 64), 4, seed=3)[0][0],
        ("B", "1", "0"): make_czyx((64, 64), 4, seed=4)[0][0],
    }
    path = write_plate(tmp_path / "plate.zarr", fields, ngff_version=ngff_version,
                       attrs={"acquisition_complete": True})
    nodes = list(Reader(parse_url(str(path)))())
    assert nodes and nodes[0].load(Plate) is not None
    plate = nodes[0].metadata["metadata"]["plate"]
    assert [r["name"] for r in plate["rows"]] == ["A", "B"]
    assert [c["name"] for c in plate["columns"]] == ["1", "2"]
    assert sorted(w["path"] for w in plate["wells"]) == ["A/1", "A/2", "B/1"]
    assert plate["field_count"] == 2
    for (row, col, field), data in fields.items():
        node = _read_image(path / row / col / field)
        assert np.array_equal(np.asarray(node.data[0]), data)
    if ngff_version == "0.5":
        meta = json.loads((path / "A" / "1" / "zarr.json").read_text())
        assert meta["attributes"]["ome"]["well"]["images"] == [{"path": "0"}, {"path": "1"}]
    else:
        zattrs = json.loads((path / "A" / "1" / ".zattrs").read_text())
        assert zattrs["well"]["version"] == "0.4"


def test_synthetic_images_and_the_demo_need_no_pytest() -> None:
    """pytest is a test extra: ``cellseg1d demo`` imports the synthetic images without it."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pytest' or name.startswith('_pytest'):\n"
        "            raise ImportError('no pytest here', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr\n"
        "import cellseg1d.cli.demo, cellseg1d.testing\n"
        "assert not hasattr(cellseg1d.testing, 'synthetic_image')  # the fixtures need pytest\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
