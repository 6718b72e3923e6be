"""OME-Zarr in and out: reading NGFF 0.4/0.5 images, writing label images, discovery.

Everything runs on real stores in tmp_path; label images written by the pipeline
are checked with ome-zarr's own Reader and against the synthetic ground truth.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader

from cellseg1d.config import build_config
from cellseg1d.errors import ImageError
from cellseg1d.model.metrics import average_precision
from cellseg1d.ngff.discover import container_of, find_containers, list_images
from cellseg1d.ngff.labels import PROVENANCE_KEY
from cellseg1d.ngff.reader import open_image
from cellseg1d.pipeline import Pipeline
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr, write_plate

VERSIONS = ("0.4", "0.5")
SUFFIXES = [".zarr"]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def write_image(path: Path, axes: str = "czyx", version: str = "0.5", *, n_t: int = 1, n_z: int = 1,
                n_c: int = 2, size: int = 64, n_cells: int = 8, seed: int = 0, n_levels: int = 2,
                **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Write a synthetic image with the given axes; return the full (t, c, z, y, x) data and mask."""
    data, mask = make_czyx((size, size), n_cells, n_channels=n_c, n_z=n_z, n_t=n_t, seed=seed)
    index = tuple(slice(None) if a in axes else 0 for a in "tczyx")
    names = ["nuclei", "membrane", "actin"][:n_c] if "c" in axes else None
    write_ome_zarr(path, data[index], axes=axes, ngff_version=version, channel_names=names,
                   n_levels=n_levels, **kwargs)
    return data, mask


def make_pipeline(tmp_path: Path, root: Path, **root_options) -> tuple[Pipeline, object]:
    config = build_config({
        "state_dir": str(tmp_path / "state"),
        "watch": {"roots": [{"path": str(root), **{k: str(v) for k, v in root_options.items()}}]},
    })
    return Pipeline(config, build_plugin_manager()), config.watch.roots[0]


def run(tmp_path: Path, image: Path, container: Path | None = None, root: Path | None = None, **root_options):
    pipeline, watch_root = make_pipeline(tmp_path, root or image.parent, **root_options)
    return pipeline.run(image, watch_root, container or image)


def tree_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 for every file, plus every folder (so new empty folders show)."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs:
            out[str((Path(dirpath) / name).relative_to(folder)) + "/"] = "dir"
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def group_attrs(path: Path) -> dict:
    """Raw attributes of a zarr group (v3: zarr.json 'attributes'; v2: .zattrs)."""
    if (path / "zarr.json").is_file():
        return json.loads((path / "zarr.json").read_text())["attributes"]
    return json.loads((path / ".zattrs").read_text())


def ngff(attrs: dict) -> dict:
    return attrs.get("ome", attrs)


def read_labels(label_path: Path) -> zarr.Array:
    return zarr.open_array(str(label_path / "0"), mode="r")


