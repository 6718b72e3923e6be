"""One bad container never stalls the rest: discovery, listing, readiness and logging are per item.

Unit level: the real :class:`ImageTracker` on real folders with pathological
containers beside good ones; the :class:`RepeatLimiter` over ten simulated
minutes. Daemon level (slow): a ``cellseg1d run`` subprocess receives the
pathological containers first and good images after them, with a rescan every
half second, and must process every good image, record each bad one once and
keep its log bounded.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from cellseg1d.service.logs import RepeatLimiter
from cellseg1d.service.watch import ImageTracker
from tests import badinput
from tests.helpers import image_status, jobs_for, wait_for


def good(path: Path, version: str = "0.5", seed: int = 1) -> Path:
    return badinput.good_image(path, version, seed=seed)


def plate(path: Path, fields: int = 2) -> list[Path]:
    """A minimal HCS-like plate: row A, column 1, ``fields`` image groups."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update({"ome": {"version": "0.5", "plate": {"rows": [{"name": "A"}], "columns": [{"name": "1"}],
                                                            "wells": [{"path": "A/1"}]}}})
    well = group.create_group("A").create_group("1")
    well.attrs.update({"ome": {"version": "0.5", "well": {"images": [{"path": str(i)} for i in range(fields)]}}})
    return [good(path / "A" / "1" / str(i), seed=i + 1) for i in range(fields)]


def poll_quiet(tracker: ImageTracker) -> tuple[list, list]:
    """One rescan and a poll far enough in the future that everything is quiet."""
    tracker.rescan()
    return tracker.poll(now=time.monotonic() + 3600)


def test_a_container_whose_metadata_breaks_the_parser_fails_alone(tmp_path: Path) -> None:
    root = tmp_path / "acq"
    root.mkdir()
    bad = badinput.deep_json(root, "0.5")  # json.loads raises RecursionError on it
    big = badinput.huge_metadata(root, "0.4")
    images = [good(root / f"good-{i}.zarr", seed=i) for i in range(3)]
    tracker = ImageTracker([root], [".zarr"], settle_seconds=0.0)

    ready, problems = poll_quiet(tracker)

    assert sorted(c.image for c in ready) == sorted(images)
    by_path = {p.path: p.error for p in problems}
    assert set(by_path) == {bad.path, big.path}
    assert "too deeply nested" in by_path[bad.path] and str(bad.path / "zarr.json") in by_path[bad.path]
    assert "too large" in by_path[big.path] and str(big.path / ".zattrs") in by_path[big.path]
    # Reported once: later passes (and rescans) do not report the same problem again.
    for _ in range(5):
        again_ready, again = poll_quiet(tracker)
        assert again == []


def test_a_plate_field_that_cannot_be_listed_does_not_hide_its_siblings(tmp_path: Path) -> None:
    root = tmp_path / "acq"
    root.mkdir()
    fields = plate(root / "plate.zarr", fields=3)
    broken = fields[1]
    (broken / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": '
                                      + "[" * 50_000 + "]" * 50_000 + "}")
    tracker = ImageTracker([root], [".zarr"], settle_seconds=0.0)

    ready, problems = poll_quiet(tracker)

    assert sorted(c.image for c in ready) == [fields[0], fields[2]]
    assert [p.path for p in problems] == [broken]
    assert problems[0].container == root / "plate.zarr"
    assert "too deeply nested" in problems[0].error


