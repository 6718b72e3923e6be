"""Atomic folder swap used to replace a label image."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cellseg1d.fsops import exchange


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux-only")
def test_exchange_swaps_two_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("old")
    (b / "y").write_text("new")
    assert exchange(a, b)
    assert (a / "y").read_text() == "new" and (b / "x").read_text() == "old"
    assert not (a / "x").exists()


def test_exchange_of_a_missing_entry_raises(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux-only")
    with pytest.raises(FileNotFoundError):
        exchange(tmp_path / "a", tmp_path / "missing")
