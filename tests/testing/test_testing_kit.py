"""The plugin kit (cellseg1d.testing) itself: its images, catalog and pipeline runs are the real thing."""

from __future__ import annotations

import pytest

from cellseg1d.hookspecs import hookimpl
from cellseg1d.model.metrics import average_precision
from cellseg1d.ngff.reader import open_image


@pytest.mark.parametrize("kind", ["2d", "zstack", "timelapse", "plate"])
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_images_of_every_kind_are_segmented_by_the_real_pipeline(synthetic_image, run_pipeline, kind, version):
    image = synthetic_image(kind, version)
    opened = open_image(image.path)
    assert opened.ngff_version == version
    run = run_pipeline(image)
    assert run.labels.shape == image.mask.shape
    for t in range(image.mask.shape[0]):
        for z in range(image.mask.shape[1]):
            ap = average_precision(run.labels[t, z], image.mask[t, z], thresholds=(0.5,))[0].ap
            assert ap >= 0.8, (kind, version, t, z, ap)
    assert run.n_objects == run.result.object_count
    if kind == "plate":
        assert len(image.fields) == 2 and image.container.name.endswith(".zarr")


class CountingExport:
    __name__ = "counting-export"

    @hookimpl
    def export(self, image, labels, context):
        path = context.atomic_path("count.txt")
        path.write_text(str(labels.n_objects))
        return {"kind": "count", "objects": labels.n_objects}


def test_a_plugin_object_exports_through_the_kit(synthetic_image, run_pipeline):
    image = synthetic_image("2d")
    run = run_pipeline(image, plugins=[CountingExport()])
    assert run.exports["count.txt"].read_text() == str(run.n_objects)
    assert run.record("count")["objects"] == run.n_objects == image.n_cells
    assert run.export_dir == image.path.parent / (image.path.name + ".cellseg1d")


def test_catalog_fixture_is_migrated(cellseg1d_catalog):
    assert cellseg1d_catalog.has_schema()
