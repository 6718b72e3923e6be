"""``cellseg1d doctor`` on real folders, real SQLite catalogs and real adapter stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import cellseg1d
from cellseg1d.service import doctor as dc
from cellseg1d.catalog import Catalog
from cellseg1d.catalog.db import alembic_config, open_catalog
from cellseg1d.cli import main
from cellseg1d.config import load_config
from cellseg1d.service.statedir import prepare_state_dir
from tests.helpers import REPO

AS_ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No config path, password or setting override from the environment of whoever runs the tests."""
    for name in list(os.environ):
        if name.startswith("CELLSEG1D_"):
            monkeypatch.delenv(name)


class Setup:
    """A daemon setup in tmp_path: watched folder, state dir, config file."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "acq"
        self.state = tmp_path / "state"
        self.config_file = tmp_path / "cellseg1d.toml"
        self.root.mkdir()

    def write(self, body: str = "", root: Path | None = None, root_extra: str = "") -> Path:
        """Write the config: state dir and one root (``root``), plus ``body`` (more tables)."""
        self.config_file.write_text(
            f'state_dir = "{self.state}"\n\n[[watch.roots]]\npath = "{root or self.root}"\n{root_extra}\n{body}\n',
            encoding="utf-8",
        )
        return self.config_file

    def prepare(self) -> None:
        """State dir and migrated catalog, as the daemon leaves them."""
        prepare_state_dir(self.state)
        catalog = open_catalog(self.config())
        catalog.migrate()
        catalog.close()

    def config(self) -> Any:
        return load_config(self.config_file)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    s = Setup(tmp_path)
    s.write()
    s.prepare()
    return s


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """(exit status, the --json report, everything printed) of ``cellseg1d doctor ARGS --json``."""
    rc = main(["doctor", *args, "--json"])
    out, err = capsys.readouterr()
    return rc, json.loads(out), out + err


def rows(report: dict[str, Any], status: str | None = None) -> list[dict[str, Any]]:
    return [r for r in report["checks"] if status is None or r["status"] == status]


def row(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [r for r in report["checks"] if r["name"] == name]
    assert found, f"no row {name!r} in {[r['name'] for r in report['checks']]}"
    return found[0]


def failing(report: dict[str, Any]) -> dict[str, str]:
    return {r["name"]: r["message"] for r in rows(report, "fail")}


# -- a good setup -------------------------------------------------------------------------------------------


def test_good_setup_passes(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert failing(report) == {}
    assert rc == 0 and report["ok"] is True
    names = [r["name"] for r in report["checks"]]
    for expected in ("config", "watch.roots[0]", "inotify", "state_dir", "disk space: state_dir",
                     "disk space: watch.roots[0]", "catalog", "sam.checkpoint", "adapters", "device", "plugins"):
        assert expected in names
    for r in report["checks"]:
        assert set(r) == {"name", "status", "message", "fix", "details"}
        assert r["status"] in ("ok", "warn", "fail", "skip")
    assert row(report, "catalog")["status"] == "ok" and "schema at head" in row(report, "catalog")["message"]
    assert row(report, "state_dir")["status"] == "ok"
    assert "classical" in row(report, "sam.checkpoint")["message"]
    assert row(report, "adapters")["status"] == "ok"


def test_good_setup_as_a_subprocess_prints_a_table(setup: Setup) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSEG1D_")}
    proc = subprocess.run([sys.executable, "-m", "cellseg1d", "doctor", "--config", str(setup.config_file)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cellseg1d doctor" in proc.stdout and "watch.roots[0]" in proc.stdout
    assert " warnings, 0 failed" in proc.stdout.splitlines()[-1]


def test_state_dir_only_without_config(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report, _ = doctor(capsys, "--state-dir", str(setup.state))
    assert rc == 0, failing(report)
    assert row(report, "watch.roots")["status"] == "warn"  # quick start: folders come from run --watch
    assert row(report, "catalog")["status"] == "ok"


def test_fresh_install_only_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing created yet: the state dir and the SQLite catalog are made at the first start, doctor makes none."""
    s = Setup(tmp_path)
    s.write()
    rc, report, _ = doctor(capsys, "--config", str(s.config_file))
    assert rc == 0, failing(report)
    assert row(report, "state_dir")["status"] == "warn"
    assert row(report, "catalog")["status"] == "warn"
    assert "created at the first start" in row(report, "catalog")["message"]
    assert not s.state.exists()  # doctor created nothing


