"""Modules that moved into the layer packages keep their old import path for one release, with a warning."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from cellseg1d import _moved

from tests.helpers import REPO


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_path_imports_the_moved_module_with_a_warning(old: str) -> None:
    # A fresh interpreter: in this one the old name may already be cached in sys.modules.
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({_moved.MOVED[old]!r})\n"
        "assert old is new or (hasattr(old, '__path__') and all(getattr(old, k) is v for k, v in vars(new).items()\n"
        "                                                        if not k.startswith('__'))), (old, new)\n"
        "messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]\n"
        f"assert any({_moved.MOVED[old]!r} in m for m in messages), messages\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_module_below_an_old_package_is_the_same_module() -> None:
    with pytest.warns(DeprecationWarning, match="cellseg1d.pipeline.executor.dask"):
        old = importlib.import_module("cellseg1d.executor.dask")
    new = importlib.import_module("cellseg1d.pipeline.executor.dask")
    assert old is new and old.DaskExecutor is new.DaskExecutor  # loaded once, not twice


def test_names_that_never_existed_still_fail() -> None:
    assert _moved.new_name("cellseg1d.config") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("cellseg1d.no_such_module")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("cellseg1d.executor.no_such_module")
