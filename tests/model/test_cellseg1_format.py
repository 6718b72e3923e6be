"""Adapters in the CellSeg1 reference implementation's ``.pth`` format: import, export, refusals, CLI.

Reference files are built here by hand from the documented key layout of the
reference's ``save_lora_parameters`` (not with cellseg1d's converter), and
the imported model is compared with a forward pass computed by hand from the
file: ``proj(x) + B(A(x))`` per decoder projection, and the fused encoder qkv
output with ``B(A(x))`` added to its q and v thirds. So every key's module
(q vs v, block order, decoder layer and attention order) is pinned.
"""

from __future__ import annotations

import copy
import json
import pathlib
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import Sam
from torch import nn

from cellseg1d.cli import main
from cellseg1d.model.adapters import AdapterCache, AdapterMetadata, load_adapter, read_metadata, save_adapter
from cellseg1d.model.cellseg1_format import (
    Cellseg1FormatError,
    default_adapter_name,
    export_cellseg1_adapter,
    import_cellseg1_adapter,
    lora_layout,
    read_cellseg1_pth,
    reference_keys,
    write_cellseg1_pth,
)
from cellseg1d.model.checkpoint import load_sam, sha256_file
from cellseg1d.model.lora import apply_lora, is_lora_target, unwrap
from cellseg1d.model.qkv import split_qkv
from cellseg1d.model.sam import build_sam
from tests.model.test_lora import randomize_lora, run_sam

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 256  # tiny models run at 256 px here
RANK = 4
#: (reference prefix, decoder attention) in the reference's numbering order; B's rows per attention.
DECODER = (("sa", "self_attn", 256), ("cti", "cross_attn_token_to_image", 128),
           ("cit", "cross_attn_image_to_token", 128))


def _is_head(key: str) -> bool:
    return "prompt_encoder" in key or ("mask_decoder" in key and "transformer" not in key)


