"""deploy/cellseg1d.service: verified by systemd-analyze without a single warning, its exposure
score, the life-cycle settings the daemon relies on, the example environment file, and the
real daemon run by a private systemd under the shipped unit.

systemd-analyze comes with Debian's ``systemd`` package (.ci/run installs it); without it
the systemd-analyze tests are skipped, the others run anyway. The private-systemd test
needs root and namespaces (skipped otherwise) and is marked slow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellseg1d.config import Config, apply_env_overrides, build_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "cellseg1d.service"
ENV_FILE = DEPLOY / "cellseg1d.env"
MAX_EXPOSURE = 2.5
SHIPPED_EXEC = "/opt/cellseg1d/.venv/bin/cellseg1d"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd; .ci/run does it)",
)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> [(key, value), ...] in order (keys repeat: DeviceAllow=, SystemCallFilter=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def setting(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    """The effective value of a single-valued setting (the last assignment wins)."""
    values = [v for k, v in unit.get(section, []) if k == key]
    return values[-1] if values else None


_SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}


def timespan_seconds(value: str) -> float:
    """A systemd time span (``180``, ``3min``, ``2min 30s``, ``infinity``) in seconds."""
    if value.strip() == "infinity":
        return float("inf")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts and re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", value), f"not a time span: {value!r}"
    return sum(float(n) * _SPAN_UNITS[u or "s"] for n, u in parts)


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def unit_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this venv's real ``cellseg1d`` script (verify checks it exists)."""
    script = Path(sys.executable).parent / "cellseg1d"
    assert script.is_file(), f"{script} missing: is cellseg1d installed in this venv?"
    text = UNIT.read_text(encoding="utf-8") if text is None else text
    assert SHIPPED_EXEC in text
    path = tmp_path / "cellseg1d.service"  # verify wants the unit's real name
    path.write_text(text.replace(SHIPPED_EXEC, str(script)), encoding="utf-8")
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------- systemd-analyze


