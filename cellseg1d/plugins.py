"""The plugin manager: built-ins, entry-point discovery, enable/disable, API versions, error attribution."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from cellseg1d import hookspecs
from cellseg1d.errors import CellsegError, ConfigError, ImageError, JobAborted, PluginError

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
        check_api(name, plugin, available[name])
        _register(pm, plugin, name)
        log.info("loaded plugin %s from %s", name, available[name].value)
    for plugin in extra:
        check_api(getattr(plugin, "__name__", None) or type(plugin).__name__, plugin)
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


def _package(ep: importlib.metadata.EntryPoint | None) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None) if ep is not None else None
    return (dist.name, dist.version) if dist is not None else (None, None)


def check_api(name: str, plugin: Any, ep: importlib.metadata.EntryPoint | None = None) -> int:
    """The plugin API version ``plugin`` declares (``CELLSEG1D_PLUGIN_API``; 1 when it declares none).

    Raises ConfigError when it is not a positive integer or is newer than
    :data:`cellseg1d.hookspecs.PLUGIN_API`: such a plugin expects hooks or
    arguments this cellseg1d does not have, so it is refused at start.
    """
    from cellseg1d import __version__

    declared = getattr(plugin, "CELLSEG1D_PLUGIN_API", 1)
    package, version = _package(ep)
    what = f"plugin '{name}'" + (f" (package {package} {version})" if package else "")
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
        raise ConfigError(f"{what} declares CELLSEG1D_PLUGIN_API = {declared!r}; it must be a positive integer")
    if declared > hookspecs.PLUGIN_API:
        raise ConfigError(
            f"{what} was written for cellseg1d plugin API {declared}, but this cellseg1d ({__version__}) "
            f"provides API {hookspecs.PLUGIN_API}: upgrade cellseg1d, install a version of the plugin made "
            f"for API {hookspecs.PLUGIN_API}, or remove '{name}' from plugins.enable"
        )
    return declared


@dataclass
class PluginInfo:
    """One discovered plugin, as ``cellseg1d plugins`` lists it."""

    name: str
    #: "built-in" or "entry point".
    source: str
    enabled: bool
    #: Where its code is: a module path or an entry point's value.
    module: str
    package: str | None = None
    version: str | None = None
    #: Whether it imported and fits the hooks; None when it was not tried.
    loaded: bool | None = None
    api: int | None = None
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


def _inspect(info: PluginInfo, load: Any, ep: importlib.metadata.EntryPoint | None = None) -> PluginInfo:
    """Import the plugin, check its API version and hooks in a scratch manager; record what failed."""
    try:
        plugin = load()
        info.api = check_api(info.name, plugin, ep)
        scratch = pluggy.PluginManager(hookspecs.PROJECT)
        scratch.add_hookspecs(hookspecs)
        scratch.register(plugin, name=info.name)
        scratch.check_pending()
        info.hooks = sorted(caller.name for caller in scratch.get_hookcallers(plugin) or ())
        info.loaded = True
    except ConfigError as err:
        info.loaded, info.error = False, str(err)
    except pluggy.PluginValidationError as err:
        info.loaded, info.error = False, f"does not fit the cellseg1d hooks: {err}"
    except Exception as err:  # noqa: BLE001 - a broken package is reported, not raised
        info.loaded, info.error = False, f"failed to import: {type(err).__name__}: {err}"
    return info


def describe_plugins(enable: Sequence[str] = (), disable: Sequence[str] = (), *,
                     import_disabled: bool = True) -> list[PluginInfo]:
    """Every built-in and installed plugin: where from, enabled or not, its hooks, whether it loads.

    Imports each plugin to list its hooks (the daemon itself imports only the
    enabled ones); ``import_disabled=False`` leaves the disabled ones unimported.
    """
    from cellseg1d import __version__

    infos = []
    for name, module_path in BUILTINS.items():
        info = PluginInfo(name, "built-in", name not in disable, module_path, "cellseg1d", __version__)
        infos.append(_inspect(info, lambda m=module_path: importlib.import_module(m)))
    for name, ep in sorted(installed_plugins().items()):
        package, version = _package(ep)
        info = PluginInfo(name, "entry point", name in enable, ep.value, package, version)
        infos.append(_inspect(info, ep.load, ep) if info.enabled or import_disabled else info)
    for name in enable:
        if name not in BUILTINS and name not in {i.name for i in infos}:
            infos.append(PluginInfo(name, "entry point", True, "?", loaded=False,
                                    error="not installed (named in plugins.enable)"))
    return infos


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


def call_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> Any:
    """Call hook ``name``; whatever a plugin raises becomes a :class:`PluginError` naming it.

    ImageError and JobAborted pass through; an OSError raised by a plugin is a
    transient PluginError (storage trouble: retried), one raised by
    cellseg1d itself passes through as it is.
    """
    try:
        return getattr(pm.hook, name)(**kwargs)
    except (ImageError, JobAborted):
        raise
    except OSError as err:
        plugin = plugin_at_fault(pm, name, err)
        if plugin is None:
            raise  # storage trouble in cellseg1d itself: transient, retried
        raise PluginError(plugin, name, f"{type(err).__name__}: {err}", transient=True) from err
    except Exception as err:
        plugin = plugin_at_fault(pm, name, err) or "unknown"
        raise PluginError(plugin, name, f"{type(err).__name__}: {err}") from err


def configure_plugins(pm: pluggy.PluginManager, config: Any) -> None:
    """Call every plugin's ``configure`` hook at start; a refusal becomes a ConfigError naming the plugin."""
    try:
        pm.hook.configure(config=config)
    except CellsegError as err:
        raise ConfigError(str(err)) from None
    except Exception as err:
        plugin = plugin_at_fault(pm, "configure", err) or "unknown"
        raise ConfigError(f"plugin '{plugin}' refused to start: {type(err).__name__}: {err}") from None
