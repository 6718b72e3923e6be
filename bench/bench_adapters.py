"""Benchmark adapter switching on one loaded SAM (the daemon's hot path between experiments). Prints numbers.

Run::

    nice .venv/bin/python bench/bench_adapters.py [--model-type vit_b] [--adapters 4] [--switches 40]

What runs
---------
A SAM (``--model-type``, default vit_b) at input size 512 with random
(seeded) weights, and ``--adapters`` CellSeg1 LoRA adapters (rank 4, random
weights) saved as adapter folders and registered in a temporary catalog and
store, exactly as ``cellseg1d adapters add`` does. Switching goes through
the SAM plugin's :func:`cellseg1d.builtin.sam.activate` (registry check of
the store copy's metadata + :class:`~cellseg1d.model.adapters.AdapterCache`),
which is what every plane of a job pays:

* from disk: the first activation of adapters 2..N (read and hash the
  safetensors file, check keys and shapes, add the peft adapter);
* cached: switching among adapters already loaded (LRU hit);
* capacity 1: a cache that holds one adapter, so every switch reloads from
  disk and deletes the previous adapter;
* ``set_adapter`` alone: peft's own switch, without cellseg1d's checks.

Memory per cached adapter is the resident-set growth (``/proc/self/statm``)
while adapters 2..N are loaded, divided by their number (the first one also
pays one-time costs), beside the size of one adapter's tensors (float32). One torch thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellseg1d.builtin.sam import BaseSam, activate  # noqa: E402
from cellseg1d.catalog import Catalog  # noqa: E402
from cellseg1d.model.adapters import AdapterCache, AdapterMetadata, save_adapter  # noqa: E402
from cellseg1d.model.lora import apply_lora, lora_parameter_names  # noqa: E402
from cellseg1d.model.sam import build_sam  # noqa: E402
from cellseg1d.routing.registry import BaseModel, Registry, adapter_ref  # noqa: E402

BASE_SHA = "0" * 64


def rss_mb() -> float:
    """Current resident set size in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ms(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return f"median {statistics.median(values) * 1e3:7.2f} ms, p90 {p90 * 1e3:7.2f} ms, n={len(values)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--switches", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    sam = build_sam(args.model_type, args.image_size)
    state = {k: v.clone() for k, v in sam.state_dict().items()}
    model = apply_lora(sam)
    per_adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                            if n in set(lora_parameter_names(model)))
    catalog = Catalog(f"sqlite:///{work / 'catalog.sqlite'}")
    catalog.migrate()
    registry = Registry(catalog, work / "store", BaseModel(args.model_type, BASE_SHA))
    refs = []
    for index in range(args.adapters):
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        folder = save_adapter(model, work / f"made{index}", AdapterMetadata(f"exp{index}", args.model_type, BASE_SHA))
        refs.append(adapter_ref(registry.add(folder)))
    del model, sam
    file_kb = (refs[0].path / "adapter.safetensors").stat().st_size / 1024
    settings = SimpleNamespace(adapter=None)

    def fresh_base(capacity: int) -> BaseSam:
        base = build_sam(args.model_type, args.image_size)
        base.load_state_dict(state)
        return BaseSam(AdapterCache(base, capacity, expect_base_sha256=BASE_SHA), torch.device("cpu"),
                       args.model_type, BASE_SHA, ())

    def switch(base: BaseSam, ref) -> float:
        started = time.perf_counter()
        activate(base, ref, settings)
        return time.perf_counter() - started

    base = fresh_base(args.adapters)
    first = switch(base, refs[0])  # includes one-time costs (peft wrapping the model, q/k/v split)
    rss_before = rss_mb()
    from_disk = [switch(base, ref) for ref in refs[1:]]
    rss_after = rss_mb()
    cached = [switch(base, refs[i % len(refs)]) for i in range(args.switches)]
    peft_model = base.cache.model
    names = list(peft_model.peft_config)
    raw = []
    for i in range(args.switches):
        started = time.perf_counter()
        peft_model.set_adapter(names[i % len(names)], inference_mode=True)
        raw.append(time.perf_counter() - started)
    del base, peft_model

    small = fresh_base(1)
    switch(small, refs[0])
    reload = [switch(small, refs[(i + 1) % len(refs)]) for i in range(min(args.switches, 12))]

    print(f"{args.model_type} at input {args.image_size}, {args.adapters} adapters, torch threads "
          f"{torch.get_num_threads()}, rank-4 LoRA: {per_adapter_bytes / 2**20:.2f} MiB of float32 tensors, "
          f"adapter file {file_kb:.0f} KiB")
    print(f"first adapter on the bare model : {first * 1e3:7.2f} ms (wraps the model in peft once)")
    print(f"switch from disk (first use)    : {ms(from_disk)}")
    print(f"switch, cached (LRU hit)        : {ms(cached)}")
    print(f"switch, capacity 1 (reload)     : {ms(reload)}")
    print(f"peft set_adapter alone          : {ms(raw)}")
    print(f"memory per cached adapter       : {(rss_after - rss_before) / len(from_disk):.2f} MiB RSS "
          f"(tensors {per_adapter_bytes / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
