#!/usr/bin/env bash
# The GPU path of cellseg1d, run and measured in one command (about 6-8 minutes on an H100/H200).
#
#   bench/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check_out
#
# Writes into OUT_DIR:
#   env.txt               nvidia-smi, torch/CUDA versions, the device's name and bf16 support
#   pytest_cuda.txt/.xml  the tests marked `cuda` (engine, precisions, adapters, training, daemon plugin)
#   bench_gpu.txt/.json   ms per 512 x 512 image for vit_b/vit_l/vit_h (random weights, paper profile) in
#                         fp32/bf16/fp16, split into encoder/decoder/masks/NMS; AP@0.9 of bf16/fp16 labels
#                         against fp32's; training steps/s and peak memory; pipeline images/s; adapter switch
#   summary.txt           exit codes and where each figure is
# Needs the project's Python environment (PYTHON=..., default .venv/bin/python, else python3) with a CUDA torch;
# nothing is downloaded. Each step has its own time limit, and a failing step does not stop the others.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONUNBUFFERED=1
summary="$OUT_DIR/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to OUT_DIR/NAME.txt, record the exit code
    local name="$1" limit="$2"
    shift 2
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - started)) s ($OUT_DIR/$name.txt)" | tee -a "$summary"
}

{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi not found"
    "$PY" - <<'EOF'
import torch
print("python torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported(),
          "memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for name in ("segment_anything", "peft", "safetensors", "zarr", "pydantic", "pytest"):
    try:
        __import__(name)
        print(name, "ok")
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", exc)
EOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# 1. Tests that run on CUDA (about 1 minute).
step pytest_cuda 240 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/model \
    --junitxml="$OUT_DIR/pytest_cuda.xml"

# 2. Benchmarks (about 5 minutes): speed, agreement, training, daemon.
step bench_gpu 420 "$PY" bench/bench_gpu.py --out "$OUT_DIR"

echo "figures: $OUT_DIR/bench_gpu.json; tests: $OUT_DIR/pytest_cuda.txt" | tee -a "$summary"
