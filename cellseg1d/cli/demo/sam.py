"""The CellSeg1 flow of ``demo --sam``: the tiny base, an adapter trained on one image, registered and assigned."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellseg1d.cli.demo.microscope import (
    EXPERIMENT,
    SAM_SETTINGS,
    SEED,
    TINY_BASE,
    TRAIN_SIZE,
    TRAIN_STEPS,
    n_cells_for,
)


@dataclass
class SamSetup:
    """What ``--sam`` prepared: the daemon's config file, the adapter and how its training went."""

    config_path: Path
    checkpoint: Path
    adapter: str
    steps: int
    train_seconds: float
    train_cells: int
    final_loss: float | None


def _progress_bar(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[detail]}"), console=console)


def _write_toml(path: Path, acq: Path, state: Path, checkpoint: Path) -> None:
    """The ``--sam`` daemon's config: SAM on the tiny base, every image in experiment :data:`EXPERIMENT`."""
    sam = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"checkpoint": str(checkpoint), **SAM_SETTINGS}.items())
    path.write_text(
        f"# written by cellseg1d demo --sam\nstate_dir = {json.dumps(str(state))}\n\n"
        f"[[watch.roots]]\npath = {json.dumps(str(acq))}\n"
        f'experiments = [{{ glob = "**", experiment = "{EXPERIMENT}" }}]\n\n'
        f'[segmentation]\nchannels = ["nuclei"]\n\n[sam]\n{sam}\n', encoding="utf-8")


def prepare_sam(console: Any, base: Path, acq: Path, state: Path, steps: int = TRAIN_STEPS) -> SamSetup:
    """Base checkpoint, one-image adapter (progress bars), registered and assigned; the daemon's config file."""
    import torch
    from safetensors.torch import load_file

    from cellseg1d.catalog import Catalog
    from cellseg1d.model.adapters import AdapterMetadata, save_adapter
    from cellseg1d.model.sam import build_sam
    from cellseg1d.model.train import TrainSettings, train_adapter
    from cellseg1d.routing.registry import BaseModel, Registry, sha256_of
    from cellseg1d.testing.synthetic import make_czyx

    if not TINY_BASE.is_file():
        raise FileNotFoundError(f"the demo's base model {TINY_BASE} is missing from this installation; "
                                "reinstall cellseg1d")
    models = base / "models"
    models.mkdir(parents=True, exist_ok=True)
    checkpoint = models / "tiny_sam_cells.pth"
    state_dict = {k: v.float() for k, v in load_file(str(TINY_BASE)).items()}
    torch.save(state_dict, checkpoint)  # a SAM checkpoint file, as the daemon's [sam] checkpoint expects
    sha = sha256_of(checkpoint)
    sam = build_sam("tiny", image_size=int(SAM_SETTINGS["image_size"]))
    sam.load_state_dict(state_dict)
    sam.eval()
    console.print(f"Base model: a tiny SAM-architecture model pretrained on synthetic cells "
                  f"({sum(p.numel() for p in sam.parameters()) / 1e6:.1f} M parameters, {checkpoint})")

    data, mask = make_czyx((TRAIN_SIZE, TRAIN_SIZE), n_cells_for(TRAIN_SIZE, TRAIN_SIZE) + 8, n_channels=2,
                           seed=SEED + 1)
    image = data[0, 0, 0].astype(np.float32)  # the nuclei channel, as the daemon segments it
    n_cells = int(np.count_nonzero(np.unique(mask)))
    settings = TrainSettings(image_size=int(SAM_SETTINGS["image_size"]), tile=128, epochs=10**4, max_steps=steps,
                             batch_size=2, grad_accum=1, lr=3e-3, max_cells=8, max_negatives=4, dice_weight=1.0,
                             device="cpu", resize_to=None)
    progress = _progress_bar(console)
    started = time.monotonic()
    with progress:
        task = progress.add_task("training the LoRA adapter", total=steps, detail=f"1 image, {n_cells} cells")

        def on_step(info: Any) -> None:
            progress.update(task, completed=info.step, detail=f"1 image, {n_cells} cells, loss {info.loss:.3f}")

        result = train_adapter(sam, image, mask, settings, progress=False, on_step=on_step)
        progress.update(task, completed=steps)
    seconds = time.monotonic() - started
    final = float(result.losses[-1]) if result.losses else None
    folder = save_adapter(result.model, base / "trained" / EXPERIMENT, AdapterMetadata(
        name=EXPERIMENT, base_model_type="tiny", base_checkpoint_sha256=sha, image_size=settings.image_size,
        settings={"steps": steps, "image": f"synthetic {TRAIN_SIZE} x {TRAIN_SIZE}, seed {SEED + 1}"},
        metrics={"final_loss": final, "steps": result.steps, "seconds": round(seconds, 1)}))

    catalog = Catalog(f"sqlite:///{state / 'catalog.sqlite'}")
    try:
        catalog.migrate()
        registry = Registry(catalog, state / "adapters", BaseModel("tiny", sha, "demo base"))
        row = registry.add(folder, EXPERIMENT)
        registry.assign(EXPERIMENT, row.name, row.version)
        label = row.label
    finally:
        catalog.close()
    console.print(f"Adapter {label}: trained on ONE synthetic image with its {n_cells} annotated cells "
                  f"({result.steps} steps, {seconds:.0f} s), registered and assigned to experiment {EXPERIMENT} "
                  f"(cellseg1d adapters assign {EXPERIMENT} {label})")
    config_path = base / "cellseg1d-demo.toml"
    _write_toml(config_path, acq, state, checkpoint)
    return SamSetup(config_path, checkpoint, label, result.steps, seconds, n_cells, final)


def classical_labels(plane: np.ndarray) -> np.ndarray:
    """The classical fallback (default settings) on one (Y, X) plane, for comparison with SAM + adapter."""
    from cellseg1d.model.classical import segment_classical

    return segment_classical(plane[np.newaxis].astype(np.float32))


def start_demo_dashboard(console: Any, acq: Path, state: Path) -> tuple[Any, Any]:
    """The read-only dashboard of the demo's catalog on a free loopback port; (handle, catalog) or (None, None)."""
    try:
        from cellseg1d.catalog import Catalog
        from cellseg1d.config import build_config
        from cellseg1d.service.dashboard import start_dashboard

        config = build_config({"state_dir": str(state), "watch": {"roots": [{"path": str(acq)}]}})
        catalog = Catalog(config.catalog_url)
        return start_dashboard(config, catalog, address="127.0.0.1:0"), catalog
    except Exception as err:  # noqa: BLE001 - the demo goes on without it
        console.print(f"[yellow]The dashboard could not start: {err}[/yellow]")
        return None, None
