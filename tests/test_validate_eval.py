"""`validate` checks `eval.judge` and `eval.capability` as `eval` does, and validates every manifest of a nightly
list."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from click.testing import CliRunner, Result

from cna_dist.cli import main
from tests.conftest import snapshot
from tests.test_weights import HEADERS, rewrite_header

ROOT = Path(__file__).resolve().parents[1]


def validate(*args: object) -> Result:
    return CliRunner().invoke(main, ["validate", *(str(a) for a in args)])


def with_eval(workspace: Path, **values: object) -> Path:
    data = yaml.safe_load(workspace.read_text())
    data["eval"] = values
    workspace.write_text(yaml.safe_dump(data))
    return workspace


def test_a_judge_is_checked_like_the_model(workspace: Path, tiny_llama: Path) -> None:
    judge = workspace.parent / "judge"
    shutil.copytree(tiny_llama, judge)
    ok = validate(with_eval(workspace, judge={"uri": "./judge"}))
    assert ok.exit_code == 0, ok.output
    rewrite_header(judge, HEADERS[0][1])  # the hostile header: one more tensor than its bytes
    before = snapshot(workspace.parent)
    bad = validate(workspace)
    assert bad.exit_code == 2 and str(judge / "model.safetensors") in bad.output, bad.output
    assert "eval.judge.uri" in bad.output and "model.layers.0.mlp.extra.weight" in bad.output
    assert snapshot(workspace.parent) == before


def test_a_judge_that_is_not_a_checkpoint_is_named(workspace: Path) -> None:
    result = validate(with_eval(workspace, judge={"uri": "./no-judge"}))
    assert result.exit_code == 2 and "eval.judge.uri" in result.output and "no-judge" in result.output, result.output


def test_capability_tasks_are_checked_and_hub_tasks_wait_for_check_remote(workspace: Path) -> None:
    missing = validate(with_eval(workspace, capability=["tasks/missing.yaml"]))
    assert missing.exit_code == 2, missing.output
    assert "eval.capability" in missing.output and str(workspace.parent / "tasks" / "missing.yaml") in missing.output
    hub = validate(with_eval(workspace, capability=["arc_easy"]))  # its data is on the Hub: not opened offline
    assert hub.exit_code == 0, hub.output
    assert "not opened: capability task arc_easy (use --check-remote)" in hub.output


def test_a_nightly_list_validates_every_manifest_it_names(workspace: Path, tmp_path: Path) -> None:
    bad = workspace.parent / "bad.yaml"
    bad.write_text(workspace.read_text().replace("top_k: 40", "top_k: 0"))
    nightly = workspace.parent / "nightly.yaml"
    nightly.write_text("manifests: [manifest.yaml, bad.yaml]\n")
    result = validate(nightly)
    assert result.exit_code == 2, result.output
    assert f"ok: {workspace}" in result.output and f"error: {bad}: select.top_k" in result.output
    assert "1 of 2 manifests are bad" in result.output
    nightly.write_text("manifests: [manifest.yaml]\n")
    assert validate(nightly).exit_code == 0


def test_the_shipped_nightly_list_validates_offline() -> None:
    result = validate(ROOT / "manifests" / "nightly.yaml")
    assert result.exit_code == 0, result.output
    assert result.output.count("ok: ") == 2
