"""Layer ``pipeline``: one image through the hooks.

:class:`~cellseg1d.pipeline.runner.Pipeline` resolves the experiment, plans
planes and blocks, hands them to an executor (``executor``: local or Dask),
stitches, writes the labels and runs the exports (``exports``).

May import: ``routing``, ``builtin``, ``model``, ``ngff``, ``catalog`` and
the shared top level. Imported by: ``service``, ``cli``, ``testing``.
"""

from cellseg1d.pipeline.runner import (
    Pipeline,
    PipelineResult,
    exports_dir,
    labels_name_for,
    output_base,
    pixel_size,
)

__all__ = ["Pipeline", "PipelineResult", "exports_dir", "labels_name_for", "output_base", "pixel_size"]