# -- broken settings ----------------------------------------------------------------------------------------


def test_config_syntax_error(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.config_file.write_text("state_dir = \n[watch\n", encoding="utf-8")
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1 and report["ok"] is False
    first = report["checks"][0]
    assert first["name"] == "config" and first["status"] == "fail"
    assert str(setup.config_file) in first["message"] and "not valid TOML" in first["message"]
    assert all(r["status"] == "skip" for r in report["checks"][1:]) and len(report["checks"]) > 5


def test_config_unknown_setting(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write("[watch]\npolling = false\nbogus_setting = 1\n")
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    message = row(report, "config")["message"]
    assert "watch.bogus_setting" in message and "unknown setting" in message
    assert str(setup.config_file) in message


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report, _ = doctor(capsys, "--config", str(tmp_path / "nope.toml"))
    assert rc == 1 and "nope.toml does not exist" in row(report, "config")["message"]


def test_config_file_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, report, text = doctor(capsys, "--config", str(tmp_path))
    assert rc == 1 and row(report, "config")["status"] == "fail" and str(tmp_path) in row(report, "config")["message"]
    assert "Traceback" not in text


def test_no_roots_in_a_config_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.config_file.write_text(f'state_dir = "{setup.state}"\n', encoding="utf-8")
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1 and "watch.roots" in failing(report)


def test_root_does_not_exist(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    missing = setup.tmp / "x" / "missing"
    setup.write(root=missing)
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    assert failing(report)["watch.roots[0]"] == f"watch.roots[0].path: {missing} does not exist"


def test_root_is_a_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = setup.tmp / "plain.txt"
    a_file.write_text("not a folder")
    setup.write(root=a_file)
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    assert failing(report)["watch.roots[0]"] == f"watch.roots[0].path: {a_file} is not a folder"


def test_mirror_root_that_cannot_be_created(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = setup.tmp / "blocker"
    blocker.write_text("a file where a folder should be")
    mirror = blocker / "labels"
    setup.write(root_extra=f'output = "mirror"\nmirror_root = "{mirror}"\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    message = failing(report)["watch.roots[0]"]
    assert f"watch.roots[0].mirror_root: {mirror}" in message and f"{blocker} is not a folder" in message


def test_mirror_root_to_be_created_is_fine(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    mirror = setup.tmp / "results" / "labels"
    setup.write(root_extra=f'output = "mirror"\nmirror_root = "{mirror}"\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 0, failing(report)
    assert "created at the first result" in row(report, "watch.roots[0]")["message"]
    assert not mirror.exists()


@pytest.mark.skipif(AS_ROOT, reason="root may write into any folder: a read-only root is not observable")
def test_in_place_root_not_writable(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.root.chmod(0o555)
    try:
        rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    finally:
        setup.root.chmod(0o755)
    assert rc == 1 and "is not writable" in failing(report)["watch.roots[0]"]


def test_state_dir_readable_by_others_warns(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.state.chmod(0o755)
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    state = row(report, "state_dir")
    assert state["status"] == "warn" and rc == 0  # the daemon makes it 0700 again at its next start
    assert f"state_dir: {setup.state} has mode 0755" in state["message"] and "chmod 700" in state["fix"]


def test_state_dir_writable_by_everyone_fails(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.state.chmod(0o777)
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1 and "mode 0777" in failing(report)["state_dir"]


def test_state_dir_is_a_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = setup.tmp / "state-file"
    a_file.write_text("")
    setup.state = a_file
    setup.write()
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1 and failing(report)["state_dir"] == f"state_dir: {a_file} is not a folder"


def test_catalog_with_pending_migrations(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    from alembic import command

    (setup.state / "catalog.sqlite").unlink()
    catalog = Catalog(f"sqlite:///{setup.state / 'catalog.sqlite'}")
    with catalog.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    catalog.close()
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    message = failing(report)["catalog"]
    versions = sorted((Path(cellseg1d.__file__).parent / "catalog" / "migrations" / "versions").glob("0*.py"))
    assert "revision 0001" in message
    assert f"{len(versions) - 1} migration(s) pending (0002, 0003" in message
    assert str(setup.state / "catalog.sqlite") in message
    assert row(report, "adapters")["status"] == "skip"
    # doctor never migrates
    check = Catalog(f"sqlite:///{setup.state / 'catalog.sqlite'}")
    assert check.schema_revision() == "0001"
    check.close()


@pytest.mark.parametrize("in_url", [True, False], ids=["password-in-url", "password-in-environment"])
def test_unreachable_postgresql_hides_the_password(setup: Setup, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, in_url: bool) -> None:
    secret = "s3cret-Pw-4711"
    if in_url:
        url = f"postgresql+psycopg://u:{secret}@127.0.0.1:1/db"
    else:
        url = "postgresql+psycopg://u@127.0.0.1:1/db"
        monkeypatch.setenv("CELLSEG1D_CATALOG_PASSWORD", secret)
    setup.write(f'[catalog]\nurl = "{url}"\n')
    rc, report, text = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    message = failing(report)["catalog"]
    assert "127.0.0.1:1/db" in message and "cannot reach" in message
    assert secret not in text
    # and in the table too
    assert main(["doctor", "--config", str(setup.config_file)]) == 1
    out, err = capsys.readouterr()
    assert "catalog" in out and secret not in out + err


def test_checkpoint_missing(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    missing = setup.tmp / "models" / "sam_vit_b_01ec64.pth"
    setup.write(f'[sam]\ncheckpoint = "{missing}"\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    assert failing(report)["sam.checkpoint"] == f"sam.checkpoint: {missing} does not exist"
    assert "cellseg1d models fetch vit_b" in row(report, "sam.checkpoint")["fix"]
    assert row(report, "plugin sam")["status"] == "skip"  # its configure would load the checkpoint


def test_checkpoint_with_a_wrong_checksum(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    fake = setup.tmp / "sam_vit_b_01ec64.pth"
    fake.write_bytes(os.urandom(4096))
    setup.write(f'[sam]\ncheckpoint = "{fake}"\nmodel_type = "vit_b"\nallow_custom_checkpoint = false\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    message = failing(report)["sam.checkpoint"]
    assert message.startswith(f"sam.checkpoint: {fake} is not the official vit_b checkpoint")
    assert "cellseg1d models fetch vit_b" in row(report, "sam.checkpoint")["fix"]


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A small random SAM checkpoint ("tiny" spec): the doctor reads its backbone from the shapes."""
    import torch

    from cellseg1d.model.sam import build_sam

    torch.manual_seed(seed)
    torch.save(build_sam("tiny", 256).state_dict(), path)
    return path


def test_custom_checkpoint_allowed(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tiny_checkpoint(setup.tmp / "finetuned.pth")
    setup.write(f'[sam]\ncheckpoint = "{fake}"\nallow_custom_checkpoint = true\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 0, failing(report)
    assert "custom tiny checkpoint" in row(report, "sam.checkpoint")["message"]


def test_unknown_plugin(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write('[plugins]\nenable = ["no-such-plugin"]\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    message = failing(report)["plugins"]
    assert "plugins.enable" in message and "no-such-plugin" in message


def test_plugin_whose_configure_raises(setup: Setup, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cellseg1d.builtin import readiness
    from cellseg1d.hookspecs import hookimpl

    @hookimpl
    def configure(config: Any) -> None:
        raise ValueError("bad readiness setting")

    monkeypatch.setattr(readiness, "configure", configure, raising=False)
    rc, report, text = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1 and "Traceback" not in text
    message = failing(report)["plugin readiness"]
    assert "plugin 'readiness'" in message and "bad readiness setting" in message


def test_no_segmenter_left(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write('[plugins]\ndisable = ["classical", "sam"]\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1 and "no segmenter" in failing(report)["plugins"]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_available(), reason="this machine has CUDA: 'cuda' is available here")
def test_cuda_without_cuda(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    fake = setup.tmp / "finetuned.pth"
    fake.write_bytes(os.urandom(1024))
    setup.write(f'[sam]\ncheckpoint = "{fake}"\nallow_custom_checkpoint = true\ndevice = "cuda"\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    message = failing(report)["device"]
    assert message.startswith("sam.device = 'cuda':") and "CUDA is not available" in message


@pytest.mark.skipif(_cuda_available(), reason="this machine has CUDA: 'cuda' is available here")
def test_cuda_without_cuda_while_sam_is_off_only_warns(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write('[sam]\ndevice = "cuda"\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 0 and row(report, "device")["status"] == "warn"
    assert "not used while SAM is off" in row(report, "device")["message"]


def test_device_reports_the_cpu(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.write('[sam]\ndevice = "cpu"\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    device = row(report, "device")
    assert rc == 0 and device["status"] == "ok"
    assert f"{os.cpu_count()} cores" in device["message"] and device["details"]["device"] == "cpu"


# -- adapters in the registry -------------------------------------------------------------------------------


def _make_adapter(folder: Path, name: str, base_sha: str) -> Path:
    """A real adapter folder: random LoRA weights on the tiny SAM, trained (as it says) on ``base_sha``."""
    import torch

    from cellseg1d.model.adapters import AdapterMetadata, save_adapter
    from cellseg1d.model.lora import apply_lora
    from cellseg1d.model.sam import build_sam
    from tests.model.test_lora import randomize_lora

    torch.manual_seed(0)
    model = apply_lora(build_sam("tiny", 64))
    randomize_lora(model, seed=1)
    return save_adapter(model, folder, AdapterMetadata(name, "tiny", base_sha))


@pytest.fixture
def with_adapter(setup: Setup) -> tuple[Setup, Any]:
    """SAM on (a custom tiny checkpoint) and adapter hela@v1 registered and assigned to experiment hela."""
    from cellseg1d.routing.registry import BaseModel, Registry, sha256_of

    checkpoint = tiny_checkpoint(setup.tmp / "tiny.pth")
    setup.write(f'[sam]\ncheckpoint = "{checkpoint}"\nmodel_type = "tiny"\nallow_custom_checkpoint = true\n')
    config = setup.config()
    base = BaseModel("tiny", sha256_of(checkpoint))
    catalog = open_catalog(config)
    registry = Registry(catalog, config.adapter_store, base)
    registry.add(_make_adapter(setup.tmp / "made" / "hela", "hela", base.sha256))
    registry.assign("hela", "hela")
    row_ = registry.get("hela")
    catalog.close()
    return setup, row_


def test_assigned_adapter_intact_then_modified(with_adapter: tuple[Setup, Any],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    setup, adapter = with_adapter
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 0, failing(report)
    assert row(report, "adapter hela@v1 (hela)")["status"] == "ok"
    assert row(report, "plugin sam")["status"] == "skip"

    weights = Path(adapter.store_path) / "adapter.safetensors"
    with weights.open("ab") as handle:
        handle.write(b"tampered")
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    message = failing(report)["adapter hela@v1 (hela)"]
    assert f"{weights} was modified" in message and adapter.sha256 in message


def test_assigned_adapter_of_another_base(with_adapter: tuple[Setup, Any],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    setup, _ = with_adapter
    other = tiny_checkpoint(setup.tmp / "other.pth", seed=1)  # the daemon now runs another base checkpoint
    setup.write(f'[sam]\ncheckpoint = "{other}"\nmodel_type = "tiny"\nallow_custom_checkpoint = true\n')
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    assert "trained on base checkpoint sha256" in failing(report)["adapter hela@v1 (hela)"]


def test_assigned_adapter_store_folder_missing(with_adapter: tuple[Setup, Any],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    setup, adapter = with_adapter
    shutil.rmtree(adapter.store_path)
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    assert f"store folder {adapter.store_path} is missing" in failing(report)["adapter hela@v1 (hela)"]


def test_fallback_adapter_folder(with_adapter: tuple[Setup, Any], capsys: pytest.CaptureFixture[str]) -> None:
    setup, _ = with_adapter
    body = setup.config_file.read_text()
    setup.config_file.write_text(body.replace("[sam]\n", f'[sam]\nadapter = "{setup.tmp / "made" / "hela"}"\n'))
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 0, failing(report)
    assert row(report, "sam.adapter")["status"] == "ok"

    missing = setup.tmp / "no-adapter"
    setup.config_file.write_text(body.replace("[sam]\n", f'[sam]\nadapter = "{missing}"\n'))
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1 and str(missing) in failing(report)["sam.adapter"]


# -- a check that crashes -----------------------------------------------------------------------------------


def test_a_crashing_check_is_a_failing_row(setup: Setup, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: Any) -> list[dc.Check]:
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(dc, "check_state_dir", broken)
    rc, report, text = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1 and "Traceback" not in text
    assert failing(report) == {"state_dir": "the state_dir check could not run: RuntimeError: something unexpected"}
    assert row(report, "plugins")["status"] == "ok"  # the checks after it still ran


# -- warnings only: network filesystem, inotify limit -------------------------------------------------------


def test_network_share_and_tight_inotify_limit_only_warn(setup: Setup, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for i in range(9):
        (setup.root / f"plate{i}").mkdir()  # 10 folders with the root
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        f"90 27 0:55 / {setup.root} rw,relatime shared:40 - nfs4 nas:/export/acq rw,vers=4.2\n"
    )
    limit = tmp_path / "max_user_watches"
    limit.write_text("12\n")
    monkeypatch.setattr(dc.host, "MOUNTINFO", mountinfo)
    monkeypatch.setattr(dc.host, "INOTIFY_MAX_USER_WATCHES", limit)
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 0 and report["ok"] is True and failing(report) == {}
    fs = row(report, "watch.roots[0] filesystem")
    assert fs["status"] == "warn" and "nfs4" in fs["message"]
    assert "inotify sees no changes made by other machines; set watch.polling = true" in fs["message"]
    inotify = row(report, "inotify")
    assert inotify["status"] == "warn" and inotify["details"]["folders"] == 10

    limit.write_text("5\n")  # fewer watches than folders: a failure with inotify...
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1 and "max_user_watches = 5" in failing(report)["inotify"]

    setup.write("[watch]\npolling = true\n")  # ...only a warning when polling
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 0 and row(report, "inotify")["status"] == "warn"
    assert row(report, "watch.roots[0] filesystem")["status"] == "ok"


MOUNTINFO_SAMPLE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:40 / /mnt/micro\\040share rw,relatime shared:1 - cifs //scope/share rw,vers=3.1.1
41 27 0:41 / /mnt/nfs rw - nfs4 nas:/export rw
42 41 0:42 / /mnt/nfs/local rw - xfs /dev/sdb1 rw
43 27 0:43 / /home/u/remote rw,nosuid - fuse.sshfs u@host:/data rw
44 27 0:44 / /media/thing rw - fuse.mystery thing rw
45 27 0:45 / /mnt/nfs rw - tmpfs tmpfs rw
not a mountinfo line
"""


def test_parse_mountinfo_and_find_mount() -> None:
    mounts = dc.parse_mountinfo(MOUNTINFO_SAMPLE)
    assert len(mounts) == 8
    assert dc.Mount("/mnt/micro share", "cifs", "//scope/share") in mounts  # \040 is a space
    assert dc.find_mount("/data/acq", mounts).fstype == "ext4"
    assert dc.find_mount("/mnt/micro share/run1", mounts).fstype == "cifs"
    assert dc.find_mount("/mnt/nfs/local/x", mounts).fstype == "xfs"  # the longest prefix wins
    assert dc.find_mount("/mnt/nfsother", mounts).fstype == "ext4"  # a prefix of the name is not a parent
    assert dc.find_mount("/mnt/nfs/x", mounts).fstype == "tmpfs"  # mounted over: the later entry wins
    assert dc.find_mount("/x", []) is None


@pytest.mark.parametrize("fstype,kind", [
    ("ext4", "local"), ("xfs", "local"), ("btrfs", "local"), ("tmpfs", "local"), ("nfs", "network"),
    ("nfs4", "network"), ("cifs", "network"), ("smb3", "network"), ("9p", "network"), ("lustre", "network"),
    ("beegfs", "network"), ("gpfs", "network"), ("fuse.sshfs", "network"), ("ceph", "network"),
    ("fuse.mystery", "fuse"), ("fuse", "fuse"),
])
def test_classify_fstype(fstype: str, kind: str) -> None:
    assert dc.classify_fstype(fstype) == kind


def test_filesystem_check_verdicts() -> None:
    mounts = dc.parse_mountinfo(MOUNTINFO_SAMPLE)
    key = "watch.roots[0].path"
    local = dc.filesystem_check("fs", key, Path("/data/acq"), False, mounts)
    assert local.status == "ok" and "local" in local.message
    cifs = dc.filesystem_check("fs", key, Path("/mnt/micro share/a"), False, mounts)
    assert cifs.status == "warn" and cifs.message.startswith(key) and "set watch.polling = true" in cifs.message
    assert cifs.details["source"] == "//scope/share"
    assert dc.filesystem_check("fs", key, Path("/mnt/micro share/a"), True, mounts).status == "ok"
    fuse = dc.filesystem_check("fs", key, Path("/media/thing/a"), False, mounts)
    assert fuse.status == "warn" and "FUSE" in fuse.message
    assert dc.filesystem_check("fs", key, Path("/home/u/remote/a"), False, mounts).status == "warn"
    assert dc.filesystem_check("fs", key, Path("/x"), False, []).status == "skip"


def test_inotify_verdicts() -> None:
    assert dc.inotify_check(100, True, 8192, False).status == "ok"
    assert dc.inotify_check(7000, True, 8192, False).status == "warn"  # above 80 %
    over = dc.inotify_check(8193, False, 8192, False)
    assert over.status == "fail" and "at least 8193" in over.message and "max_user_watches = 8192" in over.message
    assert dc.inotify_check(8193, False, 8192, True).status == "warn"  # polling: inotify unused
    assert dc.inotify_check(100, True, 8192, True).status == "ok"
    assert dc.inotify_check(100, False, 8192, False).status == "warn"  # ran out of time: cannot tell


def test_count_folders(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for sub in ("a/b/c", "a/d", "e"):
        (root / sub).mkdir(parents=True)
    (root / "file").write_text("x")
    (root / "link").symlink_to(root / "a")  # not followed
    assert dc.count_folders([root], stop_after=1000) == (6, True)
    count, complete = dc.count_folders([root], stop_after=3)
    assert not complete and count >= 3
    ticks = iter(range(100))
    count, complete = dc.count_folders([root], stop_after=1000, budget_s=0.5, clock=lambda: next(ticks))
    assert not complete and count < 6  # out of time: a lower bound
    assert dc.count_folders([tmp_path / "missing"], stop_after=10) == (0, True)
    # containers are watched only while written: their folders are not counted
    (root / "a" / "plate.zarr" / "A" / "1").mkdir(parents=True)
    assert dc.count_folders([root], stop_after=1000) == (9, True)
    assert dc.count_folders([root], stop_after=1000, suffixes=[".zarr"]) == (6, True)


def test_disk_space_thresholds() -> None:
    assert dc.disk_space_status(50 * 1024**2) == "fail"
    assert dc.disk_space_status(dc.DISK_FAIL_BYTES) == "warn"
    assert dc.disk_space_status(512 * 1024**2) == "warn"
    assert dc.disk_space_status(dc.DISK_WARN_BYTES) == "ok"
    assert dc.DISK_FAIL_BYTES == 100 * 1024**2 and dc.DISK_WARN_BYTES == 1024**3


def test_low_disk_space_fails(setup: Setup, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dc.host, "DISK_FAIL_BYTES", 1 << 62)  # every real disk is "too small" now
    rc, report, _ = doctor(capsys, "--config", str(setup.config_file))
    assert rc == 1
    assert failing(report)["disk space: state_dir"].startswith("state_dir: ")
    assert failing(report)["disk space: watch.roots[0]"].startswith("watch.roots[0].path: ")
