"""What each CPU speed step of the SAM path gains, measured side by side in one process. Prints numbers only.

Run (threads: torch's default, i.e. the cores; ``--threads 1`` on a shared machine)::

    .venv/bin/python bench/bench_cpu_steps.py [--model-type vit_b] [--rounds 3] [--prompts 256] [--end-to-end]

vit_b (or ``--model-type``) at input 512 with random weights (seeded). Each
variant is timed in turn, ``--rounds`` times interleaved, and the best time
is kept, so load from other programs affects all variants alike.

* image encoder, seconds per crop (one 512 x 512 input): segment-anything's
  blocks; + fused attention (SDPA with the relative-position bias as mask);
  + projections of real tokens only in windowed blocks (the default now);
  then the approximate options: bf16 autocast, int8 dynamic quantization of
  every Linear (``torch.ao.quantization.quantize_dynamic``);
* mask decoder, ms per prompt (transformer + IoU head, ``--prompts`` random
  points): 64 prompts per pass with the first layer's image side recomputed
  per pass (before); 8 per pass; + the image side shared per crop (the
  default now); then bf16 autocast and int8 dynamic quantization;
* the paper profile's projection: 5 crops x encoder + 5 x 1024 prompts x
  decoder (a random model passes no mask, so this is the whole per-image
  cost but for a few ms of NMS and painting);
* ``--end-to-end``: ``segment_image`` once at the paper profile (32 x 32
  points, crop layer 1) on a synthetic 512 x 512 image, with its stage times,
  and once with every exact rewrite off (``--end-to-end-before``).

The in-place softmax of the image-to-token attention (same arithmetic, half
the memory traffic) is part of every decoder variant here; it was measured
on its own at 2.9 -> 1.3 ms per (8, 1024, 8, 7) softmax (1 thread).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cellseg1d.model import inference  # noqa: E402
from cellseg1d.model.inference import (  # noqa: E402
    InferenceReport,
    InferenceSettings,
    decode_scores,
    decoder_image,
    segment_image,
)
from cellseg1d.model.sam import (  # noqa: E402
    Attention,
    Block,
    FusedAttention,
    FusedBlock,
    build_sam,
    set_fused_attention,
)


def _encoder_mode(sam, mode: str) -> None:
    for block in sam.image_encoder.blocks:
        block.attn.__class__ = Attention if mode == "plain" else FusedAttention
        block.__class__ = FusedBlock if mode == "fused" else Block


def _int8(sam):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(sam), {torch.nn.Linear}, dtype=torch.qint8)


def _best(fn, rounds: int) -> float:
    return min(fn() for _ in range(rounds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-approximate", action="store_true", help="skip bf16 and int8")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--end-to-end-before", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sam = build_sam(args.model_type, 512).eval()
    q8 = None if args.skip_approximate else _int8(sam)
    x = torch.rand(1, 3, 512, 512) * 255
    x = sam.preprocess(x)
    print(f"CPU speed steps: {args.model_type} at input 512, random weights, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {inference.native_bf16(torch.device('cpu'))}; "
          f"best of {args.rounds} interleaved rounds")

    encoders = {"segment-anything blocks (before)": (sam, "plain", None),
                "+ fused attention (SDPA, bias as mask)": (sam, "attention", None),
                "+ real-token projections in windowed blocks (now)": (sam, "fused", None)}
    if not args.skip_approximate:
        encoders["bf16 autocast (approximate)"] = (sam, "fused", torch.bfloat16)
        encoders["int8 dynamic Linear (approximate)"] = (q8, "fused", None)
    enc_times: dict[str, list[float]] = {k: [] for k in encoders}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (model, mode, dtype) in encoders.items():
                _encoder_mode(model, mode)
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    start = time.perf_counter()
                    model.image_encoder(x)
                    enc_times[name].append(time.perf_counter() - start)
        _encoder_mode(sam, "fused")
        print("\nimage encoder, s per crop")
        base = min(enc_times["segment-anything blocks (before)"])
        for name, times in enc_times.items():
            print(f"  {name:<52} {min(times):6.2f} s   ({base / min(times):.2f}x)")

        embedding = sam.image_encoder(x)
        pe = sam.prompt_encoder.get_dense_pe()
        coords = torch.rand(args.prompts, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 512

        def decoder(model, batch: int, shared: bool, dtype=None):
            def run() -> float:
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    start = time.perf_counter()
                    image = decoder_image(model, embedding, pe) if shared else None
                    for index in inference.sub_batches(args.prompts, batch):
                        decode_scores(model, embedding, pe, coords[index], shared=image)
                    return (time.perf_counter() - start) / args.prompts * 1e3
            return run

        decoders = {"64 prompts per pass, image side per pass (before)": decoder(sam, 64, False),
                    "8 prompts per pass": decoder(sam, 8, False),
                    "+ first layer's image side once per crop (now)": decoder(sam, 8, True)}
        if not args.skip_approximate:
            decoders["bf16 autocast (approximate)"] = decoder(sam, 8, True, torch.bfloat16)
            decoders["int8 dynamic Linear (approximate)"] = decoder(q8, 8, True)
        dec_times: dict[str, list[float]] = {k: [] for k in decoders}
        for _ in range(args.rounds):
            for name, fn in decoders.items():
                dec_times[name].append(fn())
        print(f"\nmask decoder (transformer + IoU head), ms per prompt over {args.prompts} prompts")
        base_d = min(dec_times["64 prompts per pass, image side per pass (before)"])
        for name, times in dec_times.items():
            print(f"  {name:<52} {min(times):6.2f} ms  ({base_d / min(times):.2f}x)")

    before = 5 * base + 5120 * base_d / 1e3
    now = 5 * min(enc_times["+ real-token projections in windowed blocks (now)"]) + \
        5120 * min(dec_times["+ first layer's image side once per crop (now)"]) / 1e3
    print(f"\npaper profile (5 crops, 5120 prompts), projected: before {before:.1f} s, now {now:.1f} s "
          f"({before / now:.2f}x)")
    if not args.skip_approximate:
        fast = 5 * min(enc_times["bf16 autocast (approximate)"]) + \
            5120 * min(dec_times["+ first layer's image side once per crop (now)"]) / 1e3
        print(f"  'fast' profile on this CPU (bf16 encoder where native, float32 decoder): {fast:.1f} s")

    if args.end_to_end or args.end_to_end_before:
        from cellseg1d.testing.synthetic import make_cells

        image, _ = make_cells((512, 512), 80, radius=(8, 16), seed=0)
        gray = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        runs = ([("now", True)] if args.end_to_end else []) + ([("before", False)] if args.end_to_end_before else [])
        for name, on in runs:
            set_fused_attention(sam, on)
            settings = InferenceSettings(decode_batch=None if on else 64)
            original = inference.shared_image
            if not on:
                inference.shared_image = lambda *a, **k: None
            report = InferenceReport()
            start = time.perf_counter()
            try:
                segment_image(sam, rgb, settings, report=report)
            finally:
                inference.shared_image = original
            stages = "  ".join(f"{k} {v:.1f}" for k, v in report.seconds.items())
            print(f"\nend to end, paper profile ({name}): {time.perf_counter() - start:.1f} s   stages (s): {stages}")


if __name__ == "__main__":
    main()
