"""Safe names for outputs written next to user data."""

from __future__ import annotations

import re

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_output_name(name: str) -> str:
    """Return ``name`` if it is safe as a folder name for outputs, else raise ValueError.

    Allowed: letters, digits, ``.``, ``_``, ``-``; starting with a letter or digit;
    at most 128 characters. No path separators, no ``..``, no hidden names.
    """
    if not _SAFE.match(name) or ".." in name:
        raise ValueError(
            f"'{name}' is not a safe output name: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (at most 128 characters)"
        )
    return name
