"""Malformed OME-Zarr input: every kind ends as a clear ImageError, never a crash.

Three levels:

* unit: ``open_image`` / ``missing_chunks`` / ``read_plane`` / ``Pipeline.run`` on
  each kind of bad input (see tests/badinput.py) raise ImageError naming the
  file or folder at fault and the problem, and leave the source untouched;
* readiness: the daemon's ``_consider`` (in-process) records each image that
  fails at readiness as a quarantined job with that message;
* daemon (slow): one ``cellseg1d run`` subprocess with every bad container and
  some good images arriving before and after it starts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cellseg1d.config import build_config
from cellseg1d.errors import ImageError
from cellseg1d.ngff.discover import list_images
from cellseg1d.ngff.reader import open_image
from cellseg1d.pipeline import Pipeline
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr
from tests import badinput
from tests.badinput import CASES, GOOD_CONTROLS, KINDS, BadInput
from tests.helpers import image_status, jobs_for, wait_for

def case_id(case: tuple[str, str]) -> str:
    return f"{case[0]}-v{case[1]}"


def tree_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``.

    Links are not followed: a link is recorded by its target, so a link loop or a
    link out of the tree is hashed like any file. A file this process cannot read
    (chmod 000) is recorded by its size, mode and mtime.
    """
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if (Path(dirpath) / d).is_symlink()]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
                continue
            try:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            except PermissionError:
                st = p.stat()
                out[rel] = f"unreadable {st.st_size} {st.st_mode:o} {st.st_mtime_ns}"
    return out


def assert_unchanged_but_labels_group(folder: Path, before: dict[str, str]) -> None:
    """Nothing under ``folder`` changed: a failed job removes even the labels group it created."""
    after = tree_hashes(folder)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(set(after) - set(before))
    assert not changed, f"{folder}: files changed or removed: {changed}"
    assert not added, f"{folder}: unexpected new files: {added}"
    labels = folder / "labels"
    if labels.is_dir() and not labels.is_symlink():
        had = {Path(k).parts[1] for k in before if Path(k).parts[0] == "labels" and len(Path(k).parts) > 2}
        leftovers = [p.name for p in labels.iterdir() if p.is_dir() and p.name not in had]
        assert not leftovers, f"{folder}: label folders left behind: {leftovers}"


def assert_only_labels_changed(folder: Path, before: dict[str, str]) -> None:
    """Every file outside ``labels/`` is as it was (a processed image gains only its labels group)."""
    after = tree_hashes(folder)
    outside = {k: v for k, v in after.items() if Path(k).parts[0] != "labels"}
    expected = {k: v for k, v in before.items() if Path(k).parts[0] != "labels"}
    assert outside == expected, (
        f"{folder}: files outside labels/ changed: "
        f"{sorted(set(outside.items()) ^ set(expected.items()))[:10]}"
    )


def make_pipeline(tmp_path: Path, root: Path) -> tuple[Pipeline, object]:
    config = build_config({
        "state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(root)}]},
        "segmentation": {"channels": badinput.CONFIG_CHANNELS},
    })
    return Pipeline(config, build_plugin_manager()), config.watch.roots[0]


