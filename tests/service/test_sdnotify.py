"""cellseg1d.service.sdnotify against real AF_UNIX datagram sockets (path and abstract), as systemd uses them."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellseg1d.service.sdnotify import Notifier

LOGGER = "cellseg1d.service.sdnotify"


class Receiver:
    """The systemd side: a bound SOCK_DGRAM socket that reads datagrams (and the sender's pid)."""

    def __init__(self, address: str, env_value: str) -> None:
        self.address, self.env_value = address, env_value
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as systemd does
        self.sock.bind(address)
        self.sock.settimeout(10)

    def recv(self) -> bytes:
        return self.recv_with_pid()[0]

    def recv_with_pid(self) -> tuple[bytes, int | None]:
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
        return data, pid

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(10)
        return False

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def close(self) -> None:
        self.sock.close()


def _short_dir(tmp_path: Path) -> Path:
    """tmp_path, or a short folder when a socket path in it would pass AF_UNIX's 108-byte limit."""
    if len(str(tmp_path / "notify.sock")) < 100:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = str(_short_dir(tmp_path) / "notify.sock")
    receiver = Receiver(path, path)
    yield receiver
    receiver.close()
    Path(path).unlink(missing_ok=True)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"cellseg1d-test-{uuid.uuid4().hex}"
    receiver = Receiver("\0" + name, "@" + name)
    yield receiver
    receiver.close()


def test_path_socket_gets_exact_datagrams(path_receiver: Receiver) -> None:
    notifier = Notifier.from_env(path_receiver.environ())
    assert notifier.enabled
    assert notifier.ready("watching 2 folders")
    assert path_receiver.recv() == b"READY=1\nSTATUS=watching 2 folders"
    assert notifier.ready()
    assert path_receiver.recv() == b"READY=1"
    assert notifier.status("line one\nline two\r\nthree")
    assert path_receiver.recv() == b"STATUS=line one line two three"
    assert notifier.watchdog()
    assert path_receiver.recv() == b"WATCHDOG=1"
    assert notifier.stopping("draining 1 job")
    assert path_receiver.recv() == b"STOPPING=1\nSTATUS=draining 1 job"
    assert notifier.stopping()
    assert path_receiver.recv() == b"STOPPING=1"
    # several assignments in one datagram, in the order given; ints and booleans as numbers
    assert notifier.notify(READY=1, STATUS="up", EXTEND_TIMEOUT_USEC=5_000_000, WATCHDOG=True)
    assert path_receiver.recv() == b"READY=1\nSTATUS=up\nEXTEND_TIMEOUT_USEC=5000000\nWATCHDOG=1"
    assert notifier.status("Zellen gezählt: 12")  # UTF-8 as is
    assert path_receiver.recv() == "STATUS=Zellen gezählt: 12".encode()
    assert notifier.status("a\0b")  # systemd drops a message with a NUL in it
    assert path_receiver.recv() == b"STATUS=a b"
    assert notifier.notify() is False  # nothing to say: nothing sent
    assert path_receiver.nothing_pending()
    notifier.close()


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    notifier = Notifier.from_env(abstract_receiver.environ())
    assert notifier.enabled
    assert notifier.ready("up")
    assert notifier.watchdog()
    assert abstract_receiver.recv() == b"READY=1\nSTATUS=up"
    assert abstract_receiver.recv() == b"WATCHDOG=1"
    notifier.close()


def test_reloading_sends_monotonic_usec(path_receiver: Receiver) -> None:
    notifier = Notifier.from_env(path_receiver.environ())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = path_receiver.recv().decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and len(lines) == 2
    assert before <= int(value) <= after
    notifier.close()


def test_one_socket_is_reused_and_reopened_after_close(path_receiver: Receiver) -> None:
    notifier = Notifier.from_env(path_receiver.environ())
    assert notifier._sock is None  # lazily created
    notifier.watchdog()
    first = notifier._sock
    notifier.watchdog()
    assert notifier._sock is first and first is not None
    notifier.close()
    assert notifier._sock is None
    notifier.close()  # twice is fine
    assert notifier.status("again")
    assert [path_receiver.recv() for _ in range(3)] == [b"WATCHDOG=1", b"WATCHDOG=1", b"STATUS=again"]
    notifier.close()


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "not a number"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "120000000"}, 60.0),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "{me}"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "{other}"}, None),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "garbage"}, 1.5),  # unparsable: as if unset
])
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    for key, value in environ.items():
        env[key] = value.format(me=os.getpid(), other=os.getpid() + 1)
    assert Notifier.from_env(env).watchdog_interval() == expected