@pytest.fixture(scope="module")
def base(tiny_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random tiny SAM checkpoint at input 1024 (like the official files) and its state dict."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def base_sam(base: tuple[Path, dict[str, torch.Tensor]]) -> Sam:
    sam, _ = load_sam(base[0], image_size=SIZE, allow_custom=True)
    return sam


def reference_file(base_state: dict[str, torch.Tensor], *, seed: int = 3, blocks: int = 4, width: int = 192,
                   rank: int = RANK, decoder_rank: int | None = None) -> dict[str, torch.Tensor]:
    """The dict the reference's save_lora_parameters writes, built by hand, with random non-zero A and B."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.2

    data: dict[str, torch.Tensor] = {}
    # encoder: per block q then v, so 2 * blocks of each; saved as Parameters, as the reference does
    for index in range(2 * blocks):
        data[f"w_a_{index:03d}"] = nn.Parameter(rand(rank, width))
    for index in range(2 * blocks):
        data[f"w_b_{index:03d}"] = nn.Parameter(rand(width, rank))
    decoder_rank = decoder_rank or rank
    for prefix, _, out in DECODER:
        for index in range(4):  # 2 layers x (q, v)
            data[f"{prefix}_a_{index:03d}"] = rand(decoder_rank, 256)
        for index in range(4):
            data[f"{prefix}_b_{index:03d}"] = rand(out, decoder_rank)
    for key, value in base_state.items():
        if "prompt_encoder" in key:
            data[key] = value.clone()
    for key, value in base_state.items():
        if "mask_decoder" in key and "transformer" not in key:
            data[key] = value.clone()
    data["fati_qa"], data["fati_qb"] = rand(decoder_rank, 256), rand(128, decoder_rank)
    data["fati_va"], data["fati_vb"] = rand(decoder_rank, 256), rand(128, decoder_rank)
    return data


def save(data: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(data, path)
    return path


# --- a forward pass computed by hand from a reference file --------------------------------------------------


class HandQKV(nn.Module):
    """The fused projection with B(A(x)) added to its q (first third) and v (last third) outputs."""

    def __init__(self, fused: nn.Linear, aq, bq, av, bv) -> None:
        super().__init__()
        self.fused, self.aq, self.bq, self.av, self.bv = fused, aq, bq, av, bv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fused(x)
        q_delta = x @ self.aq.T @ self.bq.T
        v_delta = x @ self.av.T @ self.bv.T
        return out + torch.cat([q_delta, torch.zeros_like(q_delta), v_delta], dim=-1)


class HandProj(nn.Module):
    """proj(x) + B(A(x))."""

    def __init__(self, proj: nn.Linear, a, b) -> None:
        super().__init__()
        self.proj, self.a, self.b = proj, a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + x @ self.a.T @ self.b.T


def hand_adapted(sam: Sam, data: dict[str, torch.Tensor]) -> Sam:
    """A copy of the bare (fused-qkv) ``sam`` with the reference file's LoRA applied by hand."""
    sam = copy.deepcopy(sam)
    t = {key: value.detach() for key, value in data.items()}
    for block_index, block in enumerate(sam.image_encoder.blocks):
        q, v = 2 * block_index, 2 * block_index + 1
        block.attn.qkv = HandQKV(block.attn.qkv, t[f"w_a_{q:03d}"], t[f"w_b_{q:03d}"], t[f"w_a_{v:03d}"],
                                 t[f"w_b_{v:03d}"])
    transformer = sam.mask_decoder.transformer
    for layer_index, layer in enumerate(transformer.layers):
        for prefix, attention, _ in DECODER:
            module = getattr(layer, attention)
            q, v = 2 * layer_index, 2 * layer_index + 1
            module.q_proj = HandProj(module.q_proj, t[f"{prefix}_a_{q:03d}"], t[f"{prefix}_b_{q:03d}"])
            module.v_proj = HandProj(module.v_proj, t[f"{prefix}_a_{v:03d}"], t[f"{prefix}_b_{v:03d}"])
    final = transformer.final_attn_token_to_image
    final.q_proj = HandProj(final.q_proj, t["fati_qa"], t["fati_qb"])
    final.v_proj = HandProj(final.v_proj, t["fati_va"], t["fati_vb"])
    return sam


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return image, torch.tensor([[40.0, 60.0], [128.0, 128.0], [200.0, 30.0]])


def outputs(sam: Sam, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return run_sam(sam, *inputs)


def assert_close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=2e-4, rtol=1e-4)


def imported(tmp_path: Path, base: tuple[Path, dict[str, torch.Tensor]], data: dict[str, torch.Tensor],
             name: str = "ref") -> Path:
    path, state = base
    source = save(data, tmp_path / f"{name}.pth")
    import_cellseg1_adapter(source, state, sha256_file(path), tmp_path / name, name)
    return tmp_path / name


# --- layout -------------------------------------------------------------------------------------------------


def test_layout_is_the_reference_key_set_and_cellseg1d_targets() -> None:
    with torch.device("meta"):
        sam = build_sam("vit_h", 512)
    heads = [key for key in sam.state_dict() if _is_head(key)]
    keys = reference_keys(32, heads)
    expected = ({f"w_{ab}_{i:03d}" for ab in "ab" for i in range(64)}
                | {f"{p}_{ab}_{i:03d}" for p in ("sa", "cti", "cit") for ab in "ab" for i in range(4)}
                | {"fati_qa", "fati_qb", "fati_va", "fati_vb"} | set(heads))
    assert len(keys) == len(set(keys)) == len(expected) == 64 * 2 + 24 + 4 + len(heads)
    assert set(keys) == expected
    assert keys[:2] == ["w_a_000", "w_a_001"] and keys[64] == "w_b_000" and keys[-4:] == ["fati_qa", "fati_qb",
                                                                                         "fati_va", "fati_vb"]
    split_qkv(sam)
    targets = {name for name, _ in sam.named_modules() if is_lora_target(name)}
    assert {pair.module for pair in lora_layout(32)} == targets
    pairs = {pair.a_key: pair.module for pair in lora_layout(32)}
    assert pairs["w_a_000"] == "image_encoder.blocks.0.attn.qkv.q"
    assert pairs["w_a_063"] == "image_encoder.blocks.31.attn.qkv.v"
    assert pairs["cti_a_003"] == "mask_decoder.transformer.layers.1.cross_attn_token_to_image.v_proj"
    assert pairs["fati_qa"] == "mask_decoder.transformer.final_attn_token_to_image.q_proj"


# --- import: every key on its module --------------------------------------------------------------------------


def test_import_pins_every_key_to_its_module(tmp_path: Path, base, base_sam: Sam) -> None:
    data = reference_file(base[1])
    directory = imported(tmp_path, base, data)
    meta = read_metadata(directory)
    assert (meta.base_model_type, meta.rank, meta.image_size) == ("tiny", RANK, 512)
    assert meta.base_checkpoint_sha256 == sha256_file(base[0])
    source = meta.settings["imported_from"]
    assert source["format"] == "cellseg1" and source["sha256"] == sha256_file(tmp_path / "ref.pth")
    assert source["file"] == str((tmp_path / "ref.pth").resolve())

    model = load_adapter(copy.deepcopy(base_sam), directory, expect_base_sha256=sha256_file(base[0]))
    model.eval()
    ours, hand = unwrap(model), hand_adapted(base_sam, data)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        tokens = torch.randn(1, 4, 4, 192, generator=generator)
        for index in range(4):
            torch.testing.assert_close(ours.image_encoder.blocks[index].attn.qkv(tokens),
                                       hand.image_encoder.blocks[index].attn.qkv(tokens), atol=1e-5, rtol=1e-5)
        x = torch.randn(2, 7, 256, generator=generator)
        for layer in range(2):
            for _, attention, _ in DECODER:
                for proj in ("q_proj", "v_proj"):
                    got = getattr(getattr(ours.mask_decoder.transformer.layers[layer], attention), proj)(x)
                    want = getattr(getattr(hand.mask_decoder.transformer.layers[layer], attention), proj)(x)
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for proj in ("q_proj", "v_proj"):
            torch.testing.assert_close(getattr(ours.mask_decoder.transformer.final_attn_token_to_image, proj)(x),
                                       getattr(hand.mask_decoder.transformer.final_attn_token_to_image, proj)(x),
                                       atol=1e-5, rtol=1e-5)


def test_imported_model_equals_hand_computed_forward(tmp_path: Path, base, base_sam: Sam, inputs) -> None:
    data = reference_file(base[1], seed=7)
    model = load_adapter(copy.deepcopy(base_sam), imported(tmp_path, base, data))
    model.eval()
    got, want, bare = outputs(unwrap(model), inputs), outputs(hand_adapted(base_sam, data), inputs), \
        outputs(base_sam, inputs)
    assert_close(got, want)
    assert not torch.allclose(want[0], bare[0], atol=1e-3)  # the adapter changes the embedding ...
    assert not torch.allclose(want[1], bare[1], atol=1e-3)  # ... and the masks


@pytest.mark.parametrize("swap", [("w_a_000", "w_a_001"), ("w_b_002", "w_b_004"), ("sa_a_000", "sa_a_002"),
                                  ("cti_b_001", "cit_b_001"), ("fati_qa", "fati_va")])
def test_a_swapped_mapping_would_fail_the_comparison(tmp_path: Path, base, base_sam: Sam, inputs, swap) -> None:
    """q/v, block order, layer order and attention order all change the output: the test above pins them."""
    data = reference_file(base[1], seed=7)
    swapped = dict(data)
    swapped[swap[0]], swapped[swap[1]] = data[swap[1]], data[swap[0]]
    model = load_adapter(copy.deepcopy(base_sam), imported(tmp_path, base, swapped, "swapped"))
    model.eval()
    got, want = outputs(unwrap(model), inputs), outputs(hand_adapted(base_sam, data), inputs)
    assert any(not torch.allclose(x, y, atol=1e-4) for x, y in zip(got, want, strict=True))


# --- export ---------------------------------------------------------------------------------------------------


def test_export_writes_exactly_the_reference_keys(tmp_path: Path, base) -> None:
    path, state = base
    data = reference_file(state)
    directory = imported(tmp_path, base, data)
    _, out = export_cellseg1_adapter(directory, state, sha256_file(path), tmp_path / "out" / "exported.pth")
    written = torch.load(out, weights_only=True)
    assert list(written) == list(data)  # the reference's key set, in its order
    for key, value in data.items():
        assert written[key].dtype == torch.float32 and written[key].shape == value.shape, key
        assert torch.equal(written[key], value.detach()), key
    assert [p.name for p in out.parent.iterdir()] == ["exported.pth"]  # no temporary file left


def test_import_of_export_is_identity(tmp_path: Path, base) -> None:
    path, state = base
    torch.manual_seed(0)
    model = apply_lora(build_sam("tiny", SIZE))
    randomize_lora(model, seed=11, std=0.1)
    original = save_adapter(model, tmp_path / "orig", AdapterMetadata("orig", "tiny", sha256_file(path)))
    _, out = export_cellseg1_adapter(original, state, sha256_file(path), tmp_path / "orig.pth")
    again = import_cellseg1_adapter(out, state, sha256_file(path), tmp_path / "again", "again")
    from safetensors.torch import load_file

    a, b = load_file(original / "adapter.safetensors"), load_file(tmp_path / "again" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.rank == read_metadata(original).rank


def test_export_refuses_another_base(tmp_path: Path, base) -> None:
    path, state = base
    directory = imported(tmp_path, base, reference_file(state))
    with pytest.raises(Cellseg1FormatError, match="trained on base checkpoint sha256 .* give the checkpoint"):
        export_cellseg1_adapter(directory, state, "0" * 64, tmp_path / "x.pth")
    with pytest.raises(Cellseg1FormatError, match=r"must end with \.pth or \.pt"):
        write_cellseg1_pth({}, state, tmp_path / "x.safetensors")


# --- refusals -------------------------------------------------------------------------------------------------


def refused(tmp_path: Path, base, data_or_bytes, match: str) -> str:
    target = tmp_path / "bad.pth"
    if isinstance(data_or_bytes, bytes):
        target.write_bytes(data_or_bytes)
    else:
        torch.save(data_or_bytes, target)
    with pytest.raises(Cellseg1FormatError, match=match) as caught:
        read_cellseg1_pth(target, base[1], base_name="checkpoint SAM.pth")
    assert str(target) in str(caught.value)
    return str(caught.value)


def test_backbone_mismatch_is_refused(tmp_path: Path, base) -> None:
    data = reference_file(base[1], blocks=12, width=768)  # as trained on vit_b
    message = refused(tmp_path, base, data, "is a vit_b adapter")
    assert "(12 encoder blocks, width 768) but checkpoint SAM.pth is a tiny SAM (4 blocks, width 192)" in message
    assert "Import it with the SAM checkpoint it was trained on" in message
    refused(tmp_path, base, reference_file(base[1], blocks=5), "an adapter for an unknown backbone")


def test_truncated_or_corrupt_file_is_refused(tmp_path: Path, base) -> None:
    good = save(reference_file(base[1]), tmp_path / "good.pth").read_bytes()
    refused(tmp_path, base, good[: len(good) // 2], "cannot be read .*download it again")
    refused(tmp_path, base, b"\x00junk" * 100, "cannot be read")
    refused(tmp_path, base, [torch.zeros(1)], "holds a list, not a dict of tensors")


def test_missing_and_extra_keys_are_refused(tmp_path: Path, base) -> None:
    data = reference_file(base[1])
    del data["cti_b_002"], data["mask_decoder.iou_token.weight"]
    data["sa_a_004"], data["lora_extra"] = torch.zeros(1), torch.zeros(1)
    del data["w_b_000"]
    message = refused(tmp_path, base, data, "does not have the keys of a CellSeg1 tiny adapter")
    assert "3 missing (w_b_000, cti_b_002, mask_decoder.iou_token.weight)" in message
    assert "2 unexpected (lora_extra, sa_a_004)" in message
    data = reference_file(base[1])
    del data["w_a_007"]
    refused(tmp_path, base, data, "7 image-encoder A matrices .*an odd number")
    refused(tmp_path, base, {"something": torch.zeros(2)}, "no image-encoder LoRA weights")


def test_wrong_shapes_and_inconsistent_ranks_are_refused(tmp_path: Path, base) -> None:
    data = reference_file(base[1])
    data["sa_b_001"] = torch.randn(255, RANK)
    data["mask_decoder.mask_tokens.weight"] = torch.zeros(3, 256)
    message = refused(tmp_path, base, data, "wrong shape for a rank-4 tiny adapter")
    assert "sa_b_001 (255, 4) (expected (256, 4))" in message
    assert "mask_decoder.mask_tokens.weight (3, 256) (expected (4, 256))" in message
    message = refused(tmp_path, base, reference_file(base[1], decoder_rank=8), "different ranks")
    assert "w_a_000 has rank 4" in message and "rank 8" in message


def test_heads_that_differ_from_the_base_are_refused(tmp_path: Path, base) -> None:
    data = reference_file(base[1])
    data["mask_decoder.iou_token.weight"] = data["mask_decoder.iou_token.weight"] + 1e-6
    data["prompt_encoder.no_mask_embed.weight"] = data["prompt_encoder.no_mask_embed.weight"] * 2
    message = refused(tmp_path, base, data, "head tensors differ from checkpoint SAM.pth's")
    assert "prompt_encoder.no_mask_embed.weight" in message and "mask_decoder.iou_token.weight" in message
    assert "compared exactly" in message and "2 of " in message


def test_non_finite_and_non_float_values_are_refused(tmp_path: Path, base) -> None:
    data = reference_file(base[1])
    data["cit_a_000"] = torch.full_like(data["cit_a_000"], float("nan"))
    refused(tmp_path, base, data, "NaN or infinite")
    data = reference_file(base[1])
    data["w_b_003"] = torch.zeros(192, RANK, dtype=torch.int64)
    refused(tmp_path, base, data, "not floating point")
    data = reference_file(base[1])
    data["note"] = 3
    refused(tmp_path, base, data, "'note' are not tensors")


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_never_executed(tmp_path: Path, base) -> None:
    marker = tmp_path / "code-ran"
    data = reference_file(base[1])
    data["payload"] = _Payload(marker)
    refused(tmp_path, base, data, "not a plain weights file")
    assert not marker.exists()


def test_default_names() -> None:
    assert default_adapter_name("/x/cellpose_specialized_12.pth") == "cellpose_specialized_12"
    assert default_adapter_name("dsb2018 stardist (435).pt") == "dsb2018-stardist-435"
    assert default_adapter_name("__.pth") == "cellseg1-adapter"


# --- the command line and the daemon's path -------------------------------------------------------------------


@pytest.fixture
def daemon_config(tmp_path: Path, base) -> Path:
    config = tmp_path / "cellseg1d.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[sam]\ncheckpoint = "{base[0]}"\n'
                      'allow_custom_checkpoint = true\nimage_size = 256\n')
    return config


def test_cli_import_assign_list_export(tmp_path: Path, base, daemon_config: Path, capsys) -> None:
    data = reference_file(base[1])
    source = save(data, tmp_path / "deepbacs_rod_brightfield_9.pth")
    rc = main(["adapters", "import", str(source), "--format", "cellseg1", "--assign", "bacteria",
               "--config", str(daemon_config)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "CellSeg1 tiny adapter, rank 4" in out and "registered deepbacs_rod_brightfield_9@v1" in out
    assert "assigned deepbacs_rod_brightfield_9@v1 to experiment bacteria" in out
    assert main(["adapters", "show", "deepbacs_rod_brightfield_9", "--json", "--config", str(daemon_config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["experiments"] == ["bacteria"] and shown["base_sha256"] == sha256_file(base[0])
    assert shown["metadata"]["settings"]["imported_from"]["sha256"] == sha256_file(source)
    assert not [p for p in (tmp_path / "state" / "adapters").iterdir() if p.name.startswith(".")]

    # again under another name with an explicit checkpoint; the same weights under the same name are refused
    assert main(["adapters", "import", str(source), "--name", "rods", "--checkpoint", str(base[0]),
                 "--allow-custom-checkpoint", "--config", str(daemon_config)]) == 0
    assert main(["adapters", "import", str(source), "--config", str(daemon_config)]) == 2
    assert "already registered as deepbacs_rod_brightfield_9@v1" in capsys.readouterr().err

    out_file = tmp_path / "exported.pth"
    rc = main(["adapters", "export", "rods@v1", "--format", "cellseg1", "--out", str(out_file),
               "--config", str(daemon_config)])
    printed = capsys.readouterr().out
    assert rc == 0 and "image_encoder_lora_rank = mask_decoder_lora_rank = 4" in printed
    written = torch.load(out_file, weights_only=True)
    assert list(written) == list(data) and all(torch.equal(written[k], data[k].detach()) for k in data)
    assert main(["adapters", "export", "rods", "--out", str(out_file), "--config", str(daemon_config)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["adapters", "export", "rods", "--out", str(out_file), "--force",
                 "--config", str(daemon_config)]) == 0


def test_cli_import_refusals(tmp_path: Path, base, daemon_config: Path, capsys) -> None:
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    torch.save(build_sam("tiny", 1024).state_dict(), other)  # another base checkpoint
    source = save(reference_file(base[1]), tmp_path / "a.pth")
    assert main(["adapters", "import", str(source), "--checkpoint", str(other), "--allow-custom-checkpoint",
                 "--config", str(daemon_config)]) == 2
    assert "is not the daemon's base model" in capsys.readouterr().err
    # without a daemon base: the file's heads are checked against the given checkpoint
    bare = tmp_path / "bare.toml"
    bare.write_text(f'state_dir = "{tmp_path / "state2"}"\n')
    assert main(["adapters", "import", str(source), "--checkpoint", str(other), "--allow-custom-checkpoint",
                 "--config", str(bare)]) == 2
    err = capsys.readouterr().err
    assert f"{source}: its prompt-encoder / mask-decoder head tensors differ" in err
    assert main(["adapters", "import", str(source), "--config", str(bare)]) == 2
    assert "give the SAM checkpoint the adapter was trained on: --checkpoint" in capsys.readouterr().err
    # a custom base needs --allow-custom-checkpoint
    assert main(["adapters", "import", str(source), "--checkpoint", str(base[0]), "--config", str(bare)]) == 2
    assert "has no official checkpoint" in capsys.readouterr().err


def test_imported_adapter_runs_on_the_daemons_path(tmp_path: Path, base, daemon_config: Path, base_sam: Sam,
                                                   inputs, capsys) -> None:
    """Registered by import, the adapter is activated by the registry path the daemon uses (store copy, cache)."""
    from cellseg1d.catalog.db import open_catalog
    from cellseg1d.config import load_config
    from cellseg1d.routing.registry import Registry, adapter_ref

    data = reference_file(base[1], seed=9)
    assert main(["adapters", "import", str(save(data, tmp_path / "cellseg_blood_117.pth")), "--image-size",
                 "256", "--config", str(daemon_config)]) == 0
    capsys.readouterr()
    config = load_config(daemon_config)
    catalog = open_catalog(config)
    try:
        ref = adapter_ref(Registry(catalog, config.adapter_store).get("cellseg_blood_117"))
    finally:
        catalog.close()
    sam, info = load_sam(base[0], image_size=SIZE, allow_custom=True)
    cache = AdapterCache(sam, expect_base_sha256=info.sha256)
    cache.activate(ref.path)
    model = cache.model
    model.eval()
    assert_close(outputs(unwrap(model), inputs), outputs(hand_adapted(base_sam, data), inputs))


def test_vit_h_file_as_published(tmp_path: Path, base) -> None:
    """The paper's published adapters are vit_h files: 64 encoder A/B pairs of width 1280, rank 4."""
    with torch.device("meta"):
        state = build_sam("vit_h", 1024).state_dict()  # shapes only, except the heads the reader compares
    generator = torch.Generator().manual_seed(0)
    state.update({key: torch.randn(value.shape, generator=generator) for key, value in state.items()
                  if _is_head(key)})
    data = reference_file(state, blocks=32, width=1280)
    adapter = read_cellseg1_pth(save(data, tmp_path / "cellpose_specialized_12.pth"), state)
    assert (adapter.model_type, adapter.rank) == ("vit_h", 4)
    assert len(adapter.tensors) == 2 * (64 + 14)
    q31 = "base_model.model.image_encoder.blocks.31.attn.qkv.v.lora_A.weight"
    assert torch.equal(adapter.tensors[q31], data["w_a_063"])
    out = write_cellseg1_pth(adapter.tensors, state, tmp_path / "back.pth")
    written = torch.load(out, weights_only=True)
    assert list(written) == list(data) and all(torch.equal(written[k], data[k].detach()) for k in data)
    with pytest.raises(Cellseg1FormatError, match=r"is a vit_h adapter \(32 encoder blocks, width 1280\) but "
                                                  r"the base checkpoint is a tiny SAM \(4 blocks, width 192\)"):
        read_cellseg1_pth(tmp_path / "cellpose_specialized_12.pth", base[1])
