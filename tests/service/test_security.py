"""Security: links out of a watched root are never followed, outputs never written through links,
and the state dir and catalog are private to the service user."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from cellseg1d.config import build_config
from cellseg1d.errors import ImageError
from cellseg1d.ngff.discover import find_containers, link_on_the_way, list_images
from cellseg1d.ngff.labels import LabelsTarget, StagedLabels
from cellseg1d.ngff.reader import open_image
from cellseg1d.service.watch import ImageTracker, Watcher, tree_signature
from tests import badinput
from tests.service.test_bad_input import tree_hashes


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------
# State dir and catalog
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pre_existing", [False, True])
def test_state_dir_and_catalog_are_private(tmp_path: Path, pre_existing: bool) -> None:
    """0700 state dir, 0600 catalog and lock file, even under umask 000 or a state dir made 0755."""
    from cellseg1d.service.daemon import Daemon

    acq = tmp_path / "acq"
    acq.mkdir()
    state = tmp_path / "state"
    if pre_existing:
        state.mkdir(mode=0o755)
        os.chmod(state, 0o755)
    old_umask = os.umask(0)
    try:
        daemon = Daemon(build_config({"state_dir": str(state), "watch": {"roots": [{"path": str(acq)}]}}))
    finally:
        os.umask(old_umask)
    try:
        assert _mode(state) == 0o700
        catalog = state / "catalog.sqlite"
        assert catalog.is_file() and _mode(catalog) & 0o077 == 0, oct(_mode(catalog))
        assert _mode(state / "daemon.lock") & 0o077 == 0
    finally:
        daemon.catalog.close()
        daemon.lock.release()


# --------------------------------------------------------------------------
# Links out of a watched root: not discovered, not read
# --------------------------------------------------------------------------


def _outside_image(tmp_path: Path) -> Path:
    return badinput.good_image(tmp_path / "outside" / "secret.zarr", "0.5")


def test_events_through_links_are_ignored(tmp_path: Path, acquisition: Path) -> None:
    """Events under a linked folder or linked container never make a container known."""
    secret = _outside_image(tmp_path)
    os.symlink(secret.parent, acquisition / "linked-folder")
    os.symlink(secret, acquisition / "linked.zarr")
    tracker = ImageTracker([acquisition], [".zarr"], 0)
    tracker.touch(acquisition / "linked-folder" / "secret.zarr" / "zarr.json")
    tracker.touch(acquisition / "linked.zarr" / "0" / "zarr.json")
    assert tracker.events_seen == 0
    ready, problems = tracker.poll()
    assert ready == [] and problems == []
    assert link_on_the_way(acquisition / "linked-folder" / "secret.zarr", acquisition) == acquisition / "linked-folder"
    assert link_on_the_way(acquisition / "plain.zarr", acquisition) is None


def test_container_replaced_by_a_link_is_forgotten(tmp_path: Path, acquisition: Path) -> None:
    """A known container that becomes a link to elsewhere is dropped, not listed through the link."""
    secret = _outside_image(tmp_path)
    image = badinput.good_image(acquisition / "swap.zarr", "0.5")
    tracker = ImageTracker([acquisition], [".zarr"], 0)
    tracker.touch(image / "zarr.json", when=0.0)
    ready, _ = tracker.poll(now=10.0)
    assert [c.image for c in ready] == [image]
    tracker.settled(ready[0])
    os.rename(image, tmp_path / "moved.zarr")
    os.symlink(secret, image)
    tracker.rescan()
    tracker.touch(image / "zarr.json", when=11.0)
    ready, problems = tracker.poll(now=20.0)
    assert ready == [] and problems == []
    assert tracker.pending() == 0


def test_links_inside_an_image_that_leave_it_are_refused(tmp_path: Path) -> None:
    """A chunk, an array or the labels folder linked to outside: open_image refuses, reads nothing."""
    for kind in ("link_out_chunk", "link_out_array", "link_out_labels"):
        bad = badinput.KINDS[kind](tmp_path / "root", "0.4")
        with pytest.raises(ImageError, match="points outside the image") as err:
            open_image(bad.path)
        bad.check_message(str(err.value))


def test_labels_are_never_written_through_links(tmp_path: Path) -> None:
    """labels/ or labels/<name> being a link (made after the image was opened) is refused; outside untouched."""
    image_path = badinput.good_image(tmp_path / "img.zarr", "0.5")
    image = open_image(image_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not yours")
    before = tree_hashes(outside)

    os.symlink(outside, image_path / "labels")
    with pytest.raises(ImageError, match="symbolic link"):
        StagedLabels.create(image, LabelsTarget(image_path, "cellseg1d"))
    os.unlink(image_path / "labels")

    (image_path / "labels").mkdir()
    os.symlink(outside, image_path / "labels" / "cellseg1d")
    with pytest.raises(ImageError, match="symbolic link"):
        StagedLabels.create(image, LabelsTarget(image_path, "cellseg1d"))
    assert tree_hashes(outside) == before


# --------------------------------------------------------------------------
# Link loops: nothing hangs
# --------------------------------------------------------------------------


def _make_loops(acquisition: Path) -> Path:
    """Loops in the root (to the root, to a parent, to itself) and inside a valid container."""
    os.symlink(acquisition, acquisition / "loop-to-root")
    (acquisition / "day1").mkdir()
    os.symlink("..", acquisition / "day1" / "up")
    os.symlink("self", acquisition / "self")
    os.symlink("b.zarr", acquisition / "a.zarr")  # a <-> b: both dangling loops named like containers
    os.symlink("a.zarr", acquisition / "b.zarr")
    image = badinput.good_image(acquisition / "day1" / "ok.zarr", "0.5")
    os.symlink("..", image / "0" / "up")
    return image


def test_link_loops_do_not_hang_discovery_or_walks(acquisition: Path) -> None:
    image = _make_loops(acquisition)
    started = time.monotonic()
    assert list(find_containers(acquisition, [".zarr"])) == [image]
    assert list_images(image) == [image]
    assert tree_signature(acquisition).files > 0
    assert open_image(image).missing_chunks()[0] == 0
    assert time.monotonic() - started < 5


def test_watcher_on_a_root_with_loops(acquisition: Path) -> None:
    """A real observer watching a root full of loops starts, reports the image, and stops."""
    image = _make_loops(acquisition)
    tracker = ImageTracker([acquisition], [".zarr"], 0.2)
    watcher = Watcher(tracker)
    watcher.start()
    try:
        assert tracker.rescan() == 1
        (image / "note.txt").write_text("event")
        deadline = time.monotonic() + 10
        found: list[Path] = []
        while not found and time.monotonic() < deadline:
            time.sleep(0.3)
            ready, _ = tracker.poll()
            found = [c.image for c in ready]
        assert found == [image]
    finally:
        watcher.stop()
    assert not watcher.observer.is_alive()
