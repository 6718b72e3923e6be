"""``cellseg1d models fetch|list``: official SAM checkpoints for users with internet access."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from cellseg1d.config import default_state_dir


def default_model_dir() -> Path:
    return default_state_dir() / "models"


def fetch(model_type: str, model_dir: Path | None, url: str | None = None) -> Path:
    from cellseg1d.model.fetch import fetch_checkpoint

    path = fetch_checkpoint(model_type, model_dir or default_model_dir(), url=url)
    Console().print(f"[green]ok[/green] {model_type}: {path}\n"
                    f"set it in the config: [sam] checkpoint = \"{path}\" (the backbone is read from the file)")
    return path


def list_models(model_dir: Path | None) -> None:
    from cellseg1d.model.checkpoint import OFFICIAL

    folder = model_dir or default_model_dir()
    table = Table(title=f"official SAM checkpoints (looked for in {folder})")
    for col in ("model", "file", "sha256", "present"):
        table.add_column(col, overflow="fold")
    for name, item in OFFICIAL.items():
        table.add_row(name, item.filename, item.sha256[:16] + "...", "yes" if (folder / item.filename).exists() else "no")
    Console().print(table)
