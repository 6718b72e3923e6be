"""Out of memory during segmentation: retried with smaller prompt batches, same result.

The allocation failures are real: a subprocess caps its own address space
(RLIMIT_AS) just above what the model needs, so the first, huge prompt batch
cannot be allocated by torch's CPU allocator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from cellseg1d.model.inference import InferenceReport, InferenceSettings, OutOfMemory, segment_image, \\
        segment_image_once
    from cellseg1d.model.sam import build_sam
    from cellseg1d.testing.synthetic import make_cells

    torch.manual_seed(0)
    sam = build_sam("tiny", 256).eval()
    image, _ = make_cells((128, 128), 12, seed=1)
    rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    # decode_batch: the whole batch in one transformer pass (the CPU default, 8, would never run out)
    settings = InferenceSettings(image_size=256, points_per_side=32, crop_n_layers=0, points_per_batch=1024,
                                 decode_batch=1024, pred_iou_thresh=-0.12, stability_score_thresh=0.0,
                                 stability_score_offset=0.02, max_area_fraction=0.3)
    expected = segment_image_once(sam, rgb, InferenceSettings(**{**settings.__dict__, "points_per_batch": 32,
                                                                 "decode_batch": None}))

    huge = np.zeros((6000, 6000, 3), np.uint8)  # allocated before the limit: only its copies must fail

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # room for batches of about 64 prompts (each prompt: a few 256 x 256 float32 image-token tensors)
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 160 * 2**20, hard))
    report = InferenceReport()
    labels = segment_image(sam, rgb, settings, report=report)
    try:
        tiny = segment_image(sam, huge, InferenceSettings(image_size=256, points_per_batch=2, crop_n_layers=0))
        tiny_error = None
    except OutOfMemory as exc:
        tiny_error = str(exc)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    print(json.dumps({"retries": report.counts.get("oom_retries", 0), "same": bool(np.array_equal(labels, expected)),
                      "objects": int(labels.max()), "hopeless": tiny_error}))
""")


def run_script() -> subprocess.CompletedProcess[str]:
    # One malloc arena: fewer address-space reservations by threads, so the limit set in the script
    # is met by torch's allocator (which raises) rather than by a thread's arena.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env)


@pytest.mark.slow
def test_out_of_memory_retries_with_smaller_batches() -> None:
    out = run_script()
    if out.returncode < 0:
        # Killed by a signal: native code outside torch (seen once in about ten runs: SIGSEGV) met the
        # address-space limit with an unchecked allocation. That is the artificial limit, not the retry
        # logic under test: run it once more, with the same strict checks below.
        out = run_script()
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["retries"] >= 2, result
    assert result["same"] and result["objects"] > 0, result
    # a 6000 x 6000 image whose working copies do not fit: a clear error, not a crash
    assert result["hopeless"] and "sam.tile" in result["hopeless"], result
    assert "retrying with" in out.stderr
