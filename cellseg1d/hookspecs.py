"""The plugin contract of cellseg1d: every hook a plugin can implement.

Plugins are plain modules or objects with functions marked ``@hookimpl``::

    from cellseg1d.hookspecs import hookimpl

    @hookimpl
    def export(image, labels, context):
        ...

and are installed as entry points in the ``cellseg1d`` group::

    [project.entry-points.cellseg1d]
    measurements = "cellseg1d_measurements"

A plugin says which version of this contract it was written for::

    CELLSEG1D_PLUGIN_API = 1

An installed plugin is loaded only when the config names it in
``plugins.enable``; ``cellseg1d plugins`` lists every one that is installed,
whether it loads and which hooks it implements. The built-in plugins (``readiness``, ``classical``) use
the same hooks and can be switched off with ``plugins.disable``.

A hook implementation may declare only the arguments it needs. An exception
raised by a plugin fails that image's job with the plugin named in the error;
the daemon carries on with the next image. Hooks run in the daemon's worker
threads: do not keep per-image state in module globals.

Data types passed to hooks are defined in :mod:`cellseg1d.types`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import numpy as np

    from cellseg1d.types import ExportContext, LabelsView, ReadinessQuery, SegmentRequest, Segmentation

PROJECT = "cellseg1d"

#: The version of this contract. A plugin declares the version it was written for as a
#: module (or object) attribute ``CELLSEG1D_PLUGIN_API = 1``; a plugin declaring a newer
#: one than this is refused at start with a clear message (one declaring none counts as 1).
#: It goes up only when a hook is removed or its arguments change incompatibly; new hooks
#: and new optional arguments keep it.
PLUGIN_API = 1
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------


@hookspec
def configure(config: Any) -> None:
    """Called once when the daemon starts, after every plugin is registered.

    ``config`` is the validated :class:`~cellseg1d.config.Config`. Check your
    settings (``config.plugin_settings[<name>]``) and load expensive resources
    (models) here, so that a mistake stops the daemon at start with a clear
    message instead of failing every image. Raise an exception to refuse
    starting; its message is shown to the operator with the plugin's name.
    """


# ---------------------------------------------------------------------------
# Readiness: is an image completely written?
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def image_ready(query: ReadinessQuery) -> bool | None:
    """Decide whether an image that has been quiet for the settle time is complete.

    Called after nothing in the image's folder changed for
    ``readiness.settle_seconds`` and its OME metadata parsed and its arrays
    opened. ``query.image`` is the opened :class:`~cellseg1d.ngff.OmeImage`.

    Return True (process it now), False (not yet: asked again after new
    activity or after the settle time) or None (no opinion). Stops at the
    first non-None result; when every plugin returns None the image is ready.
    The built-in ``readiness`` plugin (``trylast``) answers from the
    configured completion markers. Instrument plugins answer from their own
    flags, e.g. a vendor attribute written when acquisition ends.
    """


# ---------------------------------------------------------------------------
# Routing: which experiment does an image belong to?
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def resolve_experiment(image: Any, root: Any) -> str | None:
    """Name the experiment an image belongs to, or None to let other plugins decide.

    ``image`` is the opened :class:`~cellseg1d.ngff.OmeImage`, ``root`` the
    :class:`~cellseg1d.config.WatchRoot` it was found under. Stops at the
    first non-None result. The root's configured rules
    (``watch.roots[i].experiments``) answer after every plugin (``trylast``);
    when nothing answers, the experiment is ``"default"``.

    Called once per image by the scheduler, before its job is queued: the
    experiment's assigned adapter decides the job's run key and whether it
    is held. It is recorded on the image and passed on to ``segment`` and
    ``export``.
    """


# ---------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def segment(plane: np.ndarray, request: SegmentRequest) -> Segmentation | None:
    """Segment one 2-D plane into an instance label image.

    ``plane`` is a ``(C, Y, X)`` array of the stored dtype holding the
    channels selected by ``segmentation.channels`` (C >= 1). ``request``
    says which image, plane (t, z), experiment and pixel size, the adapter
    assigned to the experiment (``request.adapter``, an
    :class:`~cellseg1d.types.AdapterRef`, or None) and whether the job asks
    for the classical fallback (``request.fallback``: model segmenters
    return None).

    A plane larger than ``executor.block_size`` arrives block by block
    (possibly on different workers). ``request.stats`` (a
    :class:`~cellseg1d.types.PlaneStats`) then holds intensity statistics of
    the WHOLE plane: min, max, percentiles and a regular-grid sample per
    channel. A segmenter that normalises intensities or computes a threshold
    should take them from ``request.stats`` so that every block of a plane is
    treated alike (the built-in segmenters do); one that ignores them still
    works, but a cell's outline may then depend on its block. ``stats`` is
    also set for planes segmented whole.

    Put ``model_type``, ``checkpoint_sha256``, ``adapter`` ({name, version,
    sha256} or None) and ``settings`` in ``Segmentation.details``: they are
    recorded as the result's provenance.

    Return a :class:`~cellseg1d.types.Segmentation` whose ``labels`` is a
    ``(Y, X)`` integer array (0 background, objects 1..N) and whose
    ``segmenter`` names what produced it, or None to let the next plugin
    answer. Stops at the first non-None result. The built-in ``classical``
    segmenter is ``trylast``: any other segmenter that answers wins.
    """


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


@hookspec
def export(image: Any, labels: LabelsView, context: ExportContext) -> dict[str, Any] | None:
    """Write an extra output for a segmented image (measurements table, thumbnail, ...).

    Every implementation runs, after all planes are segmented and before the
    label image is published. ``labels`` reads the finished label planes;
    ``context`` gives the experiment, the output folder for this image and
    ``context.atomic_path(name)`` for writing files safely (write to the path
    it returns, the file appears under its final name only if the job
    succeeds).

    Return a small JSON-able dict describing what was written, by convention
    with a ``"kind"`` key naming the export (stored in the catalog's result
    row), or None.

    Each implementation runs on its own, in a thread, for at most
    ``plugins.timeout_seconds``: one that raises or hangs does not stop the
    others from being attempted. Every export's outcome (ok with its record,
    failed with its error, timed out) is recorded in the catalog
    (``export_outcomes``); any failure then fails the job, naming the plugin,
    and nothing of this run is published. A call that timed out keeps running
    in the background; write only through ``context.atomic_path`` so that
    whatever it writes late is never published.
    """


# ---------------------------------------------------------------------------
# Notifications (return values are ignored)
# ---------------------------------------------------------------------------


@hookspec
def image_done(image_path: str, result: dict[str, Any]) -> None:
    """An image was processed and its result committed to the catalog.

    ``result`` holds ``labels_path``, ``object_count``, ``planes``,
    ``segmenter``, ``seconds`` and ``exports`` (``exports["records"]`` are
    the export hooks' answers). Use it to notify (chat, LIMS, ...).
    Exceptions here are logged and otherwise ignored.
    """


@hookspec
def image_failed(image_path: str, error: str, plugin: str | None, will_retry: bool) -> None:
    """Processing an image failed; ``plugin`` names the plugin at fault, if any.

    ``will_retry`` is True when the job was requeued for another attempt.
    Exceptions here are logged and otherwise ignored.
    """
