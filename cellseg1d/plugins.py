"""The plugin manager: built-ins, entry-point discovery, enable/disable, error attribution."""

from __future__ import annotations

import importlib.metadata
import logging
import types
from collections.abc import Sequence
from typing import Any

import pluggy

from cellseg1d import hookspecs
from cellseg1d.errors import ConfigError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = hookspecs.PROJECT

#: Built-in plugins by name, as import paths (imported only when enabled).
BUILTINS = {
    "readiness": "cellseg1d.builtin.readiness",
    "classical": "cellseg1d.builtin.classical",
    "sam": "cellseg1d.builtin.sam",
}


def installed_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points in the ``cellseg1d`` group, by name (nothing is imported)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def build_plugin_manager(
    enable: Sequence[str] = (),
    disable: Sequence[str] = (),
    extra: Sequence[Any] = (),
) -> pluggy.PluginManager:
    """A plugin manager with the built-ins (minus ``disable``), the enabled entry points and ``extra``.

    Raises ConfigError naming the setting when a listed plugin is not installed
    or fails to import.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    unknown = sorted(set(disable) - set(BUILTINS))
    if unknown:
        raise ConfigError(
            f"setting plugins.disable: {unknown} are not built-in plugins (built-ins: {sorted(BUILTINS)})"
        )
    for name, module_path in BUILTINS.items():
        if name not in disable:
            pm.register(importlib.import_module(module_path), name=name)
    available = installed_plugins()
    for name in enable:
        if name in BUILTINS:
            continue
        if name not in available:
            raise ConfigError(
                f"setting plugins.enable: no installed plugin named '{name}' "
                f"(installed: {sorted(available) or 'none'}); install its package or remove the name"
            )
        try:
            plugin = available[name].load()
        except Exception as err:  # a broken plugin package must not take the daemon down obscurely
            raise ConfigError(f"setting plugins.enable: plugin '{name}' failed to import: {err!r}") from None
        _register(pm, plugin, name)
        log.info("loaded plugin %s from %s", name, available[name].value)
    for plugin in extra:
        _register(pm, plugin, None)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise ConfigError(
            f"plugin '{pm.get_name(err.plugin)}' implements a hook cellseg1d does not have ({err}); "
            "check the spelling against cellseg1d/hookspecs.py"
        ) from None
    return pm


def _register(pm: pluggy.PluginManager, plugin: Any, name: str | None) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as err:
        raise ConfigError(
            f"setting plugins.enable: plugin '{name or plugin}' does not fit the cellseg1d hooks: {err}"
        ) from None


def plugin_at_fault(pm: pluggy.PluginManager, hook_name: str, exc: BaseException) -> str | None:
    """The name of the plugin whose hook implementation raised ``exc``, if one did.

    Walks the traceback for frames belonging to an implementation of
    ``hook_name``; the innermost one is the culprit.
    """
    codes: dict[types.CodeType, str] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        code = getattr(impl.function, "__code__", None)
        if code is not None:
            codes[code] = impl.plugin_name
    culprit = None
    tb = exc.__traceback__
    while tb is not None:
        culprit = codes.get(tb.tb_frame.f_code, culprit)
        tb = tb.tb_next
    return culprit


def plugin_names(pm: pluggy.PluginManager) -> list[str]:
    """Names of the registered plugins."""
    return sorted(name for name, _ in pm.list_name_plugin())
