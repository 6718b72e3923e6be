"""Shared fixtures: real OME-Zarr images on disk and daemon subprocesses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cellseg1d.catalog import Catalog
from cellseg1d.testing import migrated_catalog
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr
from tests.helpers import DaemonProcess
from tests.pg import PgServer, find_pg_bindir, start_server


@pytest.fixture
def acquisition(tmp_path: Path) -> Path:
    """An empty acquisition folder to watch."""
    folder = tmp_path / "acquisition"
    folder.mkdir()
    return folder


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A daemon state dir (not created: the catalog or daemon makes it)."""
    return tmp_path / "state"


@pytest.fixture
def catalog(state: Path) -> Iterator[Catalog]:
    """A migrated SQLite catalog in ``state`` (the plugin kit's, where a daemon on ``state`` finds it)."""
    cat = migrated_catalog(state)
    yield cat
    cat.close()


@pytest.fixture
def make_image() -> Iterator:
    """Factory: write a synthetic 2-channel OME-Zarr image, return (path, true mask)."""

    def _make(path: Path, *, ngff_version: str = "0.5", size: int = 128, n_cells: int = 12,
              seed: int = 0, axes: str = "czyx", **kwargs) -> tuple[Path, np.ndarray]:
        data, mask = make_czyx((size, size), n_cells, seed=seed)
        # data is (t, c, z, y, x): keep the requested axes
        index = tuple(slice(None) if a in axes else 0 for a in "tczyx")
        write_ome_zarr(path, data[index], axes=axes, ngff_version=ngff_version,
                       channel_names=["nuclei", "membrane"][: data.shape[1]] if "c" in axes else None, **kwargs)
        return path, mask

    yield _make


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread: on a small shared CPU, two threads oversubscribe and run many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def daemons() -> Iterator:
    """Factory for daemon subprocesses; every one still running is killed at teardown."""
    started: list[DaemonProcess] = []

    def _start(state_dir: Path, *args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        d = DaemonProcess(state_dir, list(args), env).start()
        started.append(d)
        return d

    yield _start
    for d in started:
        d.kill()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A private PostgreSQL server for the test session (skips when PostgreSQL is not installed)."""
    if find_pg_bindir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's 'postgresql' "
                    "package (CI's .ci/run does) or set CELLSEG1D_PG_BINDIR")
    server = start_server()
    yield server
    server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """URL of a new, empty database on the session's PostgreSQL server (user postgres, no password)."""
    return pg_server.create_database()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A random tiny SAM saved at input size 1024, like the official checkpoints: (path, state dict)."""
    import torch

    from cellseg1d.model.sam import build_sam

    torch.manual_seed(0)
    state = build_sam("tiny", 1024).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(state, path)
    return path, state
