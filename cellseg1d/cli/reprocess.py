"""``cellseg1d reprocess --experiment X [--since DATE]``: new runs of processed images with the assigned adapter.

Each image of the experiment that has a finished run gets a job whose run key
names the currently assigned adapter version; an image already processed
with that version gets none (running the command twice queues nothing new).
The daemon picks the jobs up from the catalog. Earlier runs and their results
stay in the catalog; their label images are replaced atomically or, with
``segmentation.versioned_labels``, kept beside the new ones.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from sqlalchemy import select

from cellseg1d.catalog import Catalog, Image, Job, JobState
from cellseg1d.config import Config
from cellseg1d.errors import ConfigError
from cellseg1d.catalog.jobs import ImageFacts, JobQueue, run_key
from cellseg1d.routing.registry import Registry, RegistryError


@dataclass
class ReprocessReport:
    """What ``reprocess`` did."""

    experiment: str
    adapter: str
    queued: list[str] = field(default_factory=list)
    #: Images already processed (or queued) with this adapter version.
    already: list[str] = field(default_factory=list)


def parse_since(text: str) -> datetime:
    """An ISO date or date-time; without a time zone it is the local time."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    return (value if value.tzinfo else value.astimezone()).astimezone(UTC)


def reprocess(catalog: Catalog, registry: Registry, experiment: str,
              since: datetime | None = None) -> ReprocessReport:
    """Queue runs of ``experiment``'s processed images (first seen at or after ``since``) with its adapter."""
    adapter = registry.current(experiment)
    if adapter is None:
        raise RegistryError(f"experiment {experiment!r} has no adapter assigned; assign one first: "
                            f"cellseg1d adapters assign {experiment} ADAPTER")
    report = ReprocessReport(experiment, adapter.label)
    with catalog.session() as s:
        query = (select(Image).where(Image.experiment == experiment, Image.fingerprint.is_not(None),
                                     Image.id.in_(select(Job.image_id).where(Job.state == JobState.DONE)))
                 .order_by(Image.path))
        if since is not None:
            query = query.where(Image.first_seen >= since)
        images = [ImageFacts(i.path, i.root, i.container, i.fingerprint, experiment=experiment)
                  for i in s.scalars(query)]
    queue = JobQueue(catalog, "cellseg1d-reprocess")
    for facts in images:
        assert facts.fingerprint is not None
        job = queue.enqueue(facts, run_key(facts.fingerprint, adapter.label), adapter_id=adapter.id)
        (report.queued if job is not None else report.already).append(facts.path)
    return report


def reprocess_command(args: argparse.Namespace, config: Config) -> int:
    """Run ``cellseg1d reprocess``."""
    from cellseg1d.cli.adapters import open_registry

    since = parse_since(args.since) if args.since else None
    registry = open_registry(config, check_base=False)
    try:
        report = reprocess(registry.catalog, registry, args.experiment, since)
    finally:
        registry.catalog.close()
    if args.json:
        import json

        print(json.dumps(report.__dict__, indent=2))
        return 0
    console = Console()
    console.print(f"experiment {report.experiment}: queued {len(report.queued)} image(s) with {report.adapter}; "
                  f"{len(report.already)} already processed or queued with it")
    return 0


def add_parser(sub: Any, add_catalog_options: Any) -> None:
    """The ``reprocess`` subcommand."""
    parser = sub.add_parser("reprocess", help="run an experiment's processed images again with its current adapter")
    parser.add_argument("--experiment", required=True, help="experiment whose images to run again")
    parser.add_argument("--since", help="only images first seen on or after this date (YYYY-MM-DD[THH:MM])")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_catalog_options(parser)
