"""The SAM backbone is read from the checkpoint's shapes; a configured model type is only a check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cellseg1d.cli import main
from cellseg1d.config import SAM_MODEL_TYPES, build_config
from cellseg1d.errors import ConfigError
from cellseg1d.model import checkpoint as ckpt
from cellseg1d.model.checkpoint import (
    OFFICIAL,
    CheckpointError,
    OfficialCheckpoint,
    backbone_of,
    checkpoint_model_type,
    infer_model_type,
    load_sam,
    sha256_file,
)
from cellseg1d.model.sam import SPECS, build_sam

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def meta_state(model_type: str, image_size: int = 1024) -> dict[str, torch.Tensor]:
    """The state dict of a SAM of ``model_type``, shapes only (meta device: no memory)."""
    with torch.device("meta"):
        return build_sam(model_type, image_size).state_dict()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(build_sam("tiny", 1024).state_dict(), path)
    return path


# --- from the shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h", "tiny"])
@pytest.mark.parametrize("image_size", [1024, 512])
def test_every_spec_is_recognised_at_any_input_size(model_type: str, image_size: int) -> None:
    assert infer_model_type(meta_state(model_type, image_size)) == model_type


def test_vit_b_shapes_are_described() -> None:
    found = backbone_of(meta_state("vit_b"))
    assert (found.embed_dim, found.depth, found.num_heads, found.grid) == (768, 12, 12, 64)
    assert found.global_blocks == (2, 5, 8, 11)
    assert found.describe() == "width 768, 12 blocks, 12 heads, global attention in blocks 2, 5, 8, 11"


def test_tiny_from_real_tensors() -> None:
    torch.manual_seed(0)
    assert infer_model_type(build_sam("tiny", 256).state_dict()) == "tiny"


def test_unknown_shapes_are_refused() -> None:
    state = meta_state("vit_b")
    # vit_b's width and depth but global attention in other blocks
    for index in (2, 3):
        for axis in "hw":
            key = f"image_encoder.blocks.{index}.attn.rel_pos_{axis}"
            state[key] = torch.empty((127 if index == 3 else 27, 64), device="meta")
    with pytest.raises(CheckpointError) as caught:
        infer_model_type(state, "checkpoint odd.pth")
    message = str(caught.value)
    assert message.startswith("checkpoint odd.pth is a SAM-like checkpoint of an unknown backbone (width 768, "
                              "12 blocks, 12 heads, global attention in blocks 3, 5, 8, 11)")
    assert "vit_h: width 1280, 32 blocks, 16 heads" in message and "official SAM checkpoint" in message
    # another width
    state = meta_state("tiny")
    state["image_encoder.patch_embed.proj.weight"] = torch.empty((256, 3, 16, 16), device="meta")
    with pytest.raises(CheckpointError, match="unknown backbone \\(width 256, 4 blocks, heads unknown"):
        infer_model_type(state)
    # one block fewer
    state = {k: v for k, v in meta_state("tiny").items() if not k.startswith("image_encoder.blocks.3.")}
    with pytest.raises(CheckpointError, match="unknown backbone \\(width 192, 3 blocks"):
        infer_model_type(state)


def test_not_a_sam_state_dict_is_refused() -> None:
    with pytest.raises(CheckpointError, match="x.pth is not a SAM checkpoint: it has no image encoder"):
        infer_model_type({"x": torch.zeros(1)}, "x.pth")
    state = {k: v for k, v in meta_state("tiny").items() if k != "image_encoder.blocks.1.attn.rel_pos_h"}
    with pytest.raises(CheckpointError, match="block 1 has no relative-position table"):
        infer_model_type(state)


# --- loading ------------------------------------------------------------------------------------------------


def test_load_without_a_model_type_infers_it(tiny_file: Path) -> None:
    sam, info = load_sam(tiny_file, image_size=256, allow_custom=True)
    assert info.model_type == "tiny" and len(sam.image_encoder.blocks) == 4
    _, info = load_sam(tiny_file, "tiny", 256, allow_custom=True)  # the old positional form still works
    assert info.model_type == "tiny"


def test_a_configured_type_that_differs_is_refused(tiny_file: Path) -> None:
    with pytest.raises(CheckpointError) as caught:
        load_sam(tiny_file, "vit_b", allow_custom=True, setting="sam.model_type")
    message = str(caught.value)
    assert f"checkpoint {tiny_file} is a tiny SAM (width 192, 4 blocks" in message
    assert "but sam.model_type is 'vit_b'" in message and "Leave sam.model_type out" in message
    with pytest.raises(CheckpointError, match="--model-type: 'vit_x' is not a SAM model type"):
        load_sam(tiny_file, "vit_x", setting="--model-type")


def test_official_hash_is_looked_up_for_the_inferred_type(monkeypatch: pytest.MonkeyPatch, tiny_file: Path) -> None:
    monkeypatch.setitem(OFFICIAL, "tiny", OfficialCheckpoint("tiny.pth", "0" * 64, "http://127.0.0.1/x"))
    with pytest.raises(CheckpointError, match="is not the official tiny SAM checkpoint: sha256 expected 0000"):
        load_sam(tiny_file)
    monkeypatch.setitem(OFFICIAL, "tiny", OfficialCheckpoint("tiny.pth", sha256_file(tiny_file), "http://x"))
    _, info = load_sam(tiny_file, image_size=256)
    assert info.official and info.model_type == "tiny"


def test_checkpoint_model_type_is_cheap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_file: Path) -> None:
    assert checkpoint_model_type(tiny_file) == "tiny"  # memory-mapped shapes
    with pytest.raises(CheckpointError, match="is a tiny SAM .* but --model-type is 'vit_h'"):
        checkpoint_model_type(tiny_file, expected="vit_h", setting="--model-type")
    # an official file is known by its hash: not even opened
    junk = tmp_path / "sam_vit_h_4b8939.pth"
    junk.write_bytes(os.urandom(64))
    monkeypatch.setitem(OFFICIAL, "vit_h", OfficialCheckpoint(junk.name, sha256_file(junk), "http://x"))
    assert checkpoint_model_type(junk, sha256=sha256_file(junk)) == "vit_h"
    monkeypatch.setattr(ckpt, "_read_state_dict", lambda *a, **k: pytest.fail("read"))
    assert checkpoint_model_type(junk, sha256=sha256_file(junk)) == "vit_h"


def test_corrupt_official_download_says_to_fetch_again(tmp_path: Path) -> None:
    broken = tmp_path / "sam_vit_b_01ec64.pth"
    broken.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as caught:
        load_sam(broken)
    assert "cannot be read" in str(caught.value)
    assert "incomplete or corrupted: delete it and run 'cellseg1d models fetch vit_b'" in str(caught.value)


# --- configuration, registry, doctor, daemon ------------------------------------------------------------------


def test_config_without_model_type(tmp_path: Path, tiny_file: Path) -> None:
    config = build_config({"state_dir": str(tmp_path), "sam": {"checkpoint": str(tiny_file)}})
    assert config.sam.model_type is None
    assert build_config({"sam": {"model_type": "vit_h"}}).sam.model_type == "vit_h"
    with pytest.raises(ConfigError, match="setting sam.model_type: .*'vit_x' is not a SAM model type.*leave it out"):
        build_config({"sam": {"model_type": "vit_x"}})
    assert SAM_MODEL_TYPES == tuple(SPECS)


def test_registry_base_is_read_from_the_checkpoint(tmp_path: Path, tiny_file: Path) -> None:
    from cellseg1d.routing.registry import RegistryError, configured_base

    base = configured_base(build_config({"state_dir": str(tmp_path), "sam": {"checkpoint": str(tiny_file)}}))
    assert base is not None and (base.model_type, base.sha256) == ("tiny", sha256_file(tiny_file))
    mismatch = build_config({"state_dir": str(tmp_path), "sam": {"checkpoint": str(tiny_file), "model_type": "vit_b"}})
    with pytest.raises(RegistryError, match="setting sam.checkpoint: checkpoint .* is a tiny SAM .* sam.model_type"):
        configured_base(mismatch)


def _doctor_row(tmp_path: Path, capsys: pytest.CaptureFixture[str], sam_body: str) -> dict:
    (tmp_path / "acq").mkdir(exist_ok=True)
    config = tmp_path / "cellseg1d.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[[watch.roots]]\npath = "{tmp_path / "acq"}"\n'
                      f"[sam]\n{sam_body}\n")
    main(["doctor", "--config", str(config), "--json"])
    report = json.loads(capsys.readouterr().out)
    return next(r for r in report["checks"] if r["name"] == "sam.checkpoint")


def test_doctor_row_shows_the_inferred_type(tmp_path: Path, tiny_file: Path, capsys, monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("CELLSEG1D_"):
            monkeypatch.delenv(name)
    row = _doctor_row(tmp_path, capsys, f'checkpoint = "{tiny_file}"\nallow_custom_checkpoint = true')
    assert row["status"] == "ok" and "a custom tiny checkpoint (backbone read from its shapes" in row["message"]
    assert row["details"]["model_type"] == "tiny" and row["details"]["configured_model_type"] is None
    row = _doctor_row(tmp_path, capsys, f'checkpoint = "{tiny_file}"\nmodel_type = "vit_l"\n'
                                        "allow_custom_checkpoint = true")
    assert row["status"] == "fail"
    assert row["message"] == (f"sam.checkpoint: {tiny_file} is a tiny checkpoint (read from its shapes) but "
                              "sam.model_type is 'vit_l'")
    assert "leave sam.model_type out" in row["fix"]
    monkeypatch.setitem(OFFICIAL, "tiny", OfficialCheckpoint("tiny.pth", sha256_file(tiny_file), "http://x"))
    row = _doctor_row(tmp_path, capsys, f'checkpoint = "{tiny_file}"')
    assert row["status"] == "ok" and row["message"].startswith(f"{tiny_file}: the official tiny checkpoint")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    row = _doctor_row(tmp_path, capsys, f'checkpoint = "{junk}"\nallow_custom_checkpoint = true')
    assert row["status"] == "fail" and f"checkpoint {junk} cannot be read" in row["message"]


def test_daemon_plugin_uses_the_inferred_type(tmp_path: Path, tiny_file: Path) -> None:
    from cellseg1d.builtin import sam as sam_plugin
    from cellseg1d.config import SamSettings

    sam_plugin.HOLDER.reset()
    try:
        settings = SamSettings(checkpoint=tiny_file, allow_custom_checkpoint=True, image_size=256)
        assert sam_plugin.HOLDER.base(settings).model_type == "tiny"
        with pytest.raises(CheckpointError, match="is a tiny SAM .* but sam.model_type is 'vit_b'"):
            sam_plugin.HOLDER.base(settings.model_copy(update={"model_type": "vit_b"}))
    finally:
        sam_plugin.HOLDER.reset()
