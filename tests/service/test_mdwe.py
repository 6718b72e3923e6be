"""Does cellseg1d work with W^X memory, as systemd's ``MemoryDenyWriteExecute=yes`` enforces?

systemd implements MemoryDenyWriteExecute with a seccomp filter: no mapping
both writable and executable, no mapping made executable afterwards (the
way JIT compilers work). Linux >= 6.3 enforces the same rule for one process
with ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)``, inherited and
irreversible, so a subprocess sets it first and then imports torch, numpy,
zarr and cellseg1d and segments an OME-Zarr image through the plugins and
the pipeline, as the daemon does.

Finding (torch 2.14.1, x86-64): the classical segmenter works under W^X;
SAM on the CPU does not: oneDNN generates its convolution (the patch
embedding) and bfloat16 kernels at run time, and fails with "could not
create a primitive". With ``torch.backends.mkldnn.enabled = False`` it works.
So the shipped unit keeps ``MemoryDenyWriteExecute=no``, and a test here
fails if someone turns it on while torch still needs it.

CPU only: CUDA (its PTX JIT, kernels cuBLAS/cuDNN load at run time) is not
covered; see deploy/INSTALL.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "cellseg1d.service"
SKIP = 77  # the child's exit status when the kernel has no PR_SET_MDWE

CHILD = textwrap.dedent(r"""
    import ctypes, errno, mmap, sys
    from pathlib import Path

    mode, tmp = sys.argv[1], Path(sys.argv[2])
    PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"prctl(PR_SET_MDWE) failed: {errno.errorcode.get(err, err)}", flush=True)
        sys.exit(77 if err == errno.EINVAL else 1)
    assert libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) & PR_MDWE_REFUSE_EXEC_GAIN

    # The rule is in force: a writable and executable mapping is refused.
    try:
        mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError as err:
        print(f"W+X mapping refused ({errno.errorcode.get(err.errno, err.errno)})", flush=True)
    else:
        print("W+X mapping was allowed: MDWE is not in force", flush=True)
        sys.exit(1)

    # Everything below is loaded and run under W^X.
    import numpy as np
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    if mode == "sam-without-onednn":
        torch.backends.mkldnn.enabled = False

    from cellseg1d.builtin import sam as sam_plugin
    from cellseg1d.config import build_config
    from cellseg1d.model.sam import build_sam
    from cellseg1d.pipeline import Pipeline
    from cellseg1d.plugins import build_plugin_manager
    from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr

    root = tmp / "acquisition"
    root.mkdir()
    data, _ = make_czyx((96, 96), 8, seed=0)
    write_ome_zarr(root / "a.zarr", data[0], axes="czyx", ngff_version="0.5", channel_names=["nuclei", "membrane"])
    config = {"state_dir": str(tmp / "state"), "watch": {"roots": [{"path": str(root)}]}}
    if mode.startswith("sam"):
        checkpoint = tmp / "tiny_sam.pth"
        torch.save(build_sam("tiny", 1024).state_dict(), checkpoint)
        config["sam"] = {"checkpoint": str(checkpoint), "model_type": "tiny", "allow_custom_checkpoint": True,
                         "image_size": 256, "points_per_side": 6, "crop_n_layers": 0}
    config = build_config(config)
    pm = build_plugin_manager()
    pm.hook.configure(config=config)
    result = Pipeline(config, pm).run(root / "a.zarr", config.watch.roots[0], root / "a.zarr")
    assert Path(result.labels_path).is_dir(), result
    expected = "sam:tiny" if mode.startswith("sam") else "classical"
    assert result.segmenter.startswith(expected), result.segmenter
    print(f"MDWE-OK: {result.segmenter}, {result.object_count} objects", flush=True)
""")


def run_under_mdwe(mode: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the pipeline in a child process with W^X memory (skips where the kernel lacks PR_SET_MDWE)."""
    if sys.platform != "linux":
        pytest.skip("PR_SET_MDWE is Linux-only")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD, mode, str(tmp_path)], capture_output=True,
                           text=True, env=env, timeout=280)
    if child.returncode == SKIP:
        pytest.skip(f"this kernel ({os.uname().release}) has no PR_SET_MDWE (Linux >= 6.3): "
                    f"{child.stdout.strip()}")
    return child


def unit_denies_write_execute() -> bool:
    settings = re.findall(r"^\s*MemoryDenyWriteExecute\s*=\s*(\S*)\s*$", UNIT.read_text(), re.MULTILINE)
    return bool(settings) and settings[-1].lower() in ("yes", "true", "on", "1")


def test_classical_pipeline_runs_with_write_xor_execute_memory(tmp_path: Path) -> None:
    """numpy, scipy, scikit-image, zarr and the classical segmenter need no writable code."""
    child = run_under_mdwe("classical", tmp_path)
    assert child.returncode == 0 and "MDWE-OK" in child.stdout, child.stdout + child.stderr


def test_sam_without_onednn_runs_with_write_xor_execute_memory(tmp_path: Path) -> None:
    """torch's own CPU kernels (not oneDNN's generated ones) run the whole SAM pipeline under W^X."""
    child = run_under_mdwe("sam-without-onednn", tmp_path)
    assert child.returncode == 0 and "MDWE-OK" in child.stdout, child.stdout + child.stderr


def test_unit_allows_what_sam_on_the_cpu_needs(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes in the unit only if SAM (with oneDNN, torch's default) runs under W^X."""
    child = run_under_mdwe("sam", tmp_path)
    output = child.stdout + child.stderr
    if child.returncode == 0 and "MDWE-OK" in child.stdout:
        return  # torch no longer needs writable code: the unit may deny it (either setting is fine)
    assert "could not create a primitive" in output, f"SAM failed under W^X, not in oneDNN:\n{output}"
    assert not unit_denies_write_execute(), (
        "deploy/cellseg1d.service sets MemoryDenyWriteExecute=yes, but SAM on the CPU fails under W^X "
        f"(oneDNN JIT):\n{output}")
