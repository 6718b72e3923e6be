"""Adapter files: save/load round trips, several adapters in one model, verification, the LRU cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from segment_anything.modeling import Sam

from cellseg1d.model.adapters import (
    METADATA_FILE,
    WEIGHTS_FILE,
    AdapterCache,
    AdapterError,
    AdapterMetadata,
    load_adapter,
    read_metadata,
    save_adapter,
)
from cellseg1d.model.checkpoint import sha256_file
from cellseg1d.model.lora import apply_lora, trainable_parameters, unwrap
from cellseg1d.model.sam import build_sam
from tests.model.test_lora import SIZE, randomize_lora, run_sam

BASE_SHA = "b" * 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_sam("tiny", SIZE).state_dict()


@pytest.fixture
def fresh(base_state: dict[str, torch.Tensor]):
    """Factory: a new tiny base model with the shared weights."""

    def _make() -> Sam:
        sam = build_sam("tiny", SIZE)
        sam.load_state_dict(base_state)
        return sam

    return _make


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return image, torch.tensor([[40.0, 60.0], [128.0, 128.0], [200.0, 30.0]])


def metadata(name: str, **changes) -> AdapterMetadata:
    return AdapterMetadata(name=name, base_model_type="tiny", base_checkpoint_sha256=BASE_SHA, **changes)


def outputs(model: PeftModel | Sam, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return run_sam(unwrap(model), *inputs)


def assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    """Equal outputs to float tolerance: CPU BLAS results can differ in the last bit with the
    memory alignment of their operands, even within one model."""
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def assert_differ(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    assert not torch.allclose(a[0], b[0], atol=1e-4) and not torch.allclose(a[1], b[1], atol=1e-4)


@pytest.fixture
def make_adapter(fresh, tmp_path: Path):
    """Factory: train-like (random) adapter saved under tmp_path/<name>; returns (dir, expected outputs fn)."""

    def _make(name: str, seed: int, rank: int = 4) -> Path:
        model = apply_lora(fresh(), rank=rank)
        randomize_lora(model, seed=seed)
        return save_adapter(model, tmp_path / name, metadata(name, settings={"epochs": 3}, metrics={"ap50": 0.5}))

    return _make


def test_save_load_round_trip(fresh, tmp_path: Path, inputs) -> None:
    trained = apply_lora(fresh())
    randomize_lora(trained, seed=3)
    expected = outputs(trained, inputs)
    directory = save_adapter(trained, tmp_path / "exp", metadata("exp"))
    assert sorted(p.name for p in directory.iterdir()) == [METADATA_FILE, WEIGHTS_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    assert directory.joinpath(WEIGHTS_FILE).stat().st_size < 200_000

    model = load_adapter(fresh(), directory)
    assert isinstance(model, PeftModel) and model.active_adapters == ["exp"]
    assert trainable_parameters(model) == 0  # loaded for inference: frozen
    assert not unwrap(model).training
    assert_same(outputs(model, inputs), expected)
    assert_differ(outputs(fresh(), inputs), expected)


def test_metadata_round_trip(fresh, tmp_path: Path) -> None:
    model = apply_lora(fresh(), rank=2, dropout=0.2)
    given = metadata("exp", rank=99, training_image_fingerprint="abc123", settings={"epochs": 300, "lr": 3e-3},
                     metrics={"ap50": 0.81, "loss": [0.5, 0.25]})
    directory = save_adapter(model, tmp_path / "exp", given)
    read = read_metadata(directory)
    assert read.weights_sha256 == sha256_file(directory / WEIGHTS_FILE)
    assert (read.rank, read.dropout, read.image_size) == (2, 0.2, SIZE)  # taken from the model
    assert read.settings == given.settings and read.metrics == given.metrics
    assert read.training_image_fingerprint == "abc123" and read.created == given.created
    assert read.base_checkpoint_sha256 == BASE_SHA and read.format_version == 1
    assert read.created.endswith("+00:00")
    # a rank-2 adapter loads into a fresh model as rank 2
    loaded = load_adapter(fresh(), directory, trainable=True)
    assert trainable_parameters(loaded) == trainable_parameters(model)


def test_two_adapters_switch_by_name(fresh, make_adapter, inputs) -> None:
    first, second = make_adapter("first", seed=1), make_adapter("second", seed=2)
    model = load_adapter(fresh(), first)
    out_first = outputs(model, inputs)
    model = load_adapter(model, second)
    assert sorted(model.peft_config) == ["first", "second"] and model.active_adapters == ["second"]
    out_second = outputs(model, inputs)
    assert_differ(out_first, out_second)
    model.set_adapter("first")
    assert_same(outputs(model, inputs), out_first)
    model.set_adapter("second")
    assert_same(outputs(model, inputs), out_second)
    # each matches a model holding only that adapter
    assert_same(outputs(load_adapter(fresh(), second), inputs), out_second)
    with pytest.raises(AdapterError, match="already holds an adapter named 'first'"):
        load_adapter(model, first)
    with pytest.raises(AdapterError, match="invalid adapter name 'training'"):
        load_adapter(model, first, "training")


def test_mismatched_base_refused(fresh, make_adapter) -> None:
    directory = make_adapter("exp", seed=1)
    with pytest.raises(AdapterError) as caught:
        load_adapter(fresh(), directory, expect_base_sha256="c" * 64)
    assert str(directory) in str(caught.value) and BASE_SHA in str(caught.value) and "c" * 64 in str(caught.value)

    data = json.loads((directory / METADATA_FILE).read_text())
    data["base_model_type"] = "vit_b"
    (directory / METADATA_FILE).write_text(json.dumps(data))
    sam = fresh()
    with pytest.raises(AdapterError, match=r"trained on a vit_b SAM but the loaded base model is a tiny"):
        load_adapter(sam, directory)
    assert not any("lora" in name for name, _ in sam.named_parameters())


def test_adapter_of_other_rank_layout_refused(fresh, make_adapter) -> None:
    directory = make_adapter("exp", seed=1)
    data = json.loads((directory / METADATA_FILE).read_text())
    data["rank"] = 8  # metadata no longer matches the weights
    (directory / METADATA_FILE).write_text(json.dumps(data))
    with pytest.raises(AdapterError, match="does not fit this base model.*wrong shape"):
        load_adapter(fresh(), directory)


def test_corrupted_weights_refused(fresh, make_adapter) -> None:
    directory = make_adapter("exp", seed=1)
    weights = directory / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    model = load_adapter(fresh(), make_adapter("good", seed=2))
    with pytest.raises(AdapterError, match=r"corrupted or was modified \(sha256 expected"):
        load_adapter(model, directory)
    assert list(model.peft_config) == ["good"]  # nothing was added


def test_metadata_errors(tmp_path: Path, make_adapter) -> None:
    with pytest.raises(AdapterError, match="adapter directory not found"):
        read_metadata(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter.json is missing"):
        read_metadata(tmp_path / "empty")
    directory = make_adapter("exp", seed=1)
    path = directory / METADATA_FILE
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_metadata(directory)
    path.write_text(json.dumps({**good, "format_version": 2}))
    with pytest.raises(AdapterError, match="newer than this cellseg1d"):
        read_metadata(directory)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "base_model_type"}))
    with pytest.raises(AdapterError, match="missing field.*base_model_type"):
        read_metadata(directory)
    path.write_text(json.dumps({**good, "rank": "four"}))
    with pytest.raises(AdapterError, match="'rank' has an invalid value"):
        read_metadata(directory)
    path.write_text(json.dumps({**good, "future_field": 1}))
    assert read_metadata(directory).name == "exp"
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match="adapter.safetensors is missing"):
        load_adapter(build_sam("tiny", SIZE), directory)


def test_save_replaces_existing_adapter(fresh, tmp_path: Path) -> None:
    model = apply_lora(fresh())
    directory = save_adapter(model, tmp_path / "exp", metadata("exp"))
    first_hash = read_metadata(directory).weights_sha256
    randomize_lora(model, seed=9)
    save_adapter(model, directory, metadata("exp"))
    assert read_metadata(directory).weights_sha256 != first_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    with pytest.raises(AdapterError, match="already exists"):
        save_adapter(model, directory, metadata("exp"), overwrite=False)
    with pytest.raises(AdapterError, match="base model type 'vit_b' but the model is a tiny"):
        save_adapter(model, tmp_path / "other", AdapterMetadata("x", "vit_b", BASE_SHA))


def test_cache_lru_eviction_and_load_counting(fresh, make_adapter, inputs) -> None:
    dirs = {name: make_adapter(f"exp_{name}", seed=seed) for seed, name in enumerate("abc", start=1)}
    expected = {name: outputs(load_adapter(fresh(), d), inputs) for name, d in dirs.items()}
    cache = AdapterCache(fresh(), capacity=2, expect_base_sha256=BASE_SHA)

    def check(name: str) -> None:
        cache.activate(dirs[name])
        assert_same(outputs(cache.model, inputs), expected[name])

    check("a")
    check("b")
    assert (cache.loads, cache.evictions) == (2, 0)
    check("a")  # hit: a becomes most recently used
    assert (cache.loads, cache.hits) == (2, 1)
    check("c")  # evicts b
    assert (cache.loads, cache.evictions) == (3, 1)
    assert cache.loaded() == [dirs["a"].resolve(), dirs["c"].resolve()]
    assert len(cache.model.peft_config) == 2
    check("b")  # reloaded, evicts a
    assert (cache.loads, cache.evictions) == (4, 2)
    assert cache.loaded() == [dirs["c"].resolve(), dirs["b"].resolve()]
    assert len(cache.model.peft_config) == 2
    assert cache.last_switch_s > 0


def test_cache_full_refills_a_slot_of_the_same_rank_only(fresh, make_adapter, inputs) -> None:
    """A full cache overwrites the least recently used slot in place; another rank gets new layers."""
    r4a, r4b, r8 = make_adapter("r4a", seed=1), make_adapter("r4b", seed=2), make_adapter("r8", seed=3, rank=8)
    cache = AdapterCache(fresh(), capacity=1)
    slot = cache.activate(r4a)
    assert cache.activate(r4b) == slot  # same rank: the slot is reused
    assert_same(outputs(cache.model, inputs), outputs(load_adapter(fresh(), r4b), inputs))
    assert cache.activate(r8) != slot  # rank 8 does not fit a rank-4 slot
    assert_same(outputs(cache.model, inputs), outputs(load_adapter(fresh(), r8), inputs))
    assert list(cache.model.peft_config) == [cache.active] and cache.loads == 3 and cache.evictions == 2


def test_cache_reloads_changed_adapter_and_keeps_named_ones(fresh, make_adapter, inputs) -> None:
    directory = make_adapter("exp_a", seed=1)
    training = apply_lora(fresh(), adapter_name="current")
    randomize_lora(training, seed=7)
    out_training = outputs(training, inputs)
    cache = AdapterCache(training, capacity=1)
    cache.activate(directory)
    before = outputs(cache.model, inputs)
    make_adapter("exp_a", seed=5)  # retrained in place
    cache.activate(directory)
    assert cache.loads == 2 and len(cache.model.peft_config) == 2  # "current" + the new copy of exp_a
    after = outputs(cache.model, inputs)
    assert_differ(before, after)
    assert_same(after, outputs(load_adapter(fresh(), directory), inputs))
    assert cache.activate("current") == "current"
    assert_same(outputs(cache.model, inputs), out_training)
    with cache.use(directory) as model:
        assert_same(outputs(model, inputs), after)


def test_cache_refuses_foreign_base(fresh, make_adapter) -> None:
    cache = AdapterCache(fresh(), capacity=2, expect_base_sha256="d" * 64)
    with pytest.raises(AdapterError, match="base checkpoint"):
        cache.activate(make_adapter("exp_a", seed=1))
    assert cache.loads == 0


@pytest.mark.slow
def test_cache_switch_time_vit_b(tmp_path: Path) -> None:
    """Switching between two vit_b-sized adapters (loads from disk each time with capacity 1, not with 2)."""
    torch.manual_seed(0)
    sam = build_sam("vit_b", 512)
    state = {k: v.clone() for k, v in sam.state_dict().items()}
    model = apply_lora(sam)
    dirs = []
    for seed in (1, 2):
        randomize_lora(model, seed=seed)
        dirs.append(save_adapter(model, tmp_path / f"a{seed}",
                                 AdapterMetadata(f"a{seed}", "vit_b", BASE_SHA)))
    del model, sam
    for capacity, expected_loads in ((1, 6), (2, 2)):
        base = build_sam("vit_b", 512)
        base.load_state_dict(state)
        cache = AdapterCache(base, capacity=capacity)
        times = []
        for index in range(6):
            start = time.perf_counter()
            cache.activate(dirs[index % 2])
            times.append(time.perf_counter() - start)
        assert cache.loads == expected_loads
        print(f"vit_b adapter switch, capacity {capacity}: median {sorted(times)[3] * 1e3:.1f} ms")
        del cache, base