def test_watchdog_interval_is_none_in_a_forked_child() -> None:
    """WATCHDOG_PID names the main process; a forked child inherits the notifier but must not ping."""
    notifier = Notifier.from_env({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval() == 1.0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.write(write, b"none" if notifier.watchdog_interval() is None else b"set")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"none"
    os.close(read)


def test_unset_environment_is_a_silent_no_op(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
        notifier = Notifier.from_env(env)
        assert not notifier.enabled
        assert notifier.ready("x") is False
        assert notifier.status("x") is False
        assert notifier.watchdog() is False
        assert notifier.reloading() is False
        assert notifier.stopping("x") is False
        assert notifier.notify(READY=1) is False
        assert notifier.watchdog_interval() is None
        assert notifier._sock is None  # no socket was even created
        notifier.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch, path_receiver: Receiver) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_receiver.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier.from_env()
    assert notifier.enabled and notifier.watchdog_interval() == 5.0
    assert notifier.ready()
    assert path_receiver.recv() == b"READY=1"
    assert os.environ["NOTIFY_SOCKET"] == path_receiver.env_value  # left in place
    notifier.close()


def test_missing_socket_never_raises_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    missing = _short_dir(tmp_path) / "gone.sock"
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(missing), "WATCHDOG_USEC": "1000000"})
    assert notifier.enabled  # set and well-formed: sends are attempted
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.status("y") is False
    assert notifier.reloading() is False
    ours = [r for r in caplog.records if r.name == LOGGER]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(missing) in warnings[0].getMessage()
    assert len([r for r in ours if r.levelno == logging.DEBUG]) == 3

    # systemd (re)appears at that address: the same notifier delivers again, no new warning
    receiver = Receiver(str(missing), str(missing))
    try:
        assert notifier.watchdog() is True
        assert receiver.recv() == b"WATCHDOG=1"
    finally:
        receiver.close()
        notifier.close()
    assert len([r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]) == 1


def test_other_failures_never_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    not_a_socket = tmp_path / "plain-file"
    not_a_socket.write_text("")
    for address in (str(not_a_socket), "/" + "x" * 200, "@"):  # not a socket, path too long, empty name
        notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
        assert notifier.ready() is False
        notifier.close()


def test_threads_share_one_notifier(path_receiver: Receiver) -> None:
    notifier = Notifier.from_env(path_receiver.environ())

    def ping(n: int) -> None:
        for i in range(20):
            assert notifier.status(f"{n}-{i}")

    # read while they send, as systemd does: a datagram socket queues only a few messages
    got: set[bytes] = set()
    reader = threading.Thread(target=lambda: got.update(path_receiver.recv() for _ in range(80)))
    reader.start()
    threads = [threading.Thread(target=ping, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.join(30)
    assert got == {f"STATUS={n}-{i}".encode() for n in range(4) for i in range(20)}
    notifier.close()


CHILD = """
from cellseg1d.service.sdnotify import Notifier
n = Notifier.from_env()
assert n.ready("child up")
assert n.status("working")
assert n.stopping()
n.close()
"""


def test_child_process_delivers_in_order(path_receiver: Receiver) -> None:
    """A separate process (as the daemon under systemd) sends in order, with its own pid as sender."""
    env = {**os.environ, "NOTIFY_SOCKET": path_receiver.env_value}
    env.pop("WATCHDOG_PID", None)
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    got = [path_receiver.recv_with_pid() for _ in range(3)]
    assert [data for data, _ in got] == [b"READY=1\nSTATUS=child up", b"STATUS=working", b"STOPPING=1"]
    pids = {pid for _, pid in got}
    # NotifyAccess=main: systemd accepts only datagrams whose kernel-attached credentials name the main pid
    assert len(pids) == 1 and pids != {os.getpid()} and None not in pids


def test_child_process_with_abstract_socket(abstract_receiver: Receiver) -> None:
    env = {**os.environ, "NOTIFY_SOCKET": abstract_receiver.env_value}
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert [abstract_receiver.recv() for _ in range(3)] == [
        b"READY=1\nSTATUS=child up", b"STATUS=working", b"STOPPING=1"]


def test_a_receiver_that_stops_reading_does_not_hang_the_sender(
        path_receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel queues only a few datagrams; past that a send fails after a timeout, it never blocks for good."""
    from cellseg1d.service import sdnotify

    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT_SECONDS", 0.05)
    notifier = Notifier.from_env(path_receiver.environ())
    started = time.monotonic()
    results = [notifier.watchdog() for _ in range(100)]
    assert time.monotonic() - started < 30
    assert results[0] is True and results[-1] is False
    notifier.close()
