"""``cellseg1d evaluate PRED GT``: AP at IoU thresholds (TP / (TP + FP + FN), one-to-one matching)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from cellseg1d.errors import ImageError
from cellseg1d.ngff.imageio import read_labels
from cellseg1d.model.metrics import average_precision

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".zarr")


def _pairs(pred: Path, gt: Path) -> list[tuple[Path, Path]]:
    """Pair files by name when both are folders (never by order), else the two files."""
    if pred.is_dir() and gt.is_dir() and not pred.suffix == ".zarr":
        gt_by_stem = {p.stem: p for p in gt.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        pairs = []
        for p in sorted(pred.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                match = gt_by_stem.get(p.stem)
                if match is None:
                    raise ImageError(f"{p}: no ground truth named '{p.stem}.*' in {gt}")
                pairs.append((p, match))
        if not pairs:
            raise ImageError(f"no label images found in {pred}")
        return pairs
    return [(pred, gt)]


def evaluate(pred: Path, gt: Path, thresholds: Sequence[float] = (0.5, 0.75, 0.9),
             pred_labels: str | None = None, gt_labels: str | None = None) -> dict[str, Any]:
    """Per-image and mean AP at ``thresholds`` for a prediction/ground-truth pair of files or folders."""
    rows = []
    for p, g in _pairs(Path(pred), Path(gt)):
        a, b = read_labels(p, pred_labels), read_labels(g, gt_labels)
        if a.shape != b.shape:
            raise ImageError(f"{p} has shape {a.shape} but its ground truth {g} has {b.shape}")
        results = average_precision(a, b, thresholds)
        rows.append({"pred": str(p), "gt": str(g),
                     **{f"ap@{r.threshold:g}": r.ap for r in results},
                     **{f"tp/fp/fn@{r.threshold:g}": [r.tp, r.fp, r.fn] for r in results}})
    mean = {f"ap@{t:g}": sum(r[f"ap@{t:g}"] for r in rows) / len(rows) for t in thresholds}
    return {"images": rows, "mean": mean}


def print_report(report: dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    keys = list(report["mean"])
    table = Table(title="average precision (TP / (TP + FP + FN))")
    table.add_column("image", overflow="fold")
    for k in keys:
        table.add_column(k, justify="right")
    for row in report["images"]:
        table.add_row(Path(row["pred"]).name, *(f"{row[k]:.3f}" for k in keys))
    table.add_row("[bold]mean[/bold]", *(f"{report['mean'][k]:.3f}" for k in keys))
    Console().print(table)