# --------------------------------------------------------------------------
# Unit level
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_raises_clear_image_error(tmp_path: Path, case: tuple[str, str]) -> None:
    kind, version = case
    bad: BadInput = KINDS[kind](tmp_path, version)
    before = tree_hashes(bad.path)
    pipeline, root = make_pipeline(tmp_path, tmp_path)

    if bad.stage in ("open", "list"):
        with pytest.raises(ImageError) as err:
            open_image(bad.path)
        bad.check_message(str(err.value))
    if bad.stage == "list":
        assert list_images(bad.path) == []  # the container holds no image at all
    if bad.stage in ("chunks", "read", "job"):
        image = open_image(bad.path)  # metadata is fine ...
        assert image.fingerprint
        t0 = time.perf_counter()
        missing, total = image.missing_chunks()
        # Counted from the files on disk, not by enumerating the declared chunk grid.
        assert time.perf_counter() - t0 < 2.0
        if bad.stage == "chunks":  # ... but some level-0 chunks are gone (or never written)
            assert (missing, total) == bad.missing
        else:
            assert missing == 0
    if bad.stage == "read":  # ... but the pixels of channel 0, plane (0, 0) cannot be decoded
        with pytest.raises(ImageError) as err:
            image.read_plane(0, 0, [0])
        bad.check_message(str(err.value))
        assert "t=0 z=0" in str(err.value)

    if bad.stage == "chunks":
        # Missing chunks read as the fill value (they may be skipped empty chunks, see
        # readiness.allow_missing_chunks); the daemon rejects them at readiness instead.
        if total <= 64:  # (not the billion planes of huge_shape)
            result = pipeline.run(bad.path, root, bad.path)
            assert result.planes == 1
        return
    with pytest.raises(ImageError) as err:
        pipeline.run(bad.path, root, bad.path)
    bad.check_message(str(err.value))
    assert_unchanged_but_labels_group(bad.path, before)


def test_float32_is_a_valid_input(tmp_path: Path) -> None:
    """Positive control for the dtype cases: float32 pixels (0..1) are segmented."""
    pipeline, root = make_pipeline(tmp_path, tmp_path)
    for version in ("0.4", "0.5"):
        path = GOOD_CONTROLS["float32"](tmp_path, version)
        image = open_image(path)
        assert image.dtype == np.float32
        plane = image.read_plane(0, 0, [0])
        assert plane.dtype == np.float32 and plane.shape == (1, badinput.SIZE, badinput.SIZE)
        result = pipeline.run(path, root, path)
        # Every one of the well-separated synthetic cells is found (as with uint16).
        assert result.object_count == badinput.N_CELLS
        assert (path / "labels" / "cellseg1d").is_dir()


def test_corrupt_chunk_does_not_hide_other_planes(tmp_path: Path) -> None:
    """Only the plane whose chunk is bad fails; the others read fine."""
    bad = KINDS["corrupt_chunk"](tmp_path, "0.5")
    image = open_image(bad.path)
    assert image.read_plane(0, 0, [1]).shape == (1, badinput.SIZE, badinput.SIZE)  # channel 1 is intact
    with pytest.raises(ImageError):
        image.read_plane(0, 0, [1, 0])


