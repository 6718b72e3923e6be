"""Per-experiment adapters on one loaded SAM: in the pipeline, and in a real daemon with the CLI beside it.

The base is the tiny SAM pretrained on synthetic cells (cellseg1d/testing/data); adapter
"alpha" barely changes it (it finds the cells), adapter "beta" is strong
enough to blind it (no object passes the thresholds). Which adapter ran is
therefore visible in the label images themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cellseg1d.builtin import sam as sam_plugin
from cellseg1d.catalog import Catalog
from cellseg1d.config import build_config
from cellseg1d.errors import PluginError
from cellseg1d.model.metrics import average_precision
from cellseg1d.model.adapters import WEIGHTS_FILE, AdapterMetadata, save_adapter
from cellseg1d.model.data import to_uint8_rgb
from cellseg1d.model.inference import segment_image
from cellseg1d.model.lora import apply_lora, unwrap
from cellseg1d.model.sam import build_sam
from cellseg1d.pipeline import Pipeline
from cellseg1d.plugins import build_plugin_manager
from cellseg1d.routing.registry import BaseModel, Registry, adapter_ref, sha256_of
from cellseg1d.testing.synthetic import make_czyx, write_ome_zarr
from tests.helpers import TINY_BASE, REPO, catalog_rows, image_status, jobs_for, wait_for
from tests.model.test_lora import randomize_lora

SAM = {"model_type": "tiny", "allow_custom_checkpoint": True, "image_size": 256, "points_per_side": 8,
       "crop_n_layers": 0, "device": "cpu"}
#: (seed, std) of the LoRA weights: alpha keeps the base's behaviour, beta blinds it.
ALPHA, BETA = (1, 0.02), (3, 0.3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(TINY_BASE)).items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The base checkpoint (.pth) and adapter folders alpha, beta and foreign (trained on another base)."""
    if not TINY_BASE.is_file():
        pytest.skip(f"{TINY_BASE} not present")
    folder = tmp_path_factory.mktemp("models")
    state = base_state()
    checkpoint = folder / "tiny_cells.pth"
    torch.save(state, checkpoint)
    sha = sha256_of(checkpoint)
    out = {"checkpoint": checkpoint}
    for name, (seed, std), base_sha in (("alpha", ALPHA, sha), ("beta", BETA, sha), ("foreign", ALPHA, "f" * 64)):
        sam = build_sam("tiny", 256)
        sam.load_state_dict(state)
        model = apply_lora(sam)
        randomize_lora(model, seed=seed, std=std)
        out[name] = save_adapter(model, folder / name, AdapterMetadata(name, "tiny", base_sha))
    return out


def expected_labels(models: dict[str, Path], adapter: str | None, plane: np.ndarray) -> np.ndarray:
    """What SAM with ``adapter`` gives for a (C, Y, X) plane, computed here without the daemon."""
    from cellseg1d.builtin.sam import inference_settings
    from cellseg1d.config import SamSettings
    from cellseg1d.model.adapters import load_adapter

    sam = build_sam("tiny", 256)
    sam.load_state_dict(base_state())
    model = unwrap(load_adapter(sam, models[adapter])) if adapter else sam
    settings = inference_settings(SamSettings(checkpoint=models["checkpoint"], **SAM))
    return segment_image(model, to_uint8_rgb(plane), settings)


