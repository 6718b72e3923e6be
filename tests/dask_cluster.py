"""A real Dask cluster for tests: ``dask scheduler`` and ``dask worker`` subprocesses on loopback.

:class:`DaskCluster` starts a scheduler on a free 127.0.0.1 port and workers
with one thread each. By default a worker runs without a nanny (the worker
process is the one that runs the tasks, so SIGKILL of it is a worker dying
mid-task); ``nanny=True`` starts them as ``dask worker`` does by default, a
nanny process that starts (and restarts) the worker process, each nanny in a
process group of its own so that a test can kill the nanny with its worker
(:meth:`DaskCluster.kill_worker`) or the worker process alone, which the
nanny then restarts (:meth:`DaskCluster.kill_worker_process`). Every process
logs to a file under the cluster's folder; :meth:`DaskCluster.logs` returns
them for failure messages. The ``dask_cluster`` fixture is a factory that
stops every cluster it started at teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, wait_for


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class DaskCluster:
    """A scheduler and its workers as subprocesses; ``env`` is added to every process's environment.

    ``pythonpath`` folders go first on the processes' ``PYTHONPATH`` (e.g. a folder
    with a fake installed plugin distribution), followed by the repository.
    """

    def __init__(self, folder: Path, env: dict[str, str] | None = None,
                 pythonpath: tuple[Path, ...] = (), nanny: bool = False) -> None:
        self.folder = folder
        #: Whether workers run under a nanny (``dask worker``'s default).
        self.nanny = nanny
        self.folder.mkdir(parents=True, exist_ok=True)
        path = [str(p) for p in pythonpath] + [str(REPO)]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(path), **(env or {})}
        self.port = 0
        self.scheduler: subprocess.Popen | None = None
        #: Worker name -> process.
        self.workers: dict[str, subprocess.Popen] = {}
        self._count = 0
        self._logs: list[Path] = []

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str], group: bool = False) -> subprocess.Popen:
        log_path = self.folder / f"{name}.log"
        self._logs.append(log_path)
        with open(log_path, "ab") as log:
            # group: a process group of its own (a nanny and the worker it starts die together)
            return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env, cwd=REPO, start_new_session=group)

    # -- starting ---------------------------------------------------------------

    def start(self, n_workers: int = 2) -> DaskCluster:
        """Start the scheduler and ``n_workers`` workers; return once all have joined."""
        self.start_scheduler()
        for _ in range(n_workers):
            self.add_worker()
        self.wait_workers(n_workers)
        return self

    def start_scheduler(self, port: int | None = None) -> None:
        """Start a scheduler (on ``port``, e.g. the one a killed scheduler had) and wait until it listens."""
        self.port = port or free_port()
        self.scheduler = self._spawn(
            f"scheduler-{self.port}-{len(self._logs)}",
            ["-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-dashboard", "--no-jupyter"],
        )
        proc = self.scheduler
        wait_for(lambda: proc.poll() is not None or _port_open(self.port), 60, 0.1, "the Dask scheduler to listen")
        if proc.poll() is not None:
            raise AssertionError(f"the Dask scheduler exited with {proc.returncode}:\n{self.logs()}")

    def add_worker(self) -> str:
        """Start one more single-threaded worker (with a nanny when the cluster has them); returns its name
        (not waited for). With a nanny, ``workers[name]`` is the nanny process."""
        name = f"w{self._count}"
        self._count += 1
        self.workers[name] = self._spawn(
            f"worker-{name}",
            ["-m", "distributed.cli.dask_worker", self.address, "--name", name, "--nthreads", "1",
             "--nanny" if self.nanny else "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
             "--memory-limit", "0", "--local-directory", str(self.folder / f"dask-{name}")],
            group=self.nanny,
        )
        return name

    # -- looking ----------------------------------------------------------------

    def info(self) -> dict[str, dict]:
        """The scheduler's workers: address -> info (with ``name``); {} when it does not answer."""
        from distributed import Client

        try:
            with Client(self.address, timeout=5, set_as_default=False) as client:
                return dict(client.scheduler_info(n_workers=-1)["workers"])
        except Exception:  # noqa: BLE001  (not up, or going away: no workers)
            return {}

    def worker_addresses(self) -> dict[str, str]:
        """Worker address -> name, as the scheduler knows them."""
        return {address: str(item.get("name")) for address, item in self.info().items()}

    def wait_workers(self, n: int, timeout: float = 60) -> dict[str, str]:
        """Wait until exactly ``n`` workers are connected; returns address -> name."""
        def ready() -> tuple[dict[str, str]] | None:
            alive = [name for name, proc in self.workers.items() if proc.poll() is None]
            if len(alive) < n:
                raise AssertionError(f"only {len(alive)} Dask worker processes run ({alive}); {n} expected")
            found = self.worker_addresses()
            return (found,) if len(found) == n else None  # (a tuple: {} is an answer too)

        try:
            return wait_for(ready, timeout, 0.3, f"{n} Dask workers to join {self.address}")[0]
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.logs()}") from None

    def worker_logs(self) -> list[str]:
        """Each worker's (or nanny's, with the worker it started) log text."""
        return [path.read_text(errors="replace") for path in self._logs
                if path.name.startswith("worker-") and path.exists()]

    def logs(self) -> str:
        """Every process's log, labelled (for assertion messages)."""
        parts = []
        for path in self._logs:
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"----- {path.name} -----\n{text[-4000:]}")
        return "\n".join(parts)

    # -- stopping ---------------------------------------------------------------

    def kill_worker(self, address: str) -> str:
        """SIGKILL the worker at ``address`` for good (with its nanny: the whole process group); returns
        its name."""
        name = self.worker_addresses().get(address)
        if name is None or name not in self.workers:
            raise AssertionError(f"no worker of this cluster at {address}: {self.worker_addresses()}")
        self._kill(self.workers[name])
        return name

    def kill_worker_process(self, address: str) -> int:
        """SIGKILL only the worker process at ``address`` (its nanny starts a new one); returns its pid."""
        from distributed import Client

        with Client(self.address, timeout=10, set_as_default=False) as client:
            pid = int(client.run(os.getpid, workers=[address])[address])
        os.kill(pid, signal.SIGKILL)
        return pid

    def _kill(self, proc: subprocess.Popen) -> None:
        if self.nanny:  # the nanny and the worker process it started (also when the nanny died first)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def kill_scheduler(self) -> None:
        """SIGKILL the scheduler (its workers stay, and notice on their own)."""
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.send_signal(signal.SIGKILL)
            self.scheduler.wait(timeout=30)

    def stop(self) -> None:
        """SIGKILL every process this cluster started (with a nanny, the worker processes it started too)."""
        for proc in self.workers.values():
            self._kill(proc)
        if self.scheduler is not None:
            if self.scheduler.poll() is None:
                self.scheduler.send_signal(signal.SIGKILL)
            try:
                self.scheduler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator:
    """Factory ``dask_cluster(n_workers=2, env=None, pythonpath=(), nanny=False)`` -> a started
    :class:`DaskCluster`."""
    clusters: list[DaskCluster] = []

    def _start(n_workers: int = 2, env: dict[str, str] | None = None,
               pythonpath: tuple[Path, ...] = (), nanny: bool = False) -> DaskCluster:
        cluster = DaskCluster(tmp_path / f"dask{len(clusters)}", env, pythonpath, nanny)
        clusters.append(cluster)
        return cluster.start(n_workers)

    yield _start
    for cluster in clusters:
        cluster.stop()

