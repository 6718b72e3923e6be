"""The built-in SAM segmenter plugin inside the real pipeline and daemon start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellseg1d.builtin import sam as sam_plugin
from cellseg1d.config import build_config
from cellseg1d.service.daemon import Daemon
from cellseg1d.errors import ConfigError
from cellseg1d.model.sam import build_sam
from cellseg1d.pipeline import Pipeline
from cellseg1d.plugins import build_plugin_manager


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny_sam.pth"
    torch.save(build_sam("tiny", 1024).state_dict(), path)  # as official checkpoints: 1024 input
    return path


@pytest.fixture(autouse=True)
def fresh_holder():
    sam_plugin.HOLDER.reset()
    yield
    sam_plugin.HOLDER.reset()


def sam_config(tmp_path: Path, root: Path, checkpoint: Path, **sam):
    return build_config({
        "state_dir": str(tmp_path / "state"),
        "watch": {"roots": [{"path": str(root)}]},
        "sam": {"checkpoint": str(checkpoint), "model_type": "tiny", "allow_custom_checkpoint": True,
                "image_size": 256, "points_per_side": 6, "crop_n_layers": 0, **sam},
    })


def test_sam_answers_segment_and_loads_once(tmp_path, acquisition, make_image, tiny_checkpoint) -> None:
    config = sam_config(tmp_path, acquisition, tiny_checkpoint)
    pm = build_plugin_manager()
    pm.hook.configure(config=config)
    assert sam_plugin.HOLDER.loads == 1
    pipeline = Pipeline(config, pm)
    for name in ("a.zarr", "b.zarr"):
        image, _ = make_image(acquisition / name, size=96)
        result = pipeline.run(image, config.watch.roots[0], image)
        assert result.segmenter == "sam:tiny"  # SAM answered, not the classical fallback
        assert result.segmentation["model_type"] == "tiny"
        assert Path(result.labels_path).is_dir()
    assert sam_plugin.HOLDER.loads == 1  # the base model is loaded once, not per image


def test_without_checkpoint_classical_answers(tmp_path, acquisition, make_image) -> None:
    config = build_config({"watch": {"roots": [{"path": str(acquisition)}]}})
    image, _ = make_image(acquisition / "a.zarr", size=96)
    result = Pipeline(config, build_plugin_manager()).run(image, config.watch.roots[0], image)
    assert result.segmenter == "classical" and sam_plugin.HOLDER.loads == 0


def test_daemon_refuses_to_start_with_bad_checkpoint(tmp_path, acquisition, tiny_checkpoint) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth"):
        Daemon(sam_config(tmp_path, acquisition, junk))
    # the backbone is read from the file: a sam.model_type that differs is refused
    with pytest.raises(ConfigError, match="is a tiny SAM .* but sam.model_type is 'vit_b'"):
        Daemon(sam_config(tmp_path, acquisition, tiny_checkpoint, model_type="vit_b"))
    # a file that is not the official one of its type is refused unless custom checkpoints are allowed
    with pytest.raises(ConfigError, match="sha256"):
        Daemon(sam_config(tmp_path, acquisition, tiny_checkpoint, model_type=None, allow_custom_checkpoint=False))
    with pytest.raises(ConfigError, match="does not exist|not found|no such"):
        Daemon(sam_config(tmp_path, acquisition, tmp_path / "missing.pth"))
