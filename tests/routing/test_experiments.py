"""Experiment rules (glob, regex with named groups, metadata keys) and the resolve_experiment order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellseg1d.config import ExperimentRule, build_config
from cellseg1d.errors import ConfigError
from cellseg1d.routing.experiments import glob_regex, match_rules
from cellseg1d.hookspecs import hookimpl
from cellseg1d.ngff.reader import open_image
from cellseg1d.pipeline import Pipeline
from cellseg1d.plugins import build_plugin_manager

ROOT = Path("/data/acq")


def rules(*items: dict) -> list[ExperimentRule]:
    return [ExperimentRule(**item) for item in items]


def match(rule_list: list[ExperimentRule], relative: str, attributes: dict | None = None) -> str | None:
    return match_rules(rule_list, ROOT / relative, ROOT, attributes or {})


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("hela/**", "hela/2026/plate.zarr/A/1/0", True),
    ("hela/*", "hela/plate.zarr/A/1/0", True),  # a leading folder matches: images inside the container
    ("hela/*.zarr", "hela/day1/plate.zarr", False),  # * stays within one folder
    ("**/dapi_*.zarr", "proj/day1/dapi_01.zarr", True),
    ("**/dapi_*.zarr", "dapi_01.zarr", True),  # **/ also matches no folder
    ("scope[12]/*", "scope2/x.zarr", True),
    ("scope[!12]/*", "scope2/x.zarr", False),
    ("hela?/*", "hela/x.zarr", False),
])
def test_glob(pattern: str, path: str, expected: bool) -> None:
    assert (match(rules({"glob": pattern, "experiment": "e"}), path) == "e") is expected
    assert glob_regex(pattern) is glob_regex(pattern)  # compiled once


def test_regex_named_groups_fill_the_name_and_first_rule_wins() -> None:
    table = rules(
        {"regex": r"^(?P<project>[^/]+)/(?P<stain>dapi|gfp)_", "experiment": "{project}-{stain}"},
        {"glob": "**", "experiment": "catch-all"},
    )
    assert match(table, "screenA/gfp_001.zarr") == "screenA-gfp"
    assert match(table, "screenA/bf_001.zarr") == "catch-all"
    assert match(rules({"regex": r"^x/", "experiment": "x"}), "y/a.zarr") is None


def test_metadata_rule_reads_the_image_or_a_group_above(tmp_path: Path, make_image) -> None:
    image, _ = make_image(tmp_path / "plate.zarr", attrs={"acquisition": {"experiment": "hela-dapi"}})
    table = rules({"metadata": "acquisition.experiment"})
    attributes = open_image(image).attributes
    assert match_rules(table, image, tmp_path, attributes) == "hela-dapi"
    # the key on the container, the image below it (v3 group metadata)
    container = tmp_path / "container.zarr"
    inner, _ = make_image(container / "field0")
    (container / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"setup": {"stain": 488}}}))
    templated = rules({"metadata": "setup.stain", "experiment": "laser-{value}"})
    assert match_rules(templated, inner, tmp_path, open_image(inner).attributes) == "laser-488"
    assert match_rules(rules({"metadata": "missing.key"}), inner, tmp_path, {}) is None


@pytest.mark.parametrize(("rule", "message"), [
    ({"glob": "a/*", "regex": "b", "experiment": "x"}, "exactly one of glob, regex or metadata"),
    ({"experiment": "x"}, "exactly one of glob, regex or metadata"),
    ({"regex": "(?P<a>x)", "experiment": "{b}"}, r"uses \['b'\]; allowed: named groups of the regex \(\['a'\]\)"),
    ({"regex": "(unclosed", "experiment": "x"}, "not a valid regular expression"),
    ({"glob": "a/*", "experiment": "{value}"}, "no placeholders for a glob rule"),
])
def test_invalid_rules_are_named(tmp_path: Path, rule: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        build_config({"watch": {"roots": [{"path": str(tmp_path), "experiments": [rule]}]}})
    assert "watch.roots[0].experiments[0]" in str(caught.value)


class SitePlugin:
    @hookimpl
    def resolve_experiment(self, image, root):
        return "site-rule" if "special" in image.path.name else None


def test_plugins_answer_before_the_rules_then_default(tmp_path: Path, make_image) -> None:
    config = build_config({"watch": {"roots": [{"path": str(tmp_path), "experiments": [
        {"glob": "lab/**", "experiment": "from-config"}]}]}})
    pipeline = Pipeline(config, build_plugin_manager(extra=[SitePlugin()]))
    root = config.watch.roots[0]
    special, _ = make_image(tmp_path / "lab" / "special.zarr", size=64)
    plain, _ = make_image(tmp_path / "lab" / "plain.zarr", size=64)
    elsewhere, _ = make_image(tmp_path / "other" / "x.zarr", size=64)
    assert pipeline.experiment_for(open_image(special), root) == "site-rule"
    assert pipeline.experiment_for(open_image(plain), root) == "from-config"
    assert pipeline.experiment_for(open_image(elsewhere), root) == "default"
    result = pipeline.run(plain, root, plain)  # without a job's experiment, the pipeline resolves it
    assert result.experiment == "from-config" and result.provenance["experiment"] == "from-config"
