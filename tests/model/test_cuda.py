"""The SAM path on a CUDA device: engine, precisions, adapters and the daemon's segmenter plugin.

Every test here is marked ``cuda`` and skipped ("no CUDA device") on a machine
without one; ``bench/gpu_check.sh`` runs them with ``-m cuda`` together with
the CUDA variants of the engine and training tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg1d.model.inference import InferenceReport, InferenceSettings, segment_image
from cellseg1d.model.metrics import average_precision
from cellseg1d.model.sam import build_sam
from tests.model.devices import CUDA_MARKS
from tests.model.test_speed_rewrites import _cells, _tiny_base

pytestmark = CUDA_MARKS


@pytest.fixture(scope="module")
def base_pair():
    """The pretrained tiny base on the CPU and a copy on CUDA."""
    cpu = _tiny_base(256)
    gpu = _tiny_base(256).to("cuda")
    return cpu, gpu


def test_cuda_labels_agree_with_the_cpus_at_the_paper_profile(base_pair):
    cpu, gpu = base_pair
    rgb, truth = _cells(256, 80, seed=6100)
    settings = InferenceSettings(image_size=256)
    report = InferenceReport()
    on_gpu = segment_image(gpu, rgb, settings, report=report)
    on_cpu = segment_image(cpu, rgb, settings)
    assert report.counts["prompts"] == 5 * 32 * 32 and report.seconds["embed"] > 0
    assert on_gpu.max() >= 10
    assert average_precision(on_gpu, on_cpu, 0.9)[0].ap >= 0.95  # different kernels: equal up to rounding
    assert average_precision(on_gpu, truth, 0.5)[0].ap >= 0.6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precisions_run_and_find_the_cells(base_pair, precision):
    _, gpu = base_pair
    rgb, truth = _cells(256, 80, seed=6200)
    full = segment_image(gpu, rgb, InferenceSettings(image_size=256))
    low = segment_image(gpu, rgb, InferenceSettings(image_size=256, encoder_precision=precision,
                                                    decoder_precision=precision))
    assert low.dtype == np.uint32 and low.max() >= 0.7 * full.max()
    assert average_precision(low, truth, 0.5)[0].ap >= 0.5


def test_adapters_switch_on_a_cuda_model(tmp_path: Path):
    from cellseg1d.model.adapters import AdapterCache, AdapterMetadata, save_adapter
    from cellseg1d.model.lora import apply_lora, unwrap
    from tests.model.test_lora import randomize_lora

    torch.manual_seed(0)
    state = build_sam("tiny", 128).state_dict()
    dirs = []
    for seed in (1, 2):
        model = build_sam("tiny", 128)
        model.load_state_dict(state)
        model = apply_lora(model)
        randomize_lora(model, seed=seed)
        dirs.append(save_adapter(model, tmp_path / f"a{seed}", AdapterMetadata(f"a{seed}", "tiny", "b" * 64)))
    base = build_sam("tiny", 128)
    base.load_state_dict(state)
    cache = AdapterCache(base.to("cuda"), capacity=2)
    x = torch.rand(1, 3, 128, 128, device="cuda") * 255

    def embed() -> torch.Tensor:
        cache.model.to("cuda")  # new LoRA weights are read to the CPU (as the plugin does after a load)
        with torch.inference_mode():
            sam = unwrap(cache.model)
            return sam.image_encoder(sam.preprocess(x))

    cache.activate(dirs[0])
    first = embed()
    cache.activate(dirs[1])
    second = embed()
    cache.activate(dirs[0])
    again = embed()
    assert first.is_cuda and not torch.allclose(first, second) and torch.allclose(first, again)


def test_daemon_segmenter_plugin_runs_sam_on_cuda(tmp_path: Path, acquisition, make_image):
    from cellseg1d.builtin import sam as sam_plugin
    from cellseg1d.config import build_config
    from cellseg1d.pipeline import Pipeline
    from cellseg1d.plugins import build_plugin_manager

    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny_sam.pth"
    torch.save(build_sam("tiny", 1024).state_dict(), checkpoint)
    config = build_config({
        "state_dir": str(tmp_path / "state"),
        "watch": {"roots": [{"path": str(acquisition)}]},
        "sam": {"checkpoint": str(checkpoint), "model_type": "tiny", "allow_custom_checkpoint": True,
                "image_size": 256, "points_per_side": 8, "crop_n_layers": 0, "device": "cuda", "profile": "fast"},
    })
    sam_plugin.HOLDER.reset()
    try:
        pm = build_plugin_manager()
        pm.hook.configure(config=config)
        image, _ = make_image(acquisition / "a.zarr", size=96)
        result = Pipeline(config, pm).run(image, config.watch.roots[0], image)
        assert result.segmenter == "sam:tiny"
        base = next(iter(sam_plugin.HOLDER.bases.values()))
        assert base.device.type == "cuda" and next(base.sam.parameters()).is_cuda
        assert result.segmentation["settings"]["profile"] == "fast"
    finally:
        sam_plugin.HOLDER.reset()
