"""What doctor's checks share: the row type, statuses, limits and small helpers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_RANK = {SKIP: 0, OK: 1, WARN: 2, FAIL: 3}


@dataclass
class Context:
    """What the checks share: the parsed config and what earlier checks found."""

    config: Any
    #: The config file (None: defaults and command-line options only).
    config_file: Path | None = None
    #: sha256 of sam.checkpoint, once the checkpoint check hashed it.
    base_sha256: str | None = None
    #: The backbone read from sam.checkpoint (vit_b, vit_l, vit_h), once the checkpoint check read it.
    base_model_type: str | None = None
    #: The open catalog, once the catalog check found it at this version's schema.
    catalog: Any = None


@dataclass
class Check:
    """One row of the doctor's report."""

    name: str
    status: str
    message: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def worst(statuses: Iterable[str]) -> str:
    """The most serious of ``statuses`` (fail > warn > ok > skip); ok for none."""
    found = list(statuses)
    return max(found, key=_RANK.__getitem__) if found else OK


def _merge(name: str, problems: list[tuple[str, str, str]], ok_message: str,
           details: dict[str, Any] | None = None) -> Check:
    """One row from (status, message, fix) problems: the worst status, every message and fix."""
    if not problems:
        return Check(name, OK, ok_message, "", details or {})
    fixes = [fix for _, _, fix in problems if fix]
    return Check(name, worst(s for s, _, _ in problems), "; ".join(m for _, m, _ in problems),
                 " ".join(dict.fromkeys(fixes)), details or {})


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _size(n: float) -> str:
    return _gib(n) if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (for "can it be created?")."""
    current = path
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    return current


def _creatable(path: Path) -> str | None:
    """Why ``path`` (which does not exist) cannot be created by this user, or None if it can."""
    ancestor = nearest_existing(path)
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable by {_user(os.geteuid())}"
    return None
