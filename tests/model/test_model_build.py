"""SAM architectures at input size 512, checkpoint resizing and safe checkpoint loading."""

from __future__ import annotations

import hashlib
import pathlib
from pathlib import Path

import pytest
import torch

from cellseg1d.errors import ConfigError
from cellseg1d.model.checkpoint import (
    OFFICIAL,
    CheckpointError,
    OfficialCheckpoint,
    load_sam,
    sha256_file,
)
from cellseg1d.model.device import autocast, autocast_dtype, pick_device
from cellseg1d.model.sam import SPECS, build_sam, resize_state_dict

#: Parameter counts of the official models at input size 1024 (CellSeg1 paper / SAM).
PARAMS_1024 = {"vit_b": 93.7e6, "vit_l": 312.3e6, "vit_h": 641.1e6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _meta_sam(model_type: str, image_size: int):
    with torch.device("meta"):
        return build_sam(model_type, image_size)


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_official_architectures_at_512(model_type: str) -> None:
    spec = SPECS[model_type]
    sam = _meta_sam(model_type, 512)
    head_dim = spec.embed_dim // spec.num_heads
    assert sam.image_encoder.pos_embed.shape == (1, 32, 32, spec.embed_dim)
    assert len(sam.image_encoder.blocks) == spec.depth
    for index, block in enumerate(sam.image_encoder.blocks):
        length = 63 if index in spec.global_attn_indexes else 2 * spec.window_size - 1  # 27
        assert block.attn.rel_pos_h.shape == (length, head_dim), index
        assert block.attn.rel_pos_w.shape == (length, head_dim), index
    assert sam.prompt_encoder.image_embedding_size == (32, 32)


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_parameter_counts_at_1024_match_official(model_type: str) -> None:
    count = sum(p.numel() for p in _meta_sam(model_type, 1024).parameters())
    assert abs(count - PARAMS_1024[model_type]) < 0.05e6


def test_resize_state_dict_1024_to_512_loads_strictly() -> None:
    source = build_sam("tiny", 1024).state_dict()
    # a smooth position embedding (a fresh model's is zero): f(row, col, channel), 64 x 64 grid
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    channels = torch.arange(192.0) / 192

    def smooth(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (H, W) -> (1, H, W, 192)
        return (torch.sin(r[..., None] / 10 + channels) * torch.cos(c[..., None] / 13)).unsqueeze(0)

    source["image_encoder.pos_embed"] = smooth(rows, cols)
    resized = resize_state_dict(source, SPECS["tiny"], 512)
    target = build_sam("tiny", 512)
    target.load_state_dict(resized, strict=True)
    assert target.image_encoder.pos_embed.shape == (1, 32, 32, 192)
    # bilinear with align_corners=True (the reference's rule): grid cell k samples source coordinate k * 63 / 31
    where = torch.arange(32.0) * 63 / 31
    expected = smooth(*torch.meshgrid(where, where, indexing="ij"))
    torch.testing.assert_close(target.image_encoder.pos_embed, expected, atol=5e-3, rtol=0)
    corners = (slice(None), [0, 0, -1, -1], [0, -1, 0, -1])
    assert torch.equal(target.image_encoder.pos_embed[corners], source["image_encoder.pos_embed"][corners])
    # windowed blocks keep their tables; global ones are resized
    assert torch.equal(target.image_encoder.blocks[0].attn.rel_pos_h, source["image_encoder.blocks.0.attn.rel_pos_h"])
    assert target.image_encoder.blocks[1].attn.rel_pos_h.shape == (63, 48)


def test_resize_state_dict_same_size_is_identity() -> None:
    source = build_sam("tiny", 1024).state_dict()
    resized = resize_state_dict(source, SPECS["tiny"], 1024)
    assert resized.keys() == source.keys()
    assert all(torch.equal(resized[key], source[key]) for key in source)


# --- load_sam -------------------------------------------------------------------------------------------------


def test_load_custom_tiny_checkpoint(tiny_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = tiny_checkpoint
    sam, info = load_sam(path, "tiny", 512, allow_custom=True)
    assert info.path == path and info.model_type == "tiny" and info.image_size == 512
    assert info.official is False and info.sha256 == sha256_file(path)
    assert not sam.training
    loaded = sam.state_dict()
    assert torch.equal(loaded["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"])
    qkv = "image_encoder.blocks.2.attn.qkv.weight"
    assert torch.equal(loaded[qkv], state[qkv])
    assert loaded["image_encoder.pos_embed"].shape == (1, 32, 32, 192)
    assert not any(t.is_meta for t in [*sam.parameters(), *sam.buffers()])
    with torch.no_grad():
        embedding = sam.image_encoder(torch.zeros(1, 3, 512, 512))
    assert embedding.shape == (1, 256, 32, 32) and torch.isfinite(embedding).all()


def test_load_accepts_model_key(tmp_path: Path, tiny_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    _, state = tiny_checkpoint
    path = tmp_path / "wrapped.pth"
    torch.save({"model": state, "epoch": torch.tensor(3)}, path)
    sam, _ = load_sam(path, "tiny", 1024, allow_custom=True)
    assert torch.equal(sam.image_encoder.pos_embed, state["image_encoder.pos_embed"])


def test_custom_type_without_official_hash_needs_allow_custom(
        tiny_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = tiny_checkpoint
    with pytest.raises(CheckpointError, match="allow_custom=True"):
        load_sam(path, "tiny")


def test_official_hash_mismatch_refused(monkeypatch: pytest.MonkeyPatch,
                                       tiny_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = tiny_checkpoint
    # the hash is checked against the official one of the type read from the file
    monkeypatch.setitem(OFFICIAL, "tiny", OfficialCheckpoint("tiny.pth", "e" * 64, "http://127.0.0.1/x"))
    with pytest.raises(CheckpointError) as caught:
        load_sam(path)
    message = str(caught.value)
    assert "sha256" in message and str(path) in message
    assert OFFICIAL["tiny"].sha256 in message and sha256_file(path) in message
    assert "allow_custom=True" in message and "cellseg1d models fetch tiny" in message


def test_official_hash_accepted(monkeypatch: pytest.MonkeyPatch,
                                tiny_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = tiny_checkpoint
    monkeypatch.setitem(OFFICIAL, "tiny", OfficialCheckpoint("tiny.pth", sha256_file(path), "http://127.0.0.1/x"))
    _, info = load_sam(path, "tiny")
    assert info.official is True


def test_checkpoint_of_another_type_is_refused(tiny_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = tiny_checkpoint
    with pytest.raises(CheckpointError, match="is a tiny SAM .* but model_type is 'vit_b'"):
        load_sam(path, "vit_b", allow_custom=True)


def test_missing_checkpoint_message(tmp_path: Path) -> None:
    path = tmp_path / "models" / "sam_vit_h_4b8939.pth"
    with pytest.raises(CheckpointError) as caught:
        load_sam(path, "vit_h")
    assert str(path) in str(caught.value) and "cellseg1d models fetch vit_h" in str(caught.value)


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="not a plain weights file"):
        load_sam(path, "tiny", allow_custom=True)
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(tmp_path: Path,
                                         tiny_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path = tmp_path / "truncated.pth"
    path.write_bytes(tiny_checkpoint[0].read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_sam(path, "tiny", allow_custom=True)


def test_non_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="does not hold a SAM state dict"):
        load_sam(path, "tiny", allow_custom=True)


def test_sha256_file_progress(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"cellseg1d" * 1000)
    calls: list[tuple[int, int]] = []
    digest = sha256_file(path, progress=lambda done, total: calls.append((done, total)))
    assert digest == hashlib.sha256(b"cellseg1d" * 1000).hexdigest()
    assert calls[-1] == (9000, 9000)


# --- device -----------------------------------------------------------------------------------------------------


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert pick_device("auto").type != "cuda"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        pick_device("tpu")


def test_autocast_is_noop_without_dtype() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None
    assert autocast_dtype(cpu, cpu_bf16=True) is torch.bfloat16
    a = torch.randn(4, 4)
    with autocast(cpu, None):
        assert (a @ a).dtype == torch.float32
    with autocast(cpu, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
