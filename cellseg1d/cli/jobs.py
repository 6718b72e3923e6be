"""``cellseg1d retry`` and ``cellseg1d quarantine``: jobs waiting for a retry, and quarantined jobs.

``retry`` lists jobs in state ``failed`` (a failed attempt, run again at
``next_attempt_at``); ``retry --now JOB_ID ...|--all`` makes them due at once.
``quarantine`` lists quarantined jobs (permanent error, attempts used up, or a
job that kept killing its daemon); ``quarantine --release JOB_ID ...|--all``
queues them again with their attempts reset, recording the release (and
``--reason``) as a job event. Both work on the daemon's catalog
(``--config``/``--state-dir``/``--catalog-url``); a running daemon polls the
queue and picks the jobs up within about a second.
"""

from __future__ import annotations

import argparse
import getpass
import json
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from cellseg1d.catalog import Catalog
from cellseg1d.catalog.jobs import Outcome, JobView, quarantined_jobs, release_quarantined, retry_now, waiting_for_retry


def _actor(command: str) -> str:
    """Who changed a job: the command and the user running it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"cellseg1d {command} ({user})"


def _ids(args: argparse.Namespace, flag: str) -> list[int] | None:
    """The job ids the action applies to (None: ``--all``); refuses to guess when neither is given."""
    from cellseg1d.errors import ConfigError

    if args.all and args.job_ids:
        raise ConfigError(f"give job ids or --all with {flag}, not both")
    if not args.all and not args.job_ids:
        raise ConfigError(f"{flag} needs job ids (see the listing) or --all")
    return None if args.all else list(args.job_ids)


def _report(console: Console, outcome: Outcome, verb: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"changed": outcome.changed, "refused": {str(k): v for k, v in outcome.refused.items()}},
                         indent=2))
    else:
        for job_id in outcome.changed:
            console.print(f"job {job_id}: {verb}")
        for why in outcome.refused.values():
            console.print(f"[red]{why}[/red]", highlight=False)
        if not outcome.changed and not outcome.refused:
            console.print("nothing to do")
    return 1 if outcome.refused else 0


def _table(title: str, views: list[JobView], columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for v in views:
        cells = {
            "job": str(v.job_id), "image": v.image, "attempts": str(v.attempts),
            "next attempt (UTC)": (v.next_attempt_at or "now")[:19], "plugin": v.plugin or "",
            "error": v.error or "", "since (UTC)": (v.finished_at or "")[:19],
        }
        table.add_row(*(cells[c] for c in columns))
    return table


def _print_listing(console: Console, views: list[JobView], as_json: bool, what: str, columns: tuple[str, ...],
                   hint: str) -> int:
    """Print the listed jobs (JSON or a table with a hint on what to do next); exit code 0."""
    if as_json:
        print(json.dumps([asdict(v) for v in views], indent=2))
    elif not views:
        console.print(f"no job is {what}")
    else:
        console.print(_table(f"{len(views)} job(s) {what}", views, columns))
        console.print(hint)
    return 0


def retry_command(args: argparse.Namespace, catalog: Catalog) -> int:
    """List jobs waiting for a retry, or (``--now``) make some or all of them due now."""
    console = Console()
    try:
        if args.now:
            ids = _ids(args, "--now")
            with catalog.session() as s:
                outcome = retry_now(s, ids, _actor("retry"))
            return _report(console, outcome, "due now (a running daemon takes it within a second)", args.json)
        if args.job_ids or args.all:
            from cellseg1d.errors import ConfigError

            raise ConfigError("job ids and --all go with --now (cellseg1d retry --now JOB_ID ...)")
        with catalog.session() as s:
            views = waiting_for_retry(s)
    finally:
        catalog.close()
    return _print_listing(console, views, args.json, "waiting for a retry",
                          ("job", "image", "attempts", "next attempt (UTC)", "plugin", "error"),
                          "run them now: cellseg1d retry --now JOB_ID ... (or --all)")


def quarantine_command(args: argparse.Namespace, catalog: Catalog) -> int:
    """List quarantined jobs, or (``--release``) queue some or all of them again."""
    console = Console()
    try:
        if args.release:
            ids = _ids(args, "--release")
            with catalog.session() as s:
                outcome = release_quarantined(s, ids, args.reason, _actor("quarantine"))
            return _report(console, outcome, "released (queued again, attempts reset)", args.json)
        if args.job_ids or args.all or args.reason:
            from cellseg1d.errors import ConfigError

            raise ConfigError("job ids, --all and --reason go with --release "
                              "(cellseg1d quarantine --release JOB_ID ... --reason TEXT)")
        with catalog.session() as s:
            views = quarantined_jobs(s)
    finally:
        catalog.close()
    return _print_listing(console, views, args.json, "quarantined",
                          ("job", "image", "plugin", "attempts", "since (UTC)", "error"),
                          "after fixing the cause: cellseg1d quarantine --release JOB_ID ... [--reason TEXT] (or --all)")


def add_parsers(sub: Any, add_catalog_options: Any) -> None:
    """The ``retry`` and ``quarantine`` subcommands."""
    retry = sub.add_parser("retry", help="jobs waiting for a retry after a failed attempt; --now runs them now")
    retry.add_argument("job_ids", nargs="*", type=int, metavar="JOB_ID", help="with --now: these jobs")
    retry.add_argument("--now", action="store_true", help="make the named jobs (or --all) due now")
    retry.add_argument("--all", action="store_true", help="with --now: every job waiting for a retry")
    retry.add_argument("--json", action="store_true", help="machine-readable output")
    add_catalog_options(retry)
    quarantine = sub.add_parser("quarantine", help="quarantined jobs (given up on); --release queues them again")
    quarantine.add_argument("job_ids", nargs="*", type=int, metavar="JOB_ID", help="with --release: these jobs")
    quarantine.add_argument("--release", action="store_true",
                            help="queue the named jobs (or --all) again, attempts reset")
    quarantine.add_argument("--all", action="store_true", help="with --release: every quarantined job")
    quarantine.add_argument("--reason", help="with --release: why (recorded with the release)")
    quarantine.add_argument("--json", action="store_true", help="machine-readable output")
    add_catalog_options(quarantine)
