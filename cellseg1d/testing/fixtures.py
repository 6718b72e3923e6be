"""The plugin kit's pytest fixtures (``cellseg1d.testing`` is a pytest plugin: entry point ``pytest11``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cellseg1d.testing.kit import PipelineRun, SyntheticImage, migrated_catalog, run_pipeline, write_synthetic_image


@pytest.fixture
def synthetic_image(tmp_path: Path) -> Callable[..., SyntheticImage]:
    """Factory: ``synthetic_image(kind="2d", ngff_version="0.5", **options)`` -> :class:`SyntheticImage`."""
    folder = tmp_path / "acquisition"
    counter = iter(range(1_000_000))

    def make(kind: str = "2d", ngff_version: str = "0.5", **options: Any) -> SyntheticImage:
        options.setdefault("name", f"{kind}-{ngff_version.replace('.', '')}-{next(counter)}.zarr")
        return write_synthetic_image(folder, kind, ngff_version, **options)

    return make


@pytest.fixture
def cellseg1d_catalog(tmp_path: Path) -> Iterator[Any]:
    """A migrated SQLite catalog (:class:`cellseg1d.catalog.Catalog`) in the test's folder."""
    catalog = migrated_catalog(tmp_path / "cellseg1d-state")
    yield catalog
    catalog.close()


@pytest.fixture(name="run_pipeline")
def run_pipeline_fixture(tmp_path: Path) -> Callable[..., PipelineRun]:
    """``run_pipeline(image, plugins=..., enable=..., settings=..., config=...)`` -> :class:`PipelineRun`."""

    def run(image: Path | SyntheticImage, **kwargs: Any) -> PipelineRun:
        kwargs.setdefault("state_dir", tmp_path / "cellseg1d-state")
        return run_pipeline(image, **kwargs)

    return run