def write_cells(path: Path, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 2-channel 128 x 128 image of bright cells; returns (path, nuclei plane (1, Y, X), true mask)."""
    data, mask = make_czyx((128, 128), 12, seed=seed)
    write_ome_zarr(path, data[0], axes="czyx", channel_names=["nuclei", "membrane"], n_levels=1)
    return path, data[0, 0:1, 0], mask


def read_labels(image: Path, name: str = "cellseg1d") -> tuple[np.ndarray, dict]:
    group = zarr.open_group(str(image / "labels" / name), mode="r")
    return np.asarray(group["0"]), dict(group.attrs)["cellseg1d"]


def same_labels(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal segmentations (every object matched at IoU 0.9, or both empty)."""
    if a.max() == 0 or b.max() == 0:
        return a.max() == b.max()
    return average_precision(a, b, (0.9,))[0].ap == 1.0


@pytest.fixture
def fresh_holder():
    sam_plugin.HOLDER.reset()
    yield sam_plugin.HOLDER
    sam_plugin.HOLDER.reset()


def pipeline_setup(tmp_path: Path, acquisition: Path, models: dict[str, Path], **segmentation):
    config = build_config({
        "state_dir": str(tmp_path / "state"), "watch": {"roots": [{"path": str(acquisition)}]},
        "sam": {"checkpoint": str(models["checkpoint"]), **SAM}, "segmentation": segmentation,
    })
    catalog = Catalog(config.catalog_url)
    catalog.migrate()
    registry = Registry(catalog, config.adapter_store, BaseModel("tiny", sha256_of(models["checkpoint"])))
    pm = build_plugin_manager()
    pm.hook.configure(config=config)
    return config, registry, Pipeline(config, pm)


# ---------------------------------------------------------------------------
# In one process: the pipeline with the SAM plugin
# ---------------------------------------------------------------------------


def test_adapters_switch_on_one_base_and_results_record_provenance(tmp_path, acquisition, models,
                                                                   fresh_holder) -> None:
    config, registry, pipeline = pipeline_setup(tmp_path, acquisition, models)
    alpha = adapter_ref(registry.add(models["alpha"]))
    beta = adapter_ref(registry.add(models["beta"]))
    root = config.watch.roots[0]
    image, plane, truth = write_cells(acquisition / "a.zarr", seed=0)
    want = {"alpha": expected_labels(models, "alpha", plane), "beta": expected_labels(models, "beta", plane)}
    assert want["alpha"].max() > 5 and want["beta"].max() == 0  # the adapters are told apart by output

    for ref in (alpha, beta, alpha):
        result = pipeline.run(image, root, image, experiment=f"exp-{ref.name}", adapter=ref)
        labels, provenance = read_labels(image)
        assert same_labels(labels[0], want[ref.name]), ref.name
        assert result.segmenter == f"sam:tiny+{ref.name}@v1"
        for record in (provenance, result.provenance):
            assert record["experiment"] == f"exp-{ref.name}"
            assert record["adapter"] == {"name": ref.name, "version": 1, "sha256": ref.sha256}
            assert record["base_model"] == {"type": "tiny", "sha256": sha256_of(models["checkpoint"])}
            assert record["settings"]["segmenter"]["points_per_side"] == 8
            assert record["version"] and record["pipeline_version"]
    assert average_precision(read_labels(image)[0][0], truth, (0.5,))[0].ap >= 0.6
    assert fresh_holder.loads == 1  # one base model for every adapter
    (base,) = fresh_holder.bases.values()
    assert base.cache.loads == 2 and base.cache.hits >= 1  # alpha came back from the cache

    # no adapter: the bare base (LoRA layers disabled), as if none had been loaded
    result = pipeline.run(image, root, image, experiment="other")
    assert result.segmenter == "sam:tiny" and result.provenance["adapter"] is None
    assert same_labels(read_labels(image)[0][0], expected_labels(models, None, plane))
    # the root's policy "classical": SAM steps aside
    assert pipeline.run(image, root, image, experiment="other", fallback=True).segmenter == "classical"


def test_versioned_labels_keep_every_version(tmp_path, acquisition, models, fresh_holder) -> None:
    config, registry, pipeline = pipeline_setup(tmp_path, acquisition, models, versioned_labels=True)
    registry.add(models["alpha"])
    v2 = registry.add(models["beta"], name="alpha")  # same name, new weights: version 2
    assert v2.version == 2
    image, _, _ = write_cells(acquisition / "a.zarr", seed=1)
    for version in (1, 2):
        pipeline.run(image, config.watch.roots[0], image, experiment="e",
                     adapter=adapter_ref(registry.get("alpha", version)))
    assert sorted(p.name for p in (image / "labels").iterdir() if not p.name.startswith((".", "zarr"))) == [
        "cellseg1d-alpha-v1", "cellseg1d-alpha-v2"]
    assert read_labels(image, "cellseg1d-alpha-v1")[1]["adapter"]["version"] == 1
    assert read_labels(image, "cellseg1d-alpha-v2")[1]["adapter"]["version"] == 2


def test_broken_adapter_fails_its_job_only(tmp_path, acquisition, models, fresh_holder) -> None:
    config, registry, pipeline = pipeline_setup(tmp_path, acquisition, models)
    alpha = adapter_ref(registry.add(models["alpha"]))
    beta = adapter_ref(registry.add(models["beta"]))
    image, _, _ = write_cells(acquisition / "a.zarr", seed=2)
    weights = beta.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PluginError) as caught:
        pipeline.run(image, config.watch.roots[0], image, experiment="e", adapter=beta)
    assert caught.value.plugin == "sam" and str(beta.path) in str(caught.value) and "sha256" in str(caught.value)
    assert not (image / "labels" / "cellseg1d").exists()
    # the shared model is unharmed: the next job runs with its adapter
    assert pipeline.run(image, config.watch.roots[0], image, experiment="e", adapter=alpha).object_count > 5


# ---------------------------------------------------------------------------
# A real daemon: two experiments, held jobs, reprocessing, a refused adapter
# ---------------------------------------------------------------------------


def cli(state: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellseg1d", *args, "--config", str(config), "--state-dir",
                           str(state)], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.slow