def staging_leftovers(labels_dir: Path) -> list[str]:
    return [p.name for p in labels_dir.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


# --------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------

AXES = ["yx", "cyx", "zyx", "czyx", "tczyx", "tyx"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("axes", AXES)
def test_open_and_read_planes(tmp_path: Path, axes: str, version: str) -> None:
    n_t, n_z, n_c = (2 if "t" in axes else 1), (3 if "z" in axes else 1), (3 if "c" in axes else 1)
    path = tmp_path / f"img-{axes}.zarr"
    data, _ = write_image(path, axes, version, n_t=n_t, n_z=n_z, n_c=n_c, size=48, n_cells=4)

    image = open_image(path)
    assert image.axes == tuple(axes)
    assert image.ngff_version == version and image.zarr_format == (3 if version == "0.5" else 2)
    expected_shape = tuple({"t": n_t, "c": n_c, "z": n_z, "y": 48, "x": 48}[a] for a in axes)
    assert image.shape == expected_shape
    assert len(image.levels) == 2
    assert image.levels[1].array.shape[-2:] == (24, 24)
    assert image.channel_names == (["nuclei", "membrane", "actin"] if "c" in axes else ["ch0"])
    assert image.n_channels == n_c
    assert list(image.planes()) == [(t, z) for t in range(n_t) for z in range(n_z)]
    assert image.missing_chunks() == (0, image.levels[0].array.nchunks)

    channel_lists = [[0], [2, 0], [1, 2, 0]] if "c" in axes else [[0]]
    for t, z in {(0, 0), (n_t - 1, n_z - 1), (n_t - 1, 0)}:
        for channels in channel_lists:
            plane = image.read_plane(t, z, channels)
            assert plane.shape == (len(channels), 48, 48)
            assert plane.dtype == np.uint16
            np.testing.assert_array_equal(plane, data[t, channels, z])


def test_read_plane_transposes_xy_axes(tmp_path: Path) -> None:
    """An image stored as (c, x, y) still comes back as (C, Y, X)."""
    data, _ = make_czyx((40, 56), 3)
    plane = data[0, :, 0]  # (c, y, x)
    path = tmp_path / "xy.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = group.create_array("0", shape=(2, 56, 40), chunks=(1, 56, 40), dtype="uint16")
    arr[...] = plane.transpose(0, 2, 1)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [
        {"axes": [{"name": "c"}, {"name": "x"}, {"name": "y"}], "datasets": [{"path": "0"}]}]}
    image = open_image(path)
    assert image.size("y") == 40 and image.size("x") == 56
    np.testing.assert_array_equal(image.read_plane(0, 0, [1, 0]), plane[[1, 0]])


@pytest.mark.parametrize("version", VERSIONS)
def test_channel_selection(tmp_path: Path, version: str) -> None:
    path = tmp_path / "img.zarr"
    write_image(path, "czyx", version, n_c=3)
    image = open_image(path)
    assert image.channel_indices([]) == [0]
    assert image.channel_indices(["membrane"]) == [1]
    assert image.channel_indices(["actin", "nuclei"]) == [2, 0]
    assert image.channel_indices([2, "membrane"]) == [2, 1]
    with pytest.raises(ImageError) as err:
        image.channel_indices(["dapi"])
    msg = str(err.value)
    assert "'dapi'" in msg and str(path) in msg
    assert "'nuclei'" in msg and "'membrane'" in msg and "'actin'" in msg
    with pytest.raises(ImageError, match=r"channel index 3 .* 3 channel"):
        image.channel_indices([3])
    with pytest.raises(ImageError, match="channel index -1"):
        image.channel_indices([-1])


def test_unknown_channel_in_config_fails_the_pipeline_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "img.zarr"
    write_image(path)
    config = build_config({
        "state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(tmp_path)}]},
        "segmentation": {"channels": ["dapi"]},
    })
    with pytest.raises(ImageError, match="'nuclei', 'membrane'"):
        Pipeline(config, build_plugin_manager()).run(path, config.watch.roots[0], path)
    assert not (path / "labels").exists()


def test_fingerprint_follows_layout_not_pixels(tmp_path: Path) -> None:
    path = tmp_path / "img.zarr"
    write_image(path)
    first = open_image(path).fingerprint
    zarr.open_array(str(path / "0"), mode="r+")[0, 0, :4, :4] = 7  # pixels only
    assert open_image(path).fingerprint == first
    write_image(path, size=32)  # rewritten with another shape
    assert open_image(path).fingerprint != first


# --------------------------------------------------------------------------
# Writing labels
# --------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_labels_are_valid_ngff_and_accurate(tmp_path: Path, version: str) -> None:
    path = tmp_path / "img.zarr"
    _, mask = write_image(path, "czyx", version, size=128, n_cells=12, n_levels=3)
    image = open_image(path)

    result = run(tmp_path, path)
    label_path = path / "labels" / "cellseg1d"
    assert result.labels_path == str(label_path)
    assert result.planes == 1 and result.segmenter == "classical"

    # ome-zarr's Reader recognises the label image (and finds it from the image too).
    nodes = list(Reader(parse_url(str(label_path)))())
    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(label_nodes) == 1
    node = label_nodes[0]
    assert [tuple(d.shape) for d in node.data] == [(1, 128, 128), (1, 64, 64), (1, 32, 32)]
    image_nodes = list(Reader(parse_url(str(path)))())
    from_image = [n for n in image_nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(from_image) == 1 and [tuple(d.shape) for d in from_image[0].data] == [
        tuple(d.shape) for d in node.data]

    # One level per image level, shapes = image shapes without c, uint32.
    group = zarr.open_group(str(label_path), mode="r")
    assert group.metadata.zarr_format == image.zarr_format
    for level in image.levels:
        arr = zarr.open_array(str(label_path / level.path), mode="r")
        assert arr.shape == tuple(n for a, n in zip(image.axes, level.array.shape, strict=True) if a != "c")
        assert arr.dtype == np.uint32

    attrs = group_attrs(label_path)
    meta = ngff(attrs)
    if version == "0.5":
        assert (label_path / "zarr.json").is_file() and not (label_path / ".zattrs").exists()
        assert json.loads((label_path / "zarr.json").read_text())["zarr_format"] == 3
        assert attrs["ome"]["version"] == "0.5"
    else:
        assert (label_path / ".zgroup").is_file() and not (label_path / "zarr.json").exists()
        assert meta["multiscales"][0]["version"] == "0.4"
        assert meta["image-label"]["version"] == "0.4"
    assert [a["name"] for a in meta["multiscales"][0]["axes"]] == ["z", "y", "x"]
    assert [d["path"] for d in meta["multiscales"][0]["datasets"]] == ["0", "1", "2"]
    # scale transforms drop the c entry
    datasets = meta["multiscales"][0]["datasets"]
    assert all(len(d["coordinateTransformations"][0]["scale"]) == 3 for d in datasets)
    image_label = meta["image-label"]
    assert [c["label-value"] for c in image_label["colors"]] == list(range(1, result.object_count + 1))
    assert all(len(c["rgba"]) == 4 for c in image_label["colors"])
    assert (label_path / image_label["source"]["image"]).resolve() == path.resolve()
    assert attrs[PROVENANCE_KEY]["segmenter"] == "classical"
    assert attrs[PROVENANCE_KEY]["source_fingerprint"] == image.fingerprint

    # The labels group lists it once, with NGFF metadata of the right version.
    labels_attrs = group_attrs(path / "labels")
    assert ngff(labels_attrs)["labels"] == ["cellseg1d"]
    if version == "0.5":
        assert labels_attrs["ome"]["version"] == "0.5"

    # By value: the classical segmenter on well-separated synthetic cells scores ~1.0
    # (measured AP 1.0 for both versions, seeds 0-3); 0.9 leaves room for one merged
    # or missed cell out of 12 without letting a broken reader/writer (transposed,
    # shifted, wrong plane or channel: AP ~0) pass.
    pred = np.asarray(read_labels(label_path)[0])
    ap = average_precision(pred, mask, 0.5)[0]
    assert ap.ap >= 0.9, ap
    assert result.object_count == len(np.unique(pred)) - 1
    # The lower level is a nearest-neighbour downsampling of level 0.
    level1 = np.asarray(zarr.open_array(str(label_path / "1"), mode="r")[0])
    np.testing.assert_array_equal(level1, pred[::2, ::2])


@pytest.mark.parametrize("version", VERSIONS)
def test_rerun_replaces_without_duplicates_or_leftovers(tmp_path: Path, version: str) -> None:
    path = tmp_path / "img.zarr"
    write_image(path, "czyx", version)
    first = run(tmp_path, path)
    before = np.asarray(read_labels(path / "labels" / "cellseg1d")[...])
    second = run(tmp_path, path)
    assert second.labels_path == first.labels_path and second.object_count == first.object_count
    np.testing.assert_array_equal(np.asarray(read_labels(path / "labels" / "cellseg1d")[...]), before)
    assert ngff(group_attrs(path / "labels"))["labels"] == ["cellseg1d"]
    assert sorted(p.name for p in (path / "labels").iterdir() if p.is_dir()) == ["cellseg1d"]
    assert staging_leftovers(path / "labels") == []


def test_rerun_cleans_up_crashed_attempts(tmp_path: Path) -> None:
    """Staging folders of a killed earlier attempt are removed by the next run."""
    path = tmp_path / "img.zarr"
    write_image(path)
    run(tmp_path, path)
    labels = path / "labels"
    (labels / ".cellseg1d.partial-deadbeef0000").mkdir()
    (labels / ".cellseg1d.partial-deadbeef0000" / "junk").write_text("x")
    (labels / ".cellseg1d.replaced-deadbeef0001").mkdir()
    (labels / ".other.partial-keepme").mkdir()  # another label name's staging: not ours to touch
    run(tmp_path, path)
    assert staging_leftovers(labels) == [".other.partial-keepme"]


@pytest.mark.parametrize("version", VERSIONS)
def test_multi_plane_image_unique_ids(tmp_path: Path, version: str) -> None:
    path = tmp_path / "tz.zarr"
    _, mask = write_image(path, "tczyx", version, n_t=2, n_z=3, size=64, n_cells=6)
    pipeline, root = make_pipeline(tmp_path, tmp_path)
    progress: list[tuple[int, int]] = []
    result = pipeline.run(path, root, path, on_plane=lambda done, total: progress.append((done, total)))
    assert result.planes == 6
    assert progress == [(i, 6) for i in range(1, 7)]

    labels = np.asarray(read_labels(path / "labels" / "cellseg1d")[...])
    assert labels.shape == (2, 3, 64, 64)  # t, z, y, x
    seen: set[int] = set()
    for t in range(2):
        for z in range(3):
            ids = set(np.unique(labels[t, z]).tolist()) - {0}
            assert ids, f"plane t={t} z={z} has no objects"
            assert not ids & seen, f"plane t={t} z={z} reuses ids {sorted(ids & seen)}"
            seen |= ids
            assert average_precision(labels[t, z], mask, 0.5)[0].ap >= 0.9
    assert seen == set(range(1, result.object_count + 1))  # sequential over the whole image


@pytest.mark.parametrize("axes", ["yx", "tyx", "zyx"])
def test_labels_for_images_without_channel_axis(tmp_path: Path, axes: str) -> None:
    path = tmp_path / f"{axes}.zarr"
    write_image(path, axes, "0.5", n_t=2 if "t" in axes else 1, n_z=2 if "z" in axes else 1)
    image = open_image(path)
    run(tmp_path, path)
    label_path = path / "labels" / "cellseg1d"
    assert read_labels(label_path).shape == image.shape
    assert [a["name"] for a in ngff(group_attrs(label_path))["multiscales"][0]["axes"]] == list(axes)


@pytest.mark.parametrize("version", VERSIONS)
def test_plate_fields(tmp_path: Path, version: str) -> None:
    plate = tmp_path / "plate.zarr"
    keys = [("A", "1", "0"), ("A", "1", "1"), ("B", "3", "0")]
    fields = {k: make_czyx((48, 48), 4, seed=i)[0][0] for i, k in enumerate(keys)}
    write_plate(plate, fields, axes="czyx", ngff_version=version)

    images = list_images(plate)
    assert images == [plate / r / c / f for r, c, f in keys]
    pipeline, root = make_pipeline(tmp_path, tmp_path)
    for field in images:
        result = pipeline.run(field, root, plate)
        assert Path(result.labels_path) == field / "labels" / "cellseg1d"
        assert result.object_count > 0
    assert not (plate / "labels").exists()
    assert not (plate / "A" / "labels").exists()
    assert list_images(plate) == images  # labels groups are outputs, not images


@pytest.mark.parametrize("version", VERSIONS)
def test_mirror_output_leaves_source_untouched(tmp_path: Path, version: str) -> None:
    acq = tmp_path / "acq"
    mirror = tmp_path / "mirror"
    plate = acq / "run1" / "plate.zarr"
    write_plate(plate, {("A", "1", "0"): make_czyx((48, 48), 4)[0][0]}, ngff_version=version)
    image = acq / "run1" / "img.zarr"
    write_image(image, "czyx", version)
    before = tree_hashes(acq)

    pipeline, root = make_pipeline(tmp_path, acq, output="mirror", mirror_root=mirror)
    r1 = pipeline.run(image, root, image)
    r2 = pipeline.run(plate / "A" / "1" / "0", root, plate)

    assert tree_hashes(acq) == before  # not a byte, not a folder added
    assert Path(r1.labels_path) == mirror / "run1" / "img.zarr" / "labels" / "cellseg1d"
    assert Path(r2.labels_path) == mirror / "run1" / "plate.zarr" / "A" / "1" / "0" / "labels" / "cellseg1d"
    for result, src in ((r1, image), (r2, plate / "A" / "1" / "0")):
        label_path = Path(result.labels_path)
        meta = ngff(group_attrs(label_path))
        assert (label_path / meta["image-label"]["source"]["image"]).resolve() == src.resolve()
        assert read_labels(label_path).shape == open_image(src).shape[1:]
        assert ngff(group_attrs(label_path.parent))["labels"] == ["cellseg1d"]
        nodes = list(Reader(parse_url(str(label_path)))())
        assert any(isinstance(s, Label) for n in nodes for s in n.specs)


@pytest.mark.parametrize("version", VERSIONS)
def test_foreign_label_image_with_our_name_is_refused(tmp_path: Path, version: str) -> None:
    path = tmp_path / "img.zarr"
    write_image(path, "czyx", version)
    fmt = 3 if version == "0.5" else 2
    # A label image someone else (e.g. a manual annotation tool) wrote at labels/cellseg1d.
    labels = zarr.open_group(str(path / "labels"), mode="w", zarr_format=fmt)
    foreign = labels.create_group("cellseg1d")
    foreign.create_array("0", shape=(1, 64, 64), chunks=(1, 64, 64), dtype="uint8", fill_value=0)[...] = 3
    axes = [{"name": "z"}, {"name": "y"}, {"name": "x"}]
    meta = {"multiscales": [{"axes": axes, "datasets": [{"path": "0"}]}],
            "image-label": {"source": {"image": "../../"}}}
    if fmt == 3:
        foreign.attrs["ome"] = {"version": "0.5", **meta}
        labels.attrs["ome"] = {"version": "0.5", "labels": ["cellseg1d"]}
    else:
        foreign.attrs.update(meta)
        labels.attrs["labels"] = ["cellseg1d"]
    before = tree_hashes(path)

    with pytest.raises(ImageError) as err:
        run(tmp_path, path)
    assert str(path / "labels" / "cellseg1d") in str(err.value)
    assert "not written by cellseg1d" in str(err.value)
    assert tree_hashes(path) == before


@pytest.mark.parametrize("version", VERSIONS)
def test_other_label_images_are_kept(tmp_path: Path, version: str) -> None:
    path = tmp_path / "img.zarr"
    write_image(path, "czyx", version)
    fmt = 3 if version == "0.5" else 2
    labels = zarr.open_group(str(path / "labels"), mode="w", zarr_format=fmt)
    manual = labels.create_group("manual")
    manual.create_array("0", shape=(1, 64, 64), chunks=(1, 64, 64), dtype="uint16", fill_value=0)[...] = 1
    if fmt == 3:
        labels.attrs["ome"] = {"version": "0.5", "labels": ["manual"]}
    else:
        labels.attrs["labels"] = ["manual"]
    manual_before = tree_hashes(path / "labels" / "manual")

    run(tmp_path, path)
    run(tmp_path, path)
    assert ngff(group_attrs(path / "labels"))["labels"] == ["manual", "cellseg1d"]
    assert tree_hashes(path / "labels" / "manual") == manual_before


def test_unsafe_labels_name_is_refused(tmp_path: Path) -> None:
    from cellseg1d.errors import ConfigError

    for name in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ConfigError, match="labels_name"):
            build_config({"segmentation": {"labels_name": name}})


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------


def test_find_containers_does_not_follow_links_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    write_image(root / "day1" / "a.zarr", n_levels=1)
    write_image(root / "day1" / "deeper" / "b.ZARR", n_levels=1)  # suffixes are case-insensitive
    write_image(outside / "secret.zarr", n_levels=1)
    (outside / "nested").mkdir()
    write_image(outside / "nested" / "c.zarr", n_levels=1)
    os.symlink(outside, root / "link-to-outside")  # a linked folder
    os.symlink(outside / "secret.zarr", root / "linked.zarr")  # a linked container
    (root / ".hidden").mkdir()
    write_image(root / ".hidden" / "h.zarr", n_levels=1)  # hidden folders are skipped

    found = set(find_containers(root, SUFFIXES))
    assert found == {root / "day1" / "a.zarr", root / "day1" / "deeper" / "b.ZARR"}
    # containers are not descended into: an image nested in an image is not a new container
    write_image(root / "day1" / "a.zarr" / "inner.zarr", n_levels=1)
    assert set(find_containers(root, SUFFIXES)) == found


def test_list_images_does_not_follow_links(tmp_path: Path) -> None:
    plate = tmp_path / "root" / "plate.zarr"
    write_plate(plate, {("A", "1", "0"): make_czyx((32, 32), 2)[0][0]}, n_levels=1)
    write_image(tmp_path / "outside" / "field", n_levels=1)
    os.symlink(tmp_path / "outside" / "field", plate / "A" / "1" / "9")
    assert list_images(plate) == [plate / "A" / "1" / "0"]


def test_container_of(tmp_path: Path) -> None:
    root = tmp_path / "root"
    chunk = root / "x" / "y.zarr" / "A" / "1" / "0" / "c" / "0"
    assert container_of(chunk, root, SUFFIXES) == root / "x" / "y.zarr"
    assert container_of(root / "x" / "y.zarr", root, SUFFIXES) == root / "x" / "y.zarr"
    assert container_of(root / "a.zarr" / "b.zarr" / "0", root, SUFFIXES) == root / "a.zarr"  # outermost
    assert container_of(root / "x" / "Y.OME.ZARR" / "0", root, [".ome.zarr"]) == root / "x" / "Y.OME.ZARR"
    assert container_of(root / "x" / "notes.txt", root, SUFFIXES) is None
    assert container_of(root, root, SUFFIXES) is None
    assert container_of(tmp_path / "elsewhere" / "z.zarr", root, SUFFIXES) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_list_images_skips_labels(tmp_path: Path, version: str) -> None:
    path = tmp_path / "img.zarr"
    write_image(path, "czyx", version)
    run(tmp_path, path)
    assert (path / "labels" / "cellseg1d").is_dir()
    assert list_images(path) == [path]
    # a plate whose fields have labels
    plate = tmp_path / "plate.zarr"
    write_plate(plate, {("A", "1", "0"): make_czyx((32, 32), 2)[0][0],
                        ("A", "2", "0"): make_czyx((32, 32), 2, seed=1)[0][0]}, ngff_version=version)
    for field in list_images(plate):
        run(tmp_path, field, container=plate)
    assert list_images(plate) == [plate / "A" / "1" / "0", plate / "A" / "2" / "0"]


# --------------------------------------------------------------------------
# Large images: one plane at a time
# --------------------------------------------------------------------------


def test_large_image_reads_only_the_requested_plane(tmp_path: Path) -> None:
    """A 1 x 3 x 2048 x 2048 image whose other planes are unreadable: reading z=1 never touches them."""
    path = tmp_path / "big.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = group.create_array("0", shape=(1, 3, 2048, 2048), chunks=(1, 1, 512, 512), dtype="uint16",
                             fill_value=0, dimension_names=list("czyx"))
    group.attrs["ome"] = {"version": "0.5", "multiscales": [
        {"axes": [{"name": a} for a in "czyx"], "datasets": [{"path": "0"}]}]}
    plane = np.random.default_rng(0).integers(0, 4000, (2048, 2048), dtype=np.uint16)
    arr[0, 1] = plane
    # Every chunk of planes 0 and 2 is garbage: decoding any of them would raise.
    for z in (0, 2):
        for cy in range(4):
            for cx in range(4):
                chunk = path / "0" / "c" / "0" / str(z) / str(cy) / str(cx)
                chunk.parent.mkdir(parents=True, exist_ok=True)
                chunk.write_bytes(b"not a zstd frame" * 8)

    image = open_image(path)
    assert image.shape == (1, 3, 2048, 2048)
    got = image.read_plane(0, 1, [0])
    assert got.shape == (1, 2048, 2048)
    np.testing.assert_array_equal(got[0], plane)
    with pytest.raises(ImageError, match="t=0 z=2"):
        image.read_plane(0, 2, [0])
