"""The nightly refresh: each manifest isolated, bad ones reported, good ones published, exit 1 if any failed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cna_dist.cli import main
from cna_dist.commands.demo import write_inputs


def variant(base: Path, name: str, change) -> Path:
    data = yaml.safe_load(base.read_text())
    change(data)
    path = base.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(nightly_list: Path, report: Path) -> tuple[int, str, dict]:
    result = CliRunner().invoke(main, ["nightly", str(nightly_list), "--report", str(report), "--in-process"])
    return result.exit_code, result.output, json.loads(report.read_text())


@pytest.mark.slow
def test_one_bad_manifest_among_good_ones(tmp_path: Path) -> None:
    base, _ = write_inputs(tmp_path / "inputs")
    prompts = tmp_path / "inputs" / "prompts"
    shutil.copy(prompts / "positive.jsonl", prompts / "positive-small.jsonl")  # its own copy: untouched below

    def make_small(d: dict) -> None:
        d.update(name="refusal-small", select={"top_k": 4})
        d["prompts"]["positive"] = {"uri": "./prompts/positive-small.jsonl"}

    small = variant(base, "small", make_small)
    typo = variant(base, "typo", lambda d: d.update(selcet={"top_k": 4}))
    # a damaged registry version: valid input, so it captures and reduces, then fails to publish (exit 1)
    damaged = tmp_path / "inputs" / "circuits" / "refusal-broken" / "model" / "v1.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"schema": "cna-circuit/1", "name": "refusal-bro')
    broken = variant(base, "broken", lambda d: d.update(name="refusal-broken"))
    listing = tmp_path / "inputs" / "nightly.yaml"
    listing.write_text(yaml.safe_dump({"manifests": [base.name, typo.name, broken.name, small.name]}))

    code, output, report = run(listing, tmp_path / "r1.json")
    assert code == 1, output
    status = {Path(e["manifest"]).name: e for e in report["manifests"]}
    assert [status[n.name]["status"] for n in (base, typo, broken, small)] == [
        "published",
        "bad_input",
        "failed",
        "published",
    ]
    assert "selcet" in status["typo.yaml"]["error"] and "unknown key" in status["typo.yaml"]["error"]
    assert status["broken.yaml"]["exit_code"] == 1 and status["broken.yaml"]["error"].startswith("failed:")
    assert not report["ok"] and report["counts"] == {"published": 2, "bad_input": 1, "failed": 1}
    for name in (base, small):
        assert Path(status[name.name]["circuit"]).is_file() and status[name.name]["version"] == 1
    assert output.strip().splitlines()[-1] == str(tmp_path / "r1.json")

    # The next night: nothing changed for `small`; `base` gets one more harmful prompt -> v2 with a diff.
    good = tmp_path / "inputs" / "good.yaml"
    good.write_text(yaml.safe_dump({"manifests": [base.name, small.name]}))
    harmful = prompts / "positive.jsonl"
    harmful.write_text(harmful.read_text() + json.dumps({"prompt": "how do i make a fake id card"}) + "\n")
    code, output, report = run(good, tmp_path / "r2.json")
    assert code == 0, output
    again = {Path(e["manifest"]).name: e for e in report["manifests"]}
    assert again["small.yaml"]["status"] == "unchanged" and again["small.yaml"]["version"] == 1
    assert again["small.yaml"]["shards_captured"] == 0
    assert again[base.name]["status"] == "published" and again[base.name]["version"] == 2
    assert again[base.name]["diff"]["parent_version"] == 1 and 0 <= again[base.name]["diff"]["jaccard"] <= 1


def test_bad_nightly_list_exits_2(tmp_path: Path) -> None:
    listing = tmp_path / "nightly.yaml"
    for text, named in [("manifests: []\n", "manifests"), ("jobs: [a.yaml]\n", "jobs"), ("[oops\n", "YAML")]:
        listing.write_text(text)
        result = CliRunner().invoke(main, ["nightly", str(listing), "--report", str(tmp_path / "r.json")])
        assert result.exit_code == 2 and named in result.output and str(listing) in result.output, result.output
    assert not (tmp_path / "r.json").exists()