@needs_analyze
@pytest.mark.parametrize("user", ["cellseg1d", "no-such-user-c1d"])
def test_verify_prints_nothing_at_all(tmp_path: Path, user: str) -> None:
    """Any line from `systemd-analyze verify` is a finding about the unit: none is accepted.

    User= need not exist where the test runs: verify checks the unit's syntax, its
    commands and dependencies, not the user database (the second case names a user that
    surely does not exist). No line about the environment (a container without a running
    systemd, no /etc/systemd) is filtered out either: systemd-analyze prints none for a
    unit file given by path.
    """
    text = UNIT.read_text(encoding="utf-8")
    text = re.sub(r"^User=cellseg1d$", f"User={user}", text, flags=re.MULTILINE)
    # --man=no: there is no man: page in Documentation= to look up (and CI has no man-db).
    result = analyze("verify", "--man=no", str(unit_copy(tmp_path, text)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


@needs_analyze
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key and a missing command are reported."""
    text = UNIT.read_text(encoding="utf-8").replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    result = analyze("verify", "--man=no", str(unit_copy(tmp_path, text)))
    assert "NoNewPrivilege" in result.stdout + result.stderr
    (tmp_path / "missing").mkdir()
    shipped = tmp_path / "missing" / "cellseg1d.service"
    shutil.copy(UNIT, shipped)  # ExecStart=/opt/cellseg1d/... does not exist here
    if not Path(SHIPPED_EXEC).exists():
        result = analyze("verify", "--man=no", str(shipped))
        assert result.returncode != 0 and "not executable" in result.stdout + result.stderr


def exposure(path: Path) -> tuple[float, str]:
    result = analyze("security", "--offline=true", "--no-pager", str(path))
    output = result.stdout + result.stderr
    if "--offline" in output and ("unrecognized" in output or "unknown option" in output):
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) ", output)
    assert match, f"no overall exposure level in:\n{output}"
    return float(match.group(1)), output


@needs_analyze
def test_security_exposure_at_most_2_5() -> None:
    score, output = exposure(UNIT)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{output}"


#: The systemd version whose score the unit's header and INSTALL.md quote (Debian 12's).
DOCUMENTED_SYSTEMD = 252


@needs_analyze
def test_security_score_is_the_one_documented() -> None:
    """The unit's header and INSTALL.md quote the measured score: keep them true.

    Other systemd versions weigh the settings differently; only the documented one is compared.
    """
    version = re.match(r"systemd (\d+)", analyze("--version").stdout)
    if not version or int(version.group(1)) != DOCUMENTED_SYSTEMD:
        found = version.group(0) if version else "unknown"
        pytest.skip(f"the documented score is systemd {DOCUMENTED_SYSTEMD}'s; this is {found}")
    score, _ = exposure(UNIT)
    assert f": {score:.1f} " in UNIT.read_text(encoding="utf-8").split("[Unit]")[0]
    assert f"**{score:.1f}" in (DEPLOY / "INSTALL.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------- settings the daemon relies on


def test_life_cycle_settings(unit) -> None:
    assert setting(unit, "Service", "Type") == "notify"
    assert setting(unit, "Service", "NotifyAccess") == "main"
    watchdog = setting(unit, "Service", "WatchdogSec")
    assert watchdog is not None and 30 <= timespan_seconds(watchdog) < float("inf")
    reload = setting(unit, "Service", "ExecReload") or ""
    assert re.fullmatch(r"/bin/kill (-HUP|-s HUP) \$MAINPID", reload), reload
    assert setting(unit, "Service", "ExecStart").startswith(f"{SHIPPED_EXEC} run --config ")
    assert setting(unit, "Service", "Restart") == "on-failure"
    assert timespan_seconds(setting(unit, "Service", "TimeoutStartSec")) >= 300
    assert setting(unit, "Service", "User") == setting(unit, "Service", "Group") == "cellseg1d"
    assert setting(unit, "Service", "StateDirectory") == "cellseg1d"
    assert setting(unit, "Service", "StateDirectoryMode") == "0700"
    assert setting(unit, "Service", "EnvironmentFile") == "-/etc/cellseg1d/cellseg1d.env"


def test_stop_timeout_exceeds_the_daemons_drain_time(unit) -> None:
    """systemd must not SIGKILL the daemon while it is still draining (then releasing) jobs."""
    drain = Config().shutdown_timeout_seconds
    stop = timespan_seconds(setting(unit, "Service", "TimeoutStopSec"))
    assert stop >= drain + 30, (
        f"TimeoutStopSec={stop:.0f} s leaves no margin over shutdown_timeout_seconds={drain:.0f} s")
    assert setting(unit, "Service", "KillSignal") in (None, "SIGTERM")


def test_the_default_state_dir_is_the_state_directory(unit) -> None:
    assert str(Config().state_dir) == "/var/lib/" + setting(unit, "Service", "StateDirectory")


def test_write_access_only_where_declared(unit) -> None:
    assert setting(unit, "Service", "ProtectSystem") == "strict"
    paths = [p for k, v in unit["Service"] if k == "ReadWritePaths" for p in v.split()]
    assert paths and all(p.startswith("-/") for p in paths), paths  # a missing folder never fails the start


def test_settings_measured_to_break_torch_stay_off(unit) -> None:
    """Each was measured in a sandboxed run (deploy/INSTALL.md, "Hardening"):
    ProcSubset=pid hides /proc/cpuinfo (torch drops to unvectorised kernels), ~@resources
    refuses sched_setaffinity (torch falls back to one thread); MemoryDenyWriteExecute is
    covered by tests/service/test_mdwe.py."""
    assert setting(unit, "Service", "ProcSubset") in (None, "all")
    filters = " ".join(v for k, v in unit["Service"] if k == "SystemCallFilter")
    assert "@resources" not in filters and "sched_setaffinity" not in filters


def test_gpu_device_access(unit) -> None:
    assert setting(unit, "Service", "DevicePolicy") == "closed"
    allowed = {v.split()[0] for k, v in unit["Service"] if k == "DeviceAllow"}
    assert {"char-nvidia-frontend", "char-nvidia-uvm"} <= allowed
    assert setting(unit, "Service", "PrivateDevices") in (None, "no")  # it would hide /dev/nvidia*


# ----------------------------------------------------------------- deploy/cellseg1d.env


def test_env_file_examples_are_valid_settings() -> None:
    """Every example in the env file, uncommented, is accepted by the config loader."""
    examples: dict[str, str] = {}
    for line in ENV_FILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        assert not stripped or stripped.startswith("#"), f"the example env file sets something: {line!r}"
        match = re.fullmatch(r"#([A-Z][A-Z0-9_]*)=(\S.*)", stripped)
        if match:
            examples[match.group(1)] = match.group(2)
    assert "CELLSEG1D_CATALOG_PASSWORD" in examples
    settings = {k: v for k, v in examples.items() if k.startswith("CELLSEG1D_")}
    data = apply_env_overrides({}, settings)
    assert "catalog_password" not in data  # a secret, not a setting: read by the catalog only
    config = build_config(data, str(ENV_FILE))
    assert config.log_format == "json" and config.metrics.host_port == ("127.0.0.1", 9108)


# ----------------------------------------------------------------- the daemon under the unit, for real


def _find_systemd() -> Path | None:
    return next((p for p in (Path("/lib/systemd/systemd"), Path("/usr/lib/systemd/systemd")) if p.is_file()), None)


def _why_no_private_systemd() -> str | None:
    """Why a private systemd cannot be booted here (None: it can be tried)."""
    if sys.platform != "linux":
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root: boots a private systemd as PID 1 in its own namespaces"
    missing = [tool for tool in ("unshare", "nsenter", "systemctl") if shutil.which(tool) is None]
    if _find_systemd() is None or missing:
        return f"systemd or util-linux tools missing ({missing or 'systemd'})"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--cgroup", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.strip()}"
    return None


def _free_id(taken: set[int], start: int = 61000) -> int:
    free = next(i for i in range(start, start + 4000) if i not in taken)
    taken.add(free)
    return free


class PrivateSystemd:
    """A systemd (PID 1 of new PID, mount and cgroup namespaces) that runs the shipped unit.

    The host is left alone: /run, /var/lib and /srv are fresh tmpfs inside, the test's
    users are added to private copies of /etc/passwd and /etc/group, and killing the
    ``unshare`` process takes the whole namespace with it.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self, boot_script: str) -> None:
        script = self.work / "boot.sh"
        script.write_text(boot_script)
        script.chmod(0o755)
        self.boot_log = self.work / "boot.log"
        with self.boot_log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--cgroup", str(script)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            pids = children.read_text().split() if children.exists() else []
            if pids:
                self.pid = int(pids[0])
                state = self.run("systemctl is-system-running", timeout=10).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.3)
        self.stop()
        pytest.skip(f"a private systemd does not boot here: {self.boot_log.read_text(errors='replace')[-2000:]}")

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "sh", "-c", command],
                              capture_output=True, text=True, timeout=timeout)

    def show(self, prop: str) -> str:
        return self.run(f"systemctl show cellseg1d -p {prop} --value").stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # --kill-child: systemd, and with it everything in the namespace, dies too
            self.proc.wait(timeout=30)


