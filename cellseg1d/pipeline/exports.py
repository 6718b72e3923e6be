"""Run every ``export`` plugin of an image on its own, with a time limit, and report each outcome.

pluggy would call the export implementations one after the other and stop at
the first exception. Here each runs in its own thread, bounded by
``plugins.timeout_seconds``, so that one export that raises or hangs neither
stops the others from being attempted nor holds the worker for ever. Every
outcome (ok with its record, failed with its error, timed out) is returned
for the catalog; any failure then fails the job, naming the plugin(s).

A call that timed out cannot be killed: its thread is left to finish on its
own (whatever it writes later goes to a temporary name that is never
published, and start-up reconciliation removes it). A plugin with
:data:`MAX_HUNG_CALLS` calls still hung is not called again until one returns.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pluggy

from cellseg1d.catalog import ExportStatus
from cellseg1d.errors import ImageError, JobAborted, PluginError

HOOK = "export"
#: Hung calls a plugin may have outstanding before it is failed without being called.
MAX_HUNG_CALLS = 2

_hung: dict[str, int] = {}
_hung_lock = threading.Lock()


@dataclass(frozen=True)
class ExportRun:
    """What one export plugin did for one image."""

    plugin: str
    status: str  # an ExportStatus value
    seconds: float
    record: dict[str, Any] | None = None
    error: str | None = None
    #: The exception, when it is one the job runner treats specially (ImageError, JobAborted, OSError).
    exception: BaseException | None = None

    def as_row(self) -> dict[str, Any]:
        """The columns of its catalog row (``export_outcomes``)."""
        return {"plugin": self.plugin, "status": self.status, "seconds": round(self.seconds, 6),
                "error": self.error, "record": self.record}


class ExportsFailed(PluginError):
    """One or more exports of an image failed or timed out; every outcome is in :attr:`outcomes`."""

    def __init__(self, outcomes: list[ExportRun]) -> None:
        failed = [o for o in outcomes if o.status != ExportStatus.OK]
        self.outcomes = outcomes
        first = failed[0]
        message = first.error or first.status
        if len(failed) > 1:
            message += "; also " + "; ".join(f"plugin '{o.plugin}': {o.error}" for o in failed[1:])
        # Worth a retry only when every failure was a storage error (OSError) inside the plugin.
        transient = all(isinstance(o.exception, OSError) for o in failed)
        super().__init__(first.plugin, HOOK, message, transient=transient)


def _record(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    return value if isinstance(value, dict) else {"value": str(value)}


def _call(plugin: str, fn: Any, kwargs: dict[str, Any], timeout: float) -> ExportRun:
    with _hung_lock:
        if _hung.get(plugin, 0) >= MAX_HUNG_CALLS:
            return ExportRun(plugin, ExportStatus.TIMEOUT, 0.0, error=(
                f"{_hung[plugin]} earlier calls of this plugin are still hung (plugins.timeout_seconds); "
                "not called again until one returns: fix the plugin or disable it, then restart the daemon"))
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(**kwargs)
        except BaseException as err:  # noqa: BLE001 - reported as this plugin's outcome
            box["error"] = err
        finally:
            done.set()
            with _hung_lock:
                if box.get("hung"):
                    _hung[plugin] -= 1

    started = time.perf_counter()
    threading.Thread(target=target, name=f"export-{plugin}", daemon=True).start()
    if not done.wait(timeout):
        with _hung_lock:
            if not done.is_set():
                box["hung"] = True
                _hung[plugin] = _hung.get(plugin, 0) + 1
        if box.get("hung"):
            return ExportRun(plugin, ExportStatus.TIMEOUT, time.perf_counter() - started, error=(
                f"timed out after {timeout:g} s (plugins.timeout_seconds); it still runs in the background"))
    seconds = time.perf_counter() - started
    err = box.get("error")
    if err is None:
        return ExportRun(plugin, ExportStatus.OK, seconds, record=_record(box.get("value")))
    special = err if isinstance(err, (ImageError, JobAborted, OSError)) else None
    return ExportRun(plugin, ExportStatus.FAILED, seconds, error=f"{type(err).__name__}: {err}", exception=special)


def run_exports(pm: pluggy.PluginManager, timeout: float, **kwargs: Any) -> list[ExportRun]:
    """Call every ``export`` implementation (in pluggy's order) with ``kwargs``; each outcome, in order.

    Raises, after every export was attempted: the first :class:`ImageError` or
    :class:`JobAborted` an export raised (the image or the job is at fault,
    not the plugin), else :class:`ExportsFailed` when any export failed or
    timed out. The raised exception carries the outcomes as ``export_outcomes``.
    """
    outcomes = []
    for impl in reversed(pm.hook.export.get_hookimpls()):  # pluggy calls the last registered first
        args = {name: kwargs[name] for name in impl.argnames}
        outcomes.append(_call(impl.plugin_name, impl.function, args, timeout))
    for outcome in outcomes:
        if isinstance(outcome.exception, (ImageError, JobAborted)):
            err = outcome.exception
            err.export_outcomes = outcomes  # type: ignore[union-attr]
            raise err
    if any(o.status != ExportStatus.OK for o in outcomes):
        failure = ExportsFailed(outcomes)
        failure.export_outcomes = outcomes  # type: ignore[attr-defined]
        raise failure
    return outcomes
