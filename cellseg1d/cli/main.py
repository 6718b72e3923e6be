"""The ``cellseg1d`` command: ``run``, ``demo``, ``status``, ``images``, ``retry``, ``quarantine``, ``train``,
``segment``, ``evaluate``, ``models``, ``adapters``, ``reprocess``, ``doctor``, ``plugins``."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellseg1d import __version__
from cellseg1d.config import Config, default_state_dir, load_config
from cellseg1d.errors import CellsegError, ConfigError


def _add_catalog_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="daemon config file (TOML)")
    p.add_argument("--state-dir", type=Path, help="state dir of the daemon (holds catalog.sqlite)")
    p.add_argument("--catalog-url", help="catalog database URL (overrides config and state dir)")


def _config_for(args: argparse.Namespace, need_state: bool = False) -> Config:
    overrides: dict[str, Any] = {}
    config_path = args.config or (Path(os.environ["CELLSEG1D_CONFIG"]) if os.environ.get("CELLSEG1D_CONFIG") else None)
    if args.state_dir is not None:
        overrides["state_dir"] = str(args.state_dir)
    elif config_path is None:
        overrides["state_dir"] = str(default_state_dir())
    if getattr(args, "catalog_url", None):
        overrides["catalog.url"] = args.catalog_url
    for opt, key in (("watch", None), ("settle_seconds", "readiness.settle_seconds"),
                     ("polling", "watch.polling"), ("watch_backend", "watch.backend"), ("log_level", "log_level"),
                     ("channel", "segmentation.channels"), ("workers", "jobs.workers"),
                     ("metrics", "metrics.address"), ("dashboard", "dashboard.address"),
                     ("log_format", "log_format")):
        value = getattr(args, opt, None)
        if value in (None, False, []):
            continue
        if opt == "watch":
            overrides["watch.roots"] = [{"path": str(p)} for p in value]
        else:
            overrides[key] = value  # type: ignore[index]
    return load_config(config_path, overrides)


def _open_catalog(config: Config) -> Any:
    if config.catalog.url is None and not (config.state_dir / "catalog.sqlite").exists():
        raise ConfigError(
            f"no catalog in {config.state_dir}; has the daemon run with this state dir? "
            "(pass --state-dir or --config)"
        )
    from cellseg1d.catalog.db import open_catalog, redact

    catalog = open_catalog(config)
    if not catalog.has_schema():
        raise ConfigError(f"the catalog at {redact(config.catalog_url)} has no cellseg1d tables yet")
    return catalog


def cmd_run(args: argparse.Namespace) -> int:
    from cellseg1d.service.daemon import Daemon
    from cellseg1d.service.logs import configure_logging

    config = _config_for(args)
    configure_logging(config.log_level, config.log_format)
    faulthandler.enable()  # a watchdog's SIGABRT (a hung daemon) prints every thread's stack to the journal
    daemon = Daemon(config, config_loader=lambda: _config_for(args))
    daemon.install_signal_handlers()
    return daemon.run()


def roots_report(config: Config) -> list[dict[str, Any]]:
    """What each watched folder runs: the segmenter and, with SAM, its ``sam.profile`` (for ``status``)."""
    from cellseg1d.model.profiles import profile_of

    return [{"path": str(root.path), **profile_of(config, root)} for root in config.watch.roots]


def cmd_status(args: argparse.Namespace) -> int:
    from cellseg1d.catalog.report import status_report

    config = _config_for(args)
    catalog = _open_catalog(config)
    report = status_report(catalog, recent=args.recent)
    report["roots"] = roots_report(config)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from cellseg1d.catalog.report import print_status

        print_status(report)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from cellseg1d.catalog.report import list_images, print_images

    config = _config_for(args)
    catalog = _open_catalog(config)
    rows = list_images(catalog, status=args.status, contains=args.path_contains, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print_images(rows)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cellseg1d.cli.demo import run_demo

    return run_demo(n_images=args.images, keep=args.keep, settle_seconds=args.settle_seconds, workdir=args.workdir,
                    sam=args.sam, dashboard=not args.no_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from cellseg1d.cli.dashboard import dashboard_command

    return dashboard_command(args, _config_for(args))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cellseg1d.cli.evaluate import evaluate, print_report

    report = evaluate(args.pred, args.gt, tuple(args.thresholds), args.pred_labels, args.gt_labels)
    print_report(report, args.json)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cellseg1d.cli import models

    if args.action == "fetch":
        if args.model is None:
            raise ConfigError("name the backbone to fetch: cellseg1d models fetch vit_h (the CellSeg1 paper's, "
                              "2.4 GB, best quality), vit_l (1.2 GB, close to vit_h) or vit_b (375 MB, fastest, "
                              "clearly weaker); see README, 'Which SAM backbone'")
        models.fetch(args.model, args.model_dir, args.url)
    else:
        models.list_models(args.model_dir)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cellseg1d.cli.train import train_command

    return train_command(args, _config_for(args) if args.experiment else None)


def cmd_adapters(args: argparse.Namespace) -> int:
    from cellseg1d.cli.adapters import adapters_command

    return adapters_command(args, _config_for(args))


def cmd_reprocess(args: argparse.Namespace) -> int:
    from cellseg1d.cli.reprocess import reprocess_command

    return reprocess_command(args, _config_for(args))


def _open_current_catalog(args: argparse.Namespace) -> Any:
    """The daemon's existing catalog, upgraded to this version's schema (for commands that change jobs)."""
    catalog = _open_catalog(_config_for(args))
    catalog.migrate()
    return catalog


def cmd_retry(args: argparse.Namespace) -> int:
    from cellseg1d.cli.jobs import retry_command

    return retry_command(args, _open_current_catalog(args))


def cmd_quarantine(args: argparse.Namespace) -> int:
    from cellseg1d.cli.jobs import quarantine_command

    return quarantine_command(args, _open_current_catalog(args))


def cmd_doctor(args: argparse.Namespace) -> int:
    from cellseg1d.cli.doctor import doctor_command

    return doctor_command(args, lambda: _config_for(args))


def cmd_plugins(args: argparse.Namespace) -> int:
    from cellseg1d.cli.plugins import plugins_command

    return plugins_command(args, _config_for(args))


def cmd_segment(args: argparse.Namespace) -> int:
    from cellseg1d.cli.segment import segment_command

    return segment_command(args)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="SAM checkpoint (.pth); its backbone (vit_b, vit_l, vit_h) is read from the file")
    p.add_argument("--model-type", default=None, metavar="TYPE",
                   help="optional check: refuse unless the checkpoint is this backbone (vit_b, vit_l or vit_h)")
    p.add_argument("--allow-custom-checkpoint", action="store_true",
                   help="accept a checkpoint whose sha256 is not the official one")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--image-size", type=int, default=512, help="SAM input size (CellSeg1: 512)")
    p.add_argument("--channel", action="append", default=[],
                   help="channel to use, by name (OME-Zarr) or index (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellseg1d",
        description="Segment cells in OME-Zarr images while the microscope is still acquiring.",
    )
    parser.add_argument("--version", action="version", version=f"cellseg1d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground (what systemd runs)")
    _add_catalog_options(run)
    run.add_argument("--watch", type=Path, action="append", default=[], metavar="DIR",
                     help="acquisition folder to watch (repeatable; replaces the config's roots)")
    run.add_argument("--settle-seconds", type=float, help="quiet time before an image counts as written")
    run.add_argument("--polling", action="store_true", help="poll instead of file events (network shares)")
    run.add_argument("--watch-backend", choices=["auto", "inotify", "watchdog"],
                     help="source of file events (watch.backend; auto: inotify on Linux, watchdog elsewhere)")
    run.add_argument("--channel", action="append", help="channel name to segment (repeatable)")
    run.add_argument("--workers", type=int, help="parallel worker threads")
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    run.add_argument("--metrics", metavar="HOST:PORT",
                     help="serve /metrics (Prometheus) and /healthz here; a bare PORT binds loopback only")
    run.add_argument("--dashboard", metavar="HOST:PORT",
                     help="serve the read-only web dashboard here (dashboard.address); a bare PORT binds loopback only")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="counts, queue and recent failures from the catalog")
    _add_catalog_options(status)
    status.add_argument("--recent", type=int, default=10, help="how many recent failures to show")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    images = sub.add_parser("images", help="list images in the catalog")
    _add_catalog_options(images)
    images.add_argument("--status", choices=["queued", "held", "processing", "done", "failed"],
                        help="failed: the image's job is quarantined (see cellseg1d quarantine)")
    images.add_argument("--path-contains", help="only images whose path contains this text")
    images.add_argument("--limit", type=int, default=200)
    images.add_argument("--json", action="store_true", help="machine-readable output")
    images.set_defaults(func=cmd_images)

    demo = sub.add_parser("demo", help="simulate a microscope and watch the daemon segment its images")
    demo.add_argument("--images", type=int, default=5, help="how many images the simulated microscope writes")
    demo.add_argument("--settle-seconds", type=float, default=2.0)
    demo.add_argument("--workdir", type=Path, help="folder for the demo (default: a new temporary one)")
    demo.add_argument("--keep", action="store_true",
                      help="keep the demo folder and the dashboard running afterwards (Ctrl-C stops it)")
    demo.add_argument("--sam", action="store_true",
                      help="the CellSeg1 flow: tiny SAM base, an adapter trained on one image, then SAM + adapter")
    demo.add_argument("--no-dashboard", action="store_true", help="do not serve the dashboard during the demo")
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train a LoRA adapter on one annotated image (CellSeg1)")
    train.add_argument("image", type=Path, help="training image: OME-Zarr, TIFF or PNG")
    train.add_argument("--mask", type=Path,
                       help="instance label image, or a folder holding one named like the image")
    train.add_argument("--labels-name", help="use the image's OME-Zarr labels/<NAME> as the mask")
    train.add_argument("--out", type=Path,
                       help="adapter folder to create (optional with --experiment: then only the store keeps it)")
    train.add_argument("--name", help="adapter name (default: the --out folder name, or the experiment)")
    train.add_argument("--experiment", help="register the adapter as a new version in the daemon's registry "
                       "(catalog from --config/--state-dir)")
    train.add_argument("--assign", action="store_true", help="with --experiment: also assign the new version to it")
    _add_catalog_options(train)
    _add_model_options(train)
    train.add_argument("--epochs", type=int, default=300)
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--grad-accum", type=int, default=8)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--schedule", choices=["reference", "annealed"], default="reference",
                       help="one-cycle schedule: 'reference' (the paper's: built for more steps than are taken, ends "
                            "at ~12%% of the peak rate) or 'annealed' (anneals to ~0 over the steps taken)")
    train.add_argument("--dropout-mode", choices=["output", "input"], default="output",
                       help="LoRA dropout on the adapted projections' whole output (the paper's) or peft's (input)")
    train.add_argument("--mixed-precision", action="store_true",
                       help="bfloat16 autocast on CUDA (faster; the paper trains in float32 with TF32)")
    train.add_argument("--train-all", action="store_true",
                       help="train every weight, not only LoRA (for small or custom base models)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run (Ctrl-C saves one)")
    train.set_defaults(func=cmd_train)

    seg = sub.add_parser("segment", help="segment one image with SAM (+ a LoRA adapter)")
    seg.add_argument("image", type=Path, help="OME-Zarr image (labels go into its labels group), TIFF or PNG")
    seg.add_argument("--adapter", type=Path, help="adapter folder made by `cellseg1d train`")
    seg.add_argument("--out", type=Path, help="write the label image to this .tif/.png/.npy file instead")
    seg.add_argument("--labels-name", default="cellseg1d", help="label image name inside an OME-Zarr")
    seg.add_argument("--points-per-side", type=int, default=32, help="point grid density (CellSeg1: 32)")
    seg.add_argument("--crop-layers", type=int, default=1, help="crop layers (CellSeg1: 1 = full image + 2x2)")
    _add_model_options(seg)
    seg.set_defaults(func=cmd_segment)

    ev = sub.add_parser("evaluate", help="AP at IoU thresholds of predicted vs true label images")
    ev.add_argument("pred", type=Path, help="predicted label image file or folder (paired with GT by name)")
    ev.add_argument("gt", type=Path, help="ground-truth label image file or folder")
    ev.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    ev.add_argument("--pred-labels", help="label name inside an OME-Zarr prediction (labels/NAME)")
    ev.add_argument("--gt-labels", help="label name inside an OME-Zarr ground truth (labels/NAME)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    models = sub.add_parser("models", help="official SAM checkpoints: list, fetch")
    models.add_argument("action", choices=["list", "fetch"])
    models.add_argument("model", nargs="?", default=None, help="fetch: vit_h (the paper's), vit_l or vit_b")
    models.add_argument("--model-dir", type=Path, help="where checkpoints are kept")
    models.add_argument("--url", help="download from this URL instead of the official one")
    models.set_defaults(func=cmd_models)

    from cellseg1d.cli import adapters as adapters_cmd
    from cellseg1d.cli import dashboard as dashboard_cmd
    from cellseg1d.cli import doctor as doctor_cmd
    from cellseg1d.cli import plugins as plugins_cmd
    from cellseg1d.cli import jobs as jobs_cmd
    from cellseg1d.cli import reprocess as reprocess_cmd

    adapters_cmd.add_parser(sub, _add_catalog_options)
    sub.choices["adapters"].set_defaults(func=cmd_adapters)
    reprocess_cmd.add_parser(sub, _add_catalog_options)
    sub.choices["reprocess"].set_defaults(func=cmd_reprocess)
    jobs_cmd.add_parsers(sub, _add_catalog_options)
    sub.choices["retry"].set_defaults(func=cmd_retry)
    sub.choices["quarantine"].set_defaults(func=cmd_quarantine)
    doctor_cmd.add_parser(sub, _add_catalog_options)
    sub.choices["doctor"].set_defaults(func=cmd_doctor)
    plugins_cmd.add_parser(sub, _add_catalog_options)
    sub.choices["plugins"].set_defaults(func=cmd_plugins)
    dashboard_cmd.add_parser(sub, _add_catalog_options)
    sub.choices["dashboard"].set_defaults(func=cmd_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellseg1d`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CellsegError as err:
        print(f"cellseg1d: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