@pytest.fixture
def private_systemd(tmp_path: Path) -> Iterator[PrivateSystemd]:
    reason = _why_no_private_systemd()
    if reason:
        pytest.skip(reason)
    harness = PrivateSystemd(tmp_path)
    yield harness
    harness.stop()


TEST_CONFIG = """\
[[watch.roots]]
path = "/srv/acquisitions"
[watch]
rescan_seconds = 5
[readiness]
settle_seconds = 1
"""

MAKE_IMAGE = """\
import sys
from pathlib import Path
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr
data, _ = make_czyx((96, 96), 8, seed=0)
write_ome_zarr(Path(sys.argv[1]), data[0], axes="czyx", ngff_version="0.5", channel_names=["nuclei", "membrane"])
"""


@pytest.mark.slow
def test_the_daemon_runs_under_the_shipped_unit(private_systemd: PrivateSystemd, tmp_path: Path) -> None:
    """The shipped unit, sandbox and all, runs the real daemon: READY, status, watchdog, reload, stop.

    The acquisition folder belongs to another user and is shared with cellseg1d through a
    group only (mode 2770), as on a microscope PC; the labels must come out with that group.
    A test drop-in only points ExecStart= at this venv, lets the daemon write that folder and
    sends its output to a file (no journald inside).
    """
    repo = Path(__file__).resolve().parents[2]
    if any(p.is_relative_to("/tmp") or p.is_relative_to("/var/tmp") for p in (repo, Path(sys.prefix))):
        pytest.skip("the checkout is under /tmp, which the unit's PrivateTmp= hides")
    import grp
    import pwd

    uids, gids = {u.pw_uid for u in pwd.getpwall()}, {g.gr_gid for g in grp.getgrall()}
    passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
    try:
        service_uid = pwd.getpwnam("cellseg1d").pw_uid
    except KeyError:
        service_uid = _free_id(uids)
        gids.add(service_uid)
        passwd += f"cellseg1d:x:{service_uid}:{service_uid}::/var/lib/cellseg1d:/usr/sbin/nologin\n"
        group += f"cellseg1d:x:{service_uid}:\n"
    owner, shared = _free_id(uids), _free_id(gids)
    passwd += f"c1dtest-owner:x:{owner}:{shared}::/nonexistent:/usr/sbin/nologin\n"
    group += f"c1dtest-share:x:{shared}:cellseg1d,c1dtest-owner\n"
    (tmp_path / "passwd").write_text(passwd)
    (tmp_path / "group").write_text(group)
    (tmp_path / "cellseg1d.toml").write_text(TEST_CONFIG)
    (tmp_path / "make_image.py").write_text(MAKE_IMAGE)

    units = tmp_path / "units"
    (units / "cellseg1d.service.d").mkdir(parents=True)
    for target in ("sysinit", "basic", "shutdown", "network-online", "multi-user"):
        (units / f"{target}.target").write_text("[Unit]\nDefaultDependencies=no\n")
    shutil.copy(UNIT, units / "cellseg1d.service")
    drop_in = [
        "[Service]", "ExecStart=",
        f"ExecStart={Path(sys.executable).parent / 'cellseg1d'} run --config /srv/etc/cellseg1d.toml",
        "ReadWritePaths=-/srv/acquisitions", "StandardOutput=append:/run/cellseg1d-test.log",
        "StandardError=inherit", "Environment=OMP_NUM_THREADS=1",
    ]
    hidden = [p for p in {repo, Path(sys.base_prefix).resolve()}
              if any(p.is_relative_to(h) for h in ("/home", "/root", "/run/user"))]
    if hidden:  # a development checkout or interpreter where ProtectHome= hides it
        drop_in += ["ProtectHome=tmpfs"] + [f"BindReadOnlyPaths={p}" for p in sorted(hidden)]
    (units / "cellseg1d.service.d" / "test.conf").write_text("\n".join(drop_in) + "\n")

    private_systemd.start(f"""#!/bin/bash
set -e
mount --make-rprivate /
for d in /run /var/lib /srv; do mount -t tmpfs tmpfs $d; done
mount --bind {tmp_path}/passwd /etc/passwd
mount --bind {tmp_path}/group /etc/group
mkdir -p /srv/etc /srv/acquisitions
cp {tmp_path}/cellseg1d.toml /srv/etc/
chown {owner}:{shared} /srv/acquisitions && chmod 2770 /srv/acquisitions
{sys.executable} {tmp_path}/make_image.py /srv/acquisitions/a.zarr
chown -R {owner}:{shared} /srv/acquisitions && chmod -R g+rwX,o-rwx /srv/acquisitions
export SYSTEMD_UNIT_PATH={units} container=cellseg1d-test
exec {_find_systemd()} --system --unit=basic.target --log-target=console --log-level=warning
""")
    sd = private_systemd

    def log() -> str:
        return sd.run("cat /run/cellseg1d-test.log; systemctl status cellseg1d --no-pager -l").stdout

    def wait_for(command: str, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while sd.run(command).returncode != 0:
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log()}"
            time.sleep(0.5)

    started = sd.run("systemctl start cellseg1d", timeout=300)  # returns once the daemon sent READY=1
    assert started.returncode == 0, started.stderr + log()
    assert sd.show("ActiveState") == "active", log()
    assert sd.show("StatusText").startswith("watching"), log()
    assert int(sd.show("WatchdogTimestampMonotonic") or 0) > 0, "the daemon never fed the watchdog\n" + log()

    labels = "/srv/acquisitions/a.zarr/labels/cellseg1d"
    wait_for(f"test -f {labels}/zarr.json", "the label image")
    assert sd.run(f"stat -c %g {labels}").stdout.strip() == str(shared), "labels not in the folder's group"

    assert sd.run("systemctl reload cellseg1d").returncode == 0, log()
    wait_for("grep -q 'configuration reloaded' /run/cellseg1d-test.log", "the reload")
    assert sd.show("ActiveState") == "active", log()

    stopped = sd.run("systemctl stop cellseg1d", timeout=300)
    assert stopped.returncode == 0, stopped.stderr + log()
    assert (sd.show("Result"), sd.show("ExecMainStatus")) == ("success", "0"), log()
    assert "stopped" in sd.run("cat /run/cellseg1d-test.log").stdout