def test_storage_error_stays_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError with an errno (disk, network share) is not turned into a permanent ImageError."""
    from zarr.storage import LocalStore

    path = badinput.good_image(tmp_path / "img.zarr", "0.5", chunks=(1, 1, 32, 32))
    image = open_image(path)

    async def failing_get(self, key, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", key)

    monkeypatch.setattr(LocalStore, "get", failing_get)
    with pytest.raises(OSError) as err:
        image.read_plane(0, 0, [0])
    assert err.value.errno == errno.EIO and not isinstance(err.value, ImageError)


def test_bad_labels_group_is_not_published_into(tmp_path: Path) -> None:
    """A damaged labels group fails the job before any label image is moved into it."""
    for version in ("0.4", "0.5"):
        bad = KINDS["bad_labels_group"](tmp_path, version)
        pipeline, root = make_pipeline(tmp_path, tmp_path)
        with pytest.raises(ImageError):
            pipeline.run(bad.path, root, bad.path)
        assert sorted(p.name for p in (bad.path / "labels").iterdir()) == sorted(
            [".zgroup", ".zattrs"] if version == "0.4" else ["zarr.json"]
        )


# --------------------------------------------------------------------------
# Readiness (in-process daemon, no subprocess)
# --------------------------------------------------------------------------


def test_readiness_rejects_bad_images_as_quarantined_jobs(tmp_path: Path) -> None:
    """Daemon._consider records every image that fails at readiness as a quarantined job."""
    from cellseg1d.service.daemon import Daemon
    from cellseg1d.service.watch import Candidate, tree_signature

    acq = (tmp_path / "acq").resolve()
    acq.mkdir()
    bads = [b for b in badinput.write_all(acq) if b.stage in ("open", "chunks")]
    state = tmp_path / "state"
    config = build_config({
        "state_dir": str(state), "watch": {"roots": [{"path": str(acq)}]},
        "readiness": {"settle_seconds": 0},
    })
    daemon = Daemon(config)
    try:
        for bad in bads:
            cand = Candidate(bad.path, bad.path, 0, float("-inf"), signature=tree_signature(bad.path))
            # First look: bad metadata is looked at once more (a writer may be mid-rename);
            # missing chunks wait for readiness.incomplete_after_seconds (default 1 h).
            daemon._consider(cand)
            assert jobs_for(state, str(bad.path)) == []
            assert cand.next_check > time.monotonic()
            daemon.config.readiness.incomplete_after_seconds = 0
            daemon._consider(cand)
            daemon.config.readiness.incomplete_after_seconds = 3600
            jobs = jobs_for(state, str(bad.path))
            assert len(jobs) == 1, (bad.kind, jobs)
            job_state, attempts, error, plugin = jobs[0]
            assert (job_state, attempts, plugin) == ("quarantined", 0, None)
            bad.check_message(error)
            assert cand.next_check == float("inf")  # not looked at again unless it changes
        statuses = image_status(state)
        assert {statuses[str(b.path)] for b in bads} == {"failed"}
    finally:
        daemon.catalog.close()
        daemon.lock.release()


# --------------------------------------------------------------------------
# Daemon level
# --------------------------------------------------------------------------


def _write_good(folder: Path, name: str, version: str, seed: int) -> Path:
    return badinput.good_image(folder / name, version, seed=seed)


def _mount_small_tmpfs(mnt: Path) -> bool:
    """Mount a 1 MiB tmpfs at ``mnt``; False where that is not allowed."""
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True)
    return proc.returncode == 0


@pytest.mark.slow
def test_daemon_survives_every_kind_of_bad_input(tmp_path: Path, acquisition: Path, daemons) -> None:
    """One daemon, every kind of bad input and the good controls, arriving before and after it starts.

    Each ends as a quarantined job whose error names the file and the problem, or (good
    controls, and the dynamic cases where the writer recovers) as done; every source
    is untouched apart from its labels group; links out of the root are never
    followed; the daemon stays alive and logs no traceback.
    """
    started = time.monotonic()
    acq = acquisition.resolve()
    staging = tmp_path / "staging"
    staging.mkdir()
    state = tmp_path / "state"
    denied = badinput.reads_can_be_denied()  # root reads chmod 000 files: then they are good inputs

    # Writers: every bad case, the good controls and two plain good images.
    writers = [(lambda f, k=k, v=v: KINDS[k](f, v)) for k, v in CASES + badinput.PERMISSION_CASES]
    writers += [(lambda f, c=c, v=v: GOOD_CONTROLS[c](f, v)) for c in GOOD_CONTROLS for v in ("0.4", "0.5")]
    writers += [lambda f: _write_good(f, "good-04.zarr", "0.4", 1),
                lambda f: _write_good(f, "good-05.zarr", "0.5", 2)]
    before_start, after_start = writers[0::2], writers[1::2]

    # Links out of the root and link loops in it: never discovered, never hang a walk.
    outside = tmp_path / "outside"
    secret = badinput.good_image(outside / "secret.zarr", "0.5")
    os.symlink(outside, acq / "linked-folder")
    os.symlink(secret, acq / "linked.zarr")
    os.symlink(acq, acq / "loop-to-root")
    os.symlink("self.zarr", acq / "self.zarr")
    outside_before = tree_hashes(outside)

    # Disk full on output: an image on a full 1 MiB tmpfs inside the root (where mounting works).
    full_mnt = acq / "full-disk"
    full_image: Path | None = None
    if _mount_small_tmpfs(full_mnt):
        full_image = badinput.good_image(full_mnt / "full.zarr", "0.5")
        _fill(full_mnt, 0)
    try:
        hashes: dict[str, dict[str, str]] = {}  # container name -> file hashes as written
        results: list[BadInput | Path] = []
        for w in before_start:
            made = w(acq)
            path = made.path if isinstance(made, BadInput) else made
            hashes[path.name] = tree_hashes(path)
            results.append(made)
        if full_image is not None:
            hashes[full_image.name] = tree_hashes(full_image)
        # Missing chunks are waited for (a time-lapse may add them) before the image counts as
        # truncated: shorten that wait from its one-hour default; retry disk-full at once.
        d = daemons(state, "--watch", str(acq), "--settle-seconds", "0.5", "--channel", "nuclei",
                    env={"CELLSEG1D_READINESS__INCOMPLETE_AFTER_SECONDS": "2",
                         "CELLSEG1D_JOBS__RETRY_BACKOFF_SECONDS": "0"})
        for w in after_start:
            # Written elsewhere, then moved in whole (as a copy tool would), so that the daemon
            # never sees a good image that is broken a moment later.
            made = w(staging)
            path = made.path if isinstance(made, BadInput) else made
            hashes[path.name] = tree_hashes(path)
            os.rename(path, acq / path.name)
            if isinstance(made, BadInput):
                made = BadInput(made.kind, made.version, acq / path.name, made.culprit, made.words, made.stage)
            else:
                made = acq / path.name
            results.append(made)

        # Metadata rewritten in place: first seen cut in half, then whole (must end done).
        rewritten = badinput.good_image(staging / "rewritten.zarr", "0.4", seed=5)
        meta_text = (rewritten / ".zattrs").read_text()
        (rewritten / ".zattrs").write_text(meta_text[: len(meta_text) // 2])
        rewritten = Path(shutil.move(str(rewritten), acq / "rewritten.zarr"))
        # Deleted while processing: many planes, removed once the daemon has started on it.
        data, _ = make_czyx((256, 256), 20, n_z=60, seed=6)
        doomed = write_ome_zarr(staging / "doomed.zarr", data[0], axes="czyx", ngff_version="0.5",
                                channel_names=badinput.CHANNEL_NAMES, n_levels=1)
        doomed = Path(shutil.move(str(doomed), acq / "doomed.zarr"))
        time.sleep(1.5)  # past the first look at the rewritten metadata
        (rewritten / ".zattrs").write_text(meta_text)
        hashes[rewritten.name] = tree_hashes(rewritten)
        wait_for(lambda: f"processing {doomed}" in d.log(), 60, interval=0.05, what="doomed image started")
        while doomed.exists():  # the daemon may be writing its labels staging in it right now
            shutil.rmtree(doomed, ignore_errors=True)

        bads = [r for r in results if isinstance(r, BadInput)]
        goods = [r for r in results if isinstance(r, Path)] + [rewritten]
        assert len(goods) == 2 * len(GOOD_CONTROLS) + 3 and len(bads) == len(CASES) + len(badinput.PERMISSION_CASES)
        every = [str(b.path) for b in bads] + [str(g) for g in goods]
        every += [str(full_image)] if full_image is not None else []

        def finished() -> bool:
            status = image_status(state)
            # The rewritten image may be rejected once, caught mid-rewrite, before it is queued.
            return status.get(str(rewritten)) == "done" and all(
                status.get(p) in ("done", "failed") for p in every)

        try:
            wait_for(finished, 90, interval=0.25, what="every image done or failed")
        except AssertionError:
            status = image_status(state)
            pending = {p: status.get(p) for p in every if status.get(p) not in ("done", "failed")}
            raise AssertionError(f"not finished: {pending}\n--- daemon log ---\n{d.log()[-6000:]}") from None

        status = image_status(state)
        for good in goods:
            assert status[str(good)] == "done", (good, jobs_for(state, str(good)), d.log()[-3000:])
            assert jobs_for(state, str(good))[-1][0] == "done"
            assert (good / "labels" / "cellseg1d").is_dir()
            assert_only_labels_changed(good, hashes[good.name])
        for bad in bads:
            if bad.kind in badinput.PERMISSION_KINDS and not denied:
                assert status[str(bad.path)] == "done", (bad.kind, jobs_for(state, str(bad.path)))
                assert_only_labels_changed(bad.path, hashes[bad.name])
                continue
            assert status[str(bad.path)] == "failed", (bad.kind, bad.version, jobs_for(state, str(bad.path)))
            jobs = jobs_for(state, str(bad.path))
            assert [j[0] for j in jobs] == ["quarantined"], (bad.kind, jobs)
            bad.check_message(jobs[0][2])  # names the container (or a file in it) and the problem
            assert_unchanged_but_labels_group(bad.path, hashes[bad.name])
        if full_image is not None:
            jobs = jobs_for(state, str(full_image))
            assert [j[0] for j in jobs] == ["quarantined"], jobs
            assert "no space left" in jobs[0][2] and str(full_image / "labels") in jobs[0][2], jobs
            assert_unchanged_but_labels_group(full_image, hashes[full_image.name])

        # The deleted image: a clear failure (or done, had it finished first); nothing recreated it.
        doomed_jobs = jobs_for(state, str(doomed))
        assert doomed_jobs and doomed_jobs[-1][0] in ("quarantined", "done"), doomed_jobs
        if doomed_jobs[-1][0] == "quarantined":
            assert "deleted" in doomed_jobs[-1][2] and str(doomed) in doomed_jobs[-1][2], doomed_jobs
        assert not doomed.exists()

        # Nothing under a link was recorded, read or written.
        recorded = set(image_status(state))
        for link in ("linked-folder", "linked.zarr", "loop-to-root", "self.zarr"):
            assert not [p for p in recorded if p.startswith(str(acq / link))], (link, sorted(recorded))
        assert tree_hashes(outside) == outside_before

        assert d.alive(), d.log()[-3000:]
        log = d.log()
        assert "unexpected error" not in log and "Traceback" not in log, log[-6000:]
        assert d.stop() == 0
        assert time.monotonic() - started < 120
    finally:
        if full_image is not None:
            subprocess.run(["umount", "-l", str(full_mnt)], check=False)


# --------------------------------------------------------------------------
# Unreadable files (chmod 000)
# --------------------------------------------------------------------------

_PERMISSION_SCRIPT = """
import json, sys
from pathlib import Path
from cellseg1d.errors import ImageError
from tests.service.test_bad_input import make_pipeline
path, tmp = Path(sys.argv[1]), Path(sys.argv[2])
pipeline, root = make_pipeline(tmp, path.parent)
try:
    result = pipeline.run(path, root, path)
    print(json.dumps({"objects": result.object_count}))
