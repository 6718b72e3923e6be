"""Old import paths of the modules that moved into the layer packages in 0.2.

Each keeps working for one release: importing it warns with a
``DeprecationWarning`` naming the new path and returns the moved module
itself (not a copy), so ``monkeypatch``-style changes and ``isinstance``
checks see one module. The finder goes first on ``sys.meta_path`` (a module
below an old package path, e.g. ``cellseg1d.executor.dask``, would otherwise
be found again through the new package's folder and loaded twice) and
answers only for the old names, none of which exists as a file any more.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

#: old module (and, for packages, every module below it) -> new module
MOVED: dict[str, str] = {
    "cellseg1d.commands": "cellseg1d.cli",
    "cellseg1d.demo": "cellseg1d.cli.demo",
    "cellseg1d.daemon": "cellseg1d.service.daemon",
    "cellseg1d.watch": "cellseg1d.service.watch",
    "cellseg1d.reconcile": "cellseg1d.service.reconcile",
    "cellseg1d.logs": "cellseg1d.service.logs",
    "cellseg1d.doctor_checks": "cellseg1d.service.doctor",
    "cellseg1d.executor": "cellseg1d.pipeline.executor",
    "cellseg1d.exports": "cellseg1d.pipeline.exports",
    "cellseg1d.stitch": "cellseg1d.model.stitch",
    "cellseg1d.experiments": "cellseg1d.routing.experiments",
    "cellseg1d.registry": "cellseg1d.routing.registry",
    "cellseg1d.jobs": "cellseg1d.catalog.jobs",
    "cellseg1d.report": "cellseg1d.catalog.report",
    "cellseg1d.imageio": "cellseg1d.ngff.imageio",
    "cellseg1d.segmenters.classical": "cellseg1d.model.classical",
    "cellseg1d.segmenters": "cellseg1d.model.classical",
    "cellseg1d.metrics": "cellseg1d.model.metrics",
    "cellseg1d.synthetic": "cellseg1d.testing.synthetic",
    "cellseg1d.ngff.names": "cellseg1d.types",
}

#: The old names, longest first (a module below an old package takes the deepest match).
_LONGEST_FIRST = sorted(MOVED, key=len, reverse=True)


def new_name(old: str) -> str | None:
    """The module that ``old`` moved to, or None when it did not move."""
    if old in MOVED:
        return MOVED[old]
    for prefix in _LONGEST_FIRST:
        if old.startswith(prefix + "."):
            return MOVED[prefix] + old[len(prefix):]
    return None


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as its new module, with a deprecation warning."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("cellseg1d.") or new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a placeholder; exec_module puts the moved module in its place

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        new = new_name(old)
        assert new is not None
        warnings.warn(f"{old} has moved to {new}; import it from there (the old path goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        target = importlib.import_module(new)
        if not hasattr(target, "__path__") and any(k.startswith(old + ".") for k in MOVED):
            # An old package that became a module (cellseg1d.segmenters): its names, plus a __path__ so that
            # its old submodules can still be imported below it.
            module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
            module.__path__ = []  # type: ignore[attr-defined]
            return
        # The import system returns whatever sys.modules holds for the name once this returns.
        sys.modules[old] = target


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