def test_whatever_the_readiness_walk_raises_fails_only_that_image(tmp_path: Path, monkeypatch) -> None:
    """Fault injection: the folder walk raises an unexpected error for one image only."""
    import cellseg1d.service.watch.tracker as watch  # where the tracker looks the name up

    root = tmp_path / "acq"
    root.mkdir()
    a, b = good(root / "a.zarr", seed=1), good(root / "b.zarr", seed=2)
    real = watch.tree_signature

    def walk(folder: Path) -> watch.TreeSignature:
        if folder == a:
            raise RuntimeError("walk exploded")
        return real(folder)

    monkeypatch.setattr(watch, "tree_signature", walk)
    tracker = ImageTracker([root], [".zarr"], settle_seconds=0.0)
    ready, problems = poll_quiet(tracker)
    assert [c.image for c in ready] == [b]
    assert [(p.path, p.container) for p in problems] == [(a, a)]
    assert "walk exploded" in problems[0].error and str(a) in problems[0].error
    _, again = poll_quiet(tracker)
    assert again == []  # reported once


def test_a_container_replaced_by_a_file_is_reported_not_raised(tmp_path: Path) -> None:
    root = tmp_path / "acq"
    root.mkdir()
    swapped = good(root / "swapped.zarr")
    other = good(root / "other.zarr", seed=2)
    tracker = ImageTracker([root], [".zarr"], settle_seconds=0.0)
    poll_quiet(tracker)
    shutil.rmtree(swapped)
    swapped.write_text("{}")
    tracker.touch(swapped)
    tracker.touch(other / "zarr.json")
    ready, problems = poll_quiet(tracker)
    assert other in [c.image for c in ready]
    assert [p.path for p in problems] == [swapped]
    assert "not a zarr group" in problems[0].error


def test_a_watched_folder_that_is_gone_does_not_stop_the_others(tmp_path: Path, caplog) -> None:
    gone, root = tmp_path / "gone", tmp_path / "acq"
    root.mkdir()
    image = good(root / "a.zarr")
    tracker = ImageTracker([gone, root], [".zarr"], settle_seconds=0.0)
    with caplog.at_level(logging.WARNING, logger="cellseg1d.service.watch"):
        ready, problems = poll_quiet(tracker)
        for _ in range(5):
            tracker.rescan()
    assert [c.image for c in ready] == [image] and problems == []
    assert caplog.text.count(f"watched folder {gone} is not there") == 1


def test_repeat_limiter_keeps_ten_minutes_of_a_stuck_error_to_a_few_lines(caplog) -> None:
    now = [0.0]
    logger = logging.getLogger("cellseg1d.test.limiter")
    limiter = RepeatLimiter(logger, window=600.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger=logger.name):
        for _ in range(int(12 * 60 / 0.2)):  # every scheduling pass (0.2 s) for twelve minutes
            limiter.log(logging.ERROR, ("stuck", "/data/x.zarr"), "cannot read %s", "/data/x.zarr")
            limiter.log(logging.ERROR, ("other",), "another error")
            now[0] += 0.2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # each key: its first line, and one summary when the window passed
    assert lines[0] == "cannot read /data/x.zarr"
    summaries = [m for m in lines if "again" in m]
    assert len(summaries) == 2 and "time(s) in the last 600 s" in summaries[0], summaries
    assert int(summaries[0].split("again; ")[1].split(" ")[0]) >= 2999  # every repeat was counted


def test_repeat_limiter_forgets_a_cleared_condition_and_bounds_its_memory(caplog) -> None:
    logger = logging.getLogger("cellseg1d.test.limiter2")
    limiter = RepeatLimiter(logger, window=600.0, max_keys=10)
    with caplog.at_level(logging.ERROR, logger=logger.name):
        assert limiter.log(logging.ERROR, "k", "first")
        assert not limiter.log(logging.ERROR, "k", "repeat")
        limiter.forget("k")
        assert limiter.log(logging.ERROR, "k", "after clearing")
        for i in range(100):
            limiter.log(logging.ERROR, i, "key %d", i)
    assert len(limiter._seen) == 10


# --------------------------------------------------------------------------
# The daemon as a subprocess
# --------------------------------------------------------------------------