# ----------------------------------------------------------------- the Dask units (deploy/dask)

DASK_UNITS = {"cellseg1d-dask-scheduler.service": "cellseg1d-dask-scheduler.service",
              "cellseg1d-dask-worker@.service": "cellseg1d-dask-worker@0.service"}


@needs_analyze
@pytest.mark.parametrize("shipped", sorted(DASK_UNITS))
def test_dask_units_verify_cleanly_and_start_the_dask_commands(tmp_path: Path, shipped: str) -> None:
    """The scheduler and worker units: no finding from verify, their ExecStart is this venv's `dask`."""
    dask = Path(sys.executable).parent / "dask"
    assert dask.is_file(), f"{dask} missing: is distributed installed in this venv?"
    text = (DEPLOY / "dask" / shipped).read_text(encoding="utf-8")
    assert "/opt/cellseg1d/.venv/bin/dask " in text
    path = tmp_path / DASK_UNITS[shipped]  # a template is verified as one of its instances
    path.write_text(text.replace("/opt/cellseg1d/.venv/bin/dask", str(dask)), encoding="utf-8")
    proc = analyze("verify", str(path))
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    exec_start = setting(parse_unit(text), "Service", "ExecStart") or ""
    command = "scheduler" if "scheduler" in shipped else "worker"
    assert exec_start.split()[1] == command, exec_start
    if command == "worker":
        assert "--nthreads 1" in exec_start and "CUDA_VISIBLE_DEVICES=%i" in text
    score = analyze("security", "--offline=true", str(path))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", score.stdout + score.stderr)
    assert found and float(found.group(1)) <= 3.0, score.stdout[-400:]
