"""Layer ``testing``, a front-end: the plugin kit and synthetic images (``synthetic``).

The plugin kit: test a cellseg1d plugin against the real pipeline in a few lines.

Installed with cellseg1d as a pytest plugin (entry point ``pytest11``), so a
plugin package's tests get these fixtures without importing anything:

* ``synthetic_image(kind="2d", ngff_version="0.5", ...)``: writes an OME-Zarr
  image with known cells (kinds ``2d``, ``zstack``, ``timelapse``, ``plate``)
  and returns a :class:`SyntheticImage` (path, true masks);
* ``cellseg1d_catalog``: a migrated SQLite catalog in the test's folder;
* ``run_pipeline(image, plugins=[...], enable=[...], settings={...})``: runs
  the real pipeline (readiness aside: the image is complete) on one image with
  the built-ins, the given plugin objects or modules and the named installed
  plugins, and returns a :class:`PipelineRun`: the result, the label image,
  the export files and the export records.

A plugin's test, whole::

    def test_my_export(synthetic_image, run_pipeline):
        image = synthetic_image("2d")
        run = run_pipeline(image, enable=["my-export"], settings={"my-export": {"scale": 2}})
        assert run.exports["cells.csv"].read_text().count("\\n") == run.n_objects + 1

Everything here is the code the daemon runs; nothing is mocked.
"""

from cellseg1d.testing.kit import (
    KINDS,
    TINY_SAM_BASE,
    FixedSegmenter,
    PipelineRun,
    SyntheticImage,
    migrated_catalog,
    run_pipeline,
    write_synthetic_image,
)

__all__ = [
    "KINDS", "TINY_SAM_BASE", "FixedSegmenter", "PipelineRun", "SyntheticImage", "migrated_catalog", "run_pipeline",
    "write_synthetic_image",
]

# The fixtures need pytest, a test extra; the synthetic images and the kit's functions do not (the demo uses them).
try:
    from cellseg1d.testing.fixtures import cellseg1d_catalog, run_pipeline_fixture, synthetic_image  # noqa: F401
except ImportError as err:  # pragma: no cover - only without pytest
    if err.name != "pytest":
        raise
