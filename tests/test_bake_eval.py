"""`eval` of a baked checkpoint as a model: `cna-dist eval MANIFEST --circuit URI` where the manifest's model is
the circuit baked into its own model at M; multiplier 1 then measures the bake itself and must give what steering
the source at M gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cna_dist.cli import main


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


@pytest.mark.slow
def test_eval_of_a_baked_checkpoint_equals_steering_the_source(tmp_path: Path) -> None:
    from cna_dist.commands.demo import write_inputs

    manifest, _ = write_inputs(tmp_path / "demo")
    circuit = invoke("mine", str(manifest), "--quiet", "--in-process")
    baked = tmp_path / "baked"
    invoke("bake", "--circuit", circuit, "--multiplier", "0", "--out", str(baked))
    doc = yaml.safe_load(manifest.read_text())
    doc["model"]["uri"] = str(baked)
    baked_manifest = manifest.with_name("baked.yaml")
    baked_manifest.write_text(yaml.safe_dump(doc))

    common = ["--circuit", circuit, "--quiet", "--in-process", "--no-caa", "--max-new-tokens", "12"]
    source = json.loads(
        Path(invoke("eval", str(manifest), "--out", str(tmp_path / "e1"), "--multipliers", "0", *common)).read_text()
    )
    bake = json.loads(
        Path(
            invoke("eval", str(baked_manifest), "--out", str(tmp_path / "e2"), "--multipliers", "1", *common)
        ).read_text()
    )

    assert source["baked"] is None
    assert bake["baked"]["multiplier"] == 0.0 and bake["baked"]["model"] == str(baked)
    steered = next(r for r in source["results"] if r["method"] == "cna")
    as_model = next(r for r in bake["results"] if r["method"] == "cna")
    assert steered["refusal_rate"] <= 0.1  # the planted circuit at m = 0 removes refusal
    for key in ("refusal_rate", "quality", "n"):
        assert as_model[key] == steered[key], key
    completions = [(s["prompt"], s["completion"]) for s in source["samples"] if s["method"] == "cna"]
    assert completions == [(s["prompt"], s["completion"]) for s in bake["samples"] if s["method"] == "cna"]


def test_a_bake_record_matches_only_its_circuit_and_model(tmp_path: Path) -> None:
    """A checkpoint baked from circuit A is not circuit B's model: eval's fingerprint check applies to it."""
    from cna_dist.bake import card

    rec = {"schema": card.SCHEMA, "circuit": {"name": "refusal", "version": 1}, "source": {"fingerprint": "f" * 64}}
    assert card.bake_of(rec, "refusal", 1, "f" * 64)
    assert not card.bake_of(rec, "refusal", 2, "f" * 64)
    assert not card.bake_of(rec, "other", 1, "f" * 64)
    assert not card.bake_of(rec, "refusal", 1, "0" * 64)
    assert not card.bake_of(None, "refusal", 1, "f" * 64)