def test_daemon_routes_experiments_to_their_adapters(tmp_path, acquisition, models, daemons) -> None:
    state = tmp_path / "state"
    config = tmp_path / "cellseg1d.toml"
    sam = "\n".join(f"{k} = {json.dumps(v)}" for k, v in SAM.items())
    config.write_text(f"""
state_dir = "{state}"
[[watch.roots]]
path = "{acquisition}"
without_adapter = "hold"
experiments = [{{ regex = '^(?P<exp>[a-z]+)/', experiment = "{{exp}}" }}]
[readiness]
settle_seconds = 0.3
[sam]
checkpoint = "{models['checkpoint']}"
{sam}
""")
    # register and assign before the daemon starts (in-process, the same code the CLI runs)
    catalog = Catalog(f"sqlite:///{state / 'catalog.sqlite'}")
    catalog.migrate()
    registry = Registry(catalog, state / "adapters", BaseModel("tiny", sha256_of(models["checkpoint"])))
    registry.add(models["alpha"])
    registry.add(models["beta"])
    registry.assign("alpha", "alpha")
    registry.assign("beta", "beta")

    images = {}
    for exp, seed in (("alpha", 10), ("beta", 11), ("gamma", 12)):
        images[exp] = write_cells(acquisition / exp / f"{exp}1.zarr", seed)
    daemon = daemons(state, "--config", str(config), env={"OMP_NUM_THREADS": "1"})
    alpha_img, beta_img, gamma_img = (str(images[e][0]) for e in ("alpha", "beta", "gamma"))
    wait_for(lambda: {image_status(state).get(p) for p in (alpha_img, beta_img)} == {"done"}, 90,
             what="alpha and beta images")
    wait_for(lambda: image_status(state).get(gamma_img) == "held", 30, what="gamma image held")

    # each image got its experiment's adapter: told by the labels, and by the catalog
    for exp in ("alpha", "beta"):
        path, plane, _ = images[exp]
        labels, provenance = read_labels(path)
        assert same_labels(labels[0], expected_labels(models, exp, plane)), exp
        assert provenance["adapter"]["name"] == exp and provenance["experiment"] == exp
    assert read_labels(images["alpha"][0])[0].max() > 5 and read_labels(images["beta"][0])[0].max() == 0
    rows = dict(catalog_rows(state, "SELECT images.path, adapters.name FROM jobs JOIN images ON "
                                    "images.id = jobs.image_id JOIN adapters ON adapters.id = jobs.adapter_id"))
    assert rows == {alpha_img: "alpha", beta_img: "beta"}

    # held: visible in status, nothing written; assigning releases it and the running daemon runs it
    status = json.loads(cli(state, config, "status", "--json").stdout)
    assert status["held"] == [{"experiment": "gamma", "jobs": 1, "hint": "cellseg1d adapters assign gamma ADAPTER"}]
    assert not (images["gamma"][0] / "labels").exists()
    out = cli(state, config, "adapters", "assign", "gamma", "alpha@v1")
    assert out.returncode == 0 and "1 held job(s) released" in out.stdout, out.stderr
    wait_for(lambda: image_status(state).get(gamma_img) == "done", 60, what="released gamma image")
    assert read_labels(images["gamma"][0])[1]["adapter"]["name"] == "alpha"
    assert same_labels(read_labels(images["gamma"][0])[0][0], expected_labels(models, "alpha", images["gamma"][1]))

    # an adapter trained on another base is refused; nothing is registered
    out = cli(state, config, "adapters", "add", str(models["foreign"]))
    assert out.returncode == 2 and str(models["foreign"]) in out.stderr and "base checkpoint" in out.stderr
    assert not (state / "adapters" / "foreign").exists()

    # a new version for beta (alpha's weights under beta's name), then reprocess: a second run, new provenance
    out = cli(state, config, "adapters", "add", str(models["alpha"]), "--name", "beta", "--assign", "beta")
    assert out.returncode == 0 and "beta@v2" in out.stdout, out.stderr
    out = cli(state, config, "reprocess", "--experiment", "beta", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["queued"] == [beta_img], out.stderr
    wait_for(lambda: [j[0] for j in jobs_for(state, beta_img)] == ["done", "done"], 60, what="beta reprocessed")
    labels, provenance = read_labels(images["beta"][0])
    assert provenance["adapter"]["version"] == 2 and labels.max() > 5  # replaced by the new version's labels
    runs = catalog_rows(state, "SELECT results.provenance FROM results JOIN images ON images.id = "
                               "results.image_id WHERE images.path = ? ORDER BY results.id", (beta_img,))
    assert [json.loads(r[0])["adapter"]["version"] for r in runs] == [1, 2]  # the catalog keeps every run
    again = json.loads(cli(state, config, "reprocess", "--experiment", "beta", "--json").stdout)
    assert again["queued"] == [] and again["already"] == [beta_img]

    # one base model for all of it, and a restart processes nothing again
    assert daemon.stop() == 0
    assert daemon.log().count("loaded SAM base model") == 1
    daemon = daemons(state, "--config", str(config), env={"OMP_NUM_THREADS": "1"})
    wait_for(lambda: daemon.log().count("watching") == 2, 60, what="second daemon start")  # the log is appended
    time.sleep(2)  # well past the settle time: every image was looked at again
    assert len(catalog_rows(state, "SELECT id FROM jobs")) == 4
    assert daemon.stop() == 0