def _non_utf8_container(root: Path) -> Path | None:
    """A good image under a name that is not valid UTF-8 (where the filesystem allows it)."""
    raw = os.fsencode(root) + b"/bad-\xff-name.zarr"
    try:
        os.mkdir(raw)
    except OSError:
        return None
    path = Path(os.fsdecode(raw))
    os.rmdir(raw)
    staging = root.parent / "staging-non-utf8.zarr"
    good(staging)
    os.rename(os.fsencode(staging), raw)
    return path


@pytest.mark.slow
def test_daemon_processes_good_images_that_arrive_after_pathological_ones(
        tmp_path: Path, acquisition: Path, daemons) -> None:
    acq = acquisition.resolve()
    state = tmp_path / "state"
    staging = tmp_path / "staging"
    staging.mkdir()
    # First the pathological containers, in the watched folder before the daemon starts ...
    bads = [badinput.deep_json(acq, "0.5"), badinput.deep_json(acq, "0.4"), badinput.huge_metadata(acq, "0.5"),
            badinput.bigint_json(acq, "0.4"), badinput.metadata_is_folder(acq, "0.5"),
            badinput.array_is_file(acq, "0.4")]
    fields = plate(acq / "plate.zarr", fields=2)
    (fields[0] / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": '
                                         + "{\"a\": " * 5000 + "1" + "}" * 5000 + "}")
    non_utf8 = _non_utf8_container(acq)
    swap = good(acq / "swap.zarr", seed=7)
    d = daemons(state, "--watch", str(acq), "--settle-seconds", "0.3", "--channel", "nuclei",
                env={"CELLSEG1D_WATCH__RESCAN_SECONDS": "0.5"})
    # ... then good images after them (moved in whole, as a copy tool does).
    goods = []
    for i in range(4):
        made = good(staging / f"good-{i}.zarr", "0.5" if i % 2 else "0.4", seed=10 + i)
        goods.append(Path(shutil.move(str(made), acq / made.name)))
    wait_for(lambda: image_status(state).get(str(swap)) == "done", 60, what="swap.zarr processed")
    # A processed image whose array folder is then replaced by a file: recorded as bad, once.
    shutil.rmtree(swap / "0")
    (swap / "0").write_bytes(b"gone")

    every_bad = [str(b.path) for b in bads] + [str(fields[0])]

    def finished() -> bool:
        status = image_status(state)
        return (all(status.get(str(g)) == "done" for g in goods) and status.get(str(fields[1])) == "done"
                and all(status.get(p) == "failed" for p in every_bad)
                and len(jobs_for(state, str(swap))) == 2)

    try:
        wait_for(finished, 90, interval=0.25, what="good images done, bad ones recorded")
    except AssertionError:
        raise AssertionError(f"{image_status(state)}\n--- log ---\n{d.log()[-6000:]}") from None
    time.sleep(8)  # 16 more rescans and 40 more scheduling passes over the same bad containers
    log = d.log()
    for bad in bads:
        jobs = jobs_for(state, str(bad.path))
        assert [j[0] for j in jobs] == ["quarantined"], (bad.kind, jobs)
        bad.check_message(jobs[0][2])
        assert log.count(f"cannot process {bad.path}:") == 1, bad.kind
    field_jobs = jobs_for(state, str(fields[0]))
    assert [j[0] for j in field_jobs] == ["quarantined"] and "too deeply nested" in field_jobs[0][2]
    swap_jobs = jobs_for(state, str(swap))
    assert [j[0] for j in swap_jobs] == ["done", "quarantined"], swap_jobs
    assert "cannot open array" in swap_jobs[1][2] and "is a file" in swap_jobs[1][2]
    if non_utf8 is not None:
        assert not [p for p in image_status(state) if "bad-" in p]
        assert log.count("is not valid UTF-8") == 1, log[-4000:]
    assert "unexpected error" not in log and "Traceback" not in log, log[-6000:]
    # The log stays bounded: a line per start-up step, image queued/processed/done or bad input.
    assert len(log.splitlines()) < 40 + 6 * (len(goods) + 2) + 2 * len(every_bad), log
    assert d.alive()
    assert d.stop() == 0