except ImageError as err:
    print(json.dumps({"error": str(err)}))
"""


def _denied_reads_prefix() -> list[str] | None:
    """Command prefix under which chmod 000 stops reads: none needed, setpriv for root, or None."""
    if badinput.reads_can_be_denied():
        return []
    if os.geteuid() == 0 and shutil.which("setpriv"):
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


@pytest.mark.parametrize("case", badinput.PERMISSION_CASES, ids=case_id)
def test_unreadable_files_fail_with_a_clear_error(tmp_path: Path, case: tuple[str, str]) -> None:
    """chmod 000 on the metadata or on a chunk: the job fails naming the file and 'permission denied'.

    Root reads any file (CAP_DAC_OVERRIDE): there the check runs in a subprocess without
    that capability (setpriv), and is skipped only where that is impossible.
    """
    prefix = _denied_reads_prefix()
    if prefix is None:
        pytest.skip("running as root with CAP_DAC_OVERRIDE and no setpriv: chmod 000 does not stop reads")
    bad = KINDS[case[0]](tmp_path, case[1])
    before = tree_hashes(bad.path)
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", _PERMISSION_SCRIPT, str(bad.path), str(tmp_path)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" in outcome, outcome
    bad.check_message(outcome["error"])
    assert "read access" in outcome["error"]  # says what to do
    assert_unchanged_but_labels_group(bad.path, before)


def test_unreadable_files_are_processed_where_reads_are_allowed(tmp_path: Path) -> None:
    """Where chmod 000 does not stop reads (root), the permission kinds are correct inputs."""
    if badinput.reads_can_be_denied():
        pytest.skip("chmod 000 stops reads here: covered by test_unreadable_files_fail_with_a_clear_error")
    pipeline, root = make_pipeline(tmp_path, tmp_path)
    for kind, version in badinput.PERMISSION_CASES:
        bad = KINDS[kind](tmp_path, version)
        before = tree_hashes(bad.path)
        assert pipeline.run(bad.path, root, bad.path).object_count == badinput.N_CELLS
        assert_only_labels_changed(bad.path, before)


# --------------------------------------------------------------------------
# Metadata rewritten while it is read
# --------------------------------------------------------------------------


def _rewrite_in_place(meta: Path, text: str) -> None:
    """Rewrite ``meta`` non-atomically, as a naive writer does: truncate, write half, then the rest."""
    with open(meta, "w") as fh:
        fh.write(text[: len(text) // 2])
        fh.flush()
        time.sleep(0.002)
        fh.write(text[len(text) // 2:])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_metadata_rewritten_mid_read(tmp_path: Path, version: str) -> None:
    """While a writer keeps rewriting the metadata in place, every run ends as a result or an ImageError."""
    path = badinput.good_image(tmp_path / "rewritten.zarr", version)
    meta = path / ("zarr.json" if version == "0.5" else ".zattrs")
    first = meta.read_text()
    doc = json.loads(first)
    (doc["attributes"]["ome"] if version == "0.5" else doc)["acquisition"] = {"pass": 2}
    second = json.dumps(doc, indent=2)
    before = {k: v for k, v in tree_hashes(path).items() if k != meta.name}
    pipeline, root = make_pipeline(tmp_path, tmp_path)

    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            for text in (first, second):
                _rewrite_in_place(meta, text)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    outcomes: dict[str, int] = {"done": 0, "error": 0}
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline or not outcomes["done"]:
            try:
                result = pipeline.run(path, root, path)
            except ImageError as err:
                assert str(path) in str(err), err  # names the image (or its metadata file)
                outcomes["error"] += 1
            else:
                assert result.object_count == badinput.N_CELLS
                outcomes["done"] += 1
            assert time.monotonic() < deadline + 30, outcomes
    finally:
        stop.set()
        thread.join()
    _rewrite_in_place(meta, second)
    assert pipeline.run(path, root, path).object_count == badinput.N_CELLS
    after = tree_hashes(path)
    assert {k: v for k, v in after.items() if k != meta.name and not k.startswith("labels")} == before
    assert not [p for p in (path / "labels").iterdir() if p.name.startswith(".cellseg1d.")]  # no staging left


def test_readiness_waits_for_metadata_being_rewritten(tmp_path: Path) -> None:
    """Metadata found half-written at readiness is looked at once more; rewritten whole, it is queued."""
    from cellseg1d.service.daemon import Daemon
    from cellseg1d.service.watch import Candidate, tree_signature

    acq = (tmp_path / "acq").resolve()
    acq.mkdir()
    path = badinput.good_image(acq / "rewritten.zarr", "0.5")
    meta = path / "zarr.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])  # caught mid-rewrite
    state = tmp_path / "state"
    daemon = Daemon(build_config({
        "state_dir": str(state), "watch": {"roots": [{"path": str(acq)}]}, "readiness": {"settle_seconds": 0},
    }))
    try:
        cand = Candidate(path, path, 0, float("-inf"), signature=tree_signature(path))
        daemon._consider(cand)
        assert jobs_for(state, str(path)) == []  # not rejected on the first look
        meta.write_text(text)
        cand.signature = tree_signature(path)
        daemon._consider(cand)
        assert [j[0] for j in jobs_for(state, str(path))] == ["queued"]
    finally:
        daemon.catalog.close()
        daemon.lock.release()


# --------------------------------------------------------------------------
# Image deleted while being processed
# --------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["after_first_plane", "after_last_plane"])
def test_image_deleted_while_processing(tmp_path: Path, when: str) -> None:
    """The job fails with an ImageError saying so; no folder of the deleted image comes back."""
    data, _ = make_czyx((badinput.SIZE, badinput.SIZE), badinput.N_CELLS, n_z=4)
    path = write_ome_zarr(tmp_path / "deleted.zarr", data[0], axes="czyx", ngff_version="0.5",
                          channel_names=badinput.CHANNEL_NAMES)
    pipeline, root = make_pipeline(tmp_path, tmp_path)

    def on_plane(done: int, total: int) -> None:
        if (when == "after_first_plane" and done == 1) or (when == "after_last_plane" and done == total):
            shutil.rmtree(path)

    with pytest.raises(ImageError) as err:
        pipeline.run(path, root, path, on_plane=on_plane)
    message = str(err.value)
    assert str(path) in message and "deleted" in message, message
    assert not path.exists()  # nothing recreated it (zarr makes missing parent folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"] or sorted(
        p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# Disk full while writing labels
# --------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at ``tmp_path/small`` (skips where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the failing-writer test covers it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave_pages: int) -> None:
    """Fill the file system at ``mnt`` with 4 KiB files, then free ``leave_pages`` of them."""
    filler = mnt / "filler"
    filler.mkdir()
    made = []
    block = b"\1" * 4096
    while True:
        f = filler / str(len(made))
        try:
            f.write_bytes(block)
        except OSError as err:
            assert err.errno == errno.ENOSPC
            f.unlink(missing_ok=True)
            break
        made.append(f)
    for f in made[:leave_pages]:
        f.unlink()


def _check_disk_full(err: OSError, path: Path, before: dict[str, str]) -> None:
    message = f"{type(err).__name__}: {err}"
    assert err.errno in (errno.ENOSPC, errno.EDQUOT), message
    assert "no space left" in message and str(path / "labels" / "cellseg1d") in message, message
    assert_unchanged_but_labels_group(path, before)
    assert not (path / "labels").exists()  # the labels group this job made is gone again


@pytest.mark.parametrize("leave_pages", [0, 3, 5, 6])
def test_disk_full_on_a_small_tmpfs(small_tmpfs: Path, tmp_path: Path, leave_pages: int) -> None:
    """Label writing runs out of space (at once, or part-way): clear error, nothing partial, source intact."""
    path = badinput.good_image(small_tmpfs / "full.zarr", "0.5", chunks=(1, 1, 16, 16))
    before = tree_hashes(path)
    _fill(small_tmpfs, leave_pages)
    pipeline, root = make_pipeline(tmp_path, small_tmpfs)
    with pytest.raises(OSError) as err:
        pipeline.run(path, root, path)
    _check_disk_full(err.value, path, before)
    shutil.rmtree(small_tmpfs / "filler")  # space again: the retried job succeeds
    assert pipeline.run(path, root, path).object_count == badinput.N_CELLS
    assert_only_labels_changed(path, before)


def test_disk_full_failing_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same without a tmpfs: the zarr store refuses writes with ENOSPC after a few files."""
    from zarr.storage import LocalStore

    path = badinput.good_image(tmp_path / "full.zarr", "0.4")
    before = tree_hashes(path)
    pipeline, root = make_pipeline(tmp_path, tmp_path)
    real_set = LocalStore.set
    writes = {"n": 0}

    async def set_until_full(self, key, value, *args, **kwargs):
        writes["n"] += 1
        if writes["n"] > 2:
            target = Path(str(self.root)) / key
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return await real_set(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", set_until_full)
    with pytest.raises(OSError) as err:
        pipeline.run(path, root, path)
    _check_disk_full(err.value, path, before)
