"""The demo end to end, and the Ray path: two replicas give the same circuit as the in-process path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cna_dist.circuit import file as circuitmod
from cna_dist.cli import main


def test_demo_recovers_the_planted_gate(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    uri = result.output.strip().splitlines()[-1]
    c = circuitmod.load(uri)
    planted = json.loads((tmp_path / "demo" / "model" / "planted.json").read_text())
    gate = {tuple(x) for x in planted["gate"]}
    universal = {tuple(x) for x in planted["universal"]}
    found = set(c.pairs())
    assert len(found & gate) >= 0.95 * len(gate)
    assert universal <= set(map(tuple, c.universal))
    assert not found & universal
    assert set(map(tuple, c.displaced_universal)) & universal  # the filter really kept some out
    report = json.loads((tmp_path / "demo" / "eval" / "eval.json").read_text())
    rate = {(r["method"], r["multiplier"]): r["refusal_rate"] for r in report["results"]}
    assert report["prompts"]["count"] == 10
    assert rate["cna", 1.0] >= 0.9 and rate["cna", 0.0] <= 0.1
    assert rate["random", 0.0] == rate["random", 1.0] == rate["cna", 1.0]  # the control changes nothing
    assert {"caa"} <= {r["method"] for r in report["results"]}
    if importlib.util.find_spec("lm_eval") is not None:  # the [capability] extra: the demo measures it too
        line = next(x for x in result.output.splitlines() if x.startswith("capability (planted_answer, 12 questions"))
        assert "cna m=0 1.00" in line  # ablating the refusal circuit leaves the planted answer alone
    for png in report["plots"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")  # the suite's shared local Ray
def test_ray_two_replicas_equal_in_process(tmp_path: Path) -> None:
    from cna_dist.commands.demo import write_inputs

    manifest, _ = write_inputs(tmp_path / "d")
    text = manifest.read_text().replace("capture:\n  dtype: float32", "capture:\n  dtype: float32\n  shard_rows: 8")
    manifest.write_text(text)
    ray_copy = manifest.with_name("ray.yaml")
    ray_copy.write_text(text.replace("./store", "./store-ray").replace("./circuits", "./circuits-ray"))
    local = CliRunner().invoke(main, ["mine", str(manifest), "--quiet", "--in-process"])
    assert local.exit_code == 0, local.output
    summary = tmp_path / "summary.json"
    dist = CliRunner().invoke(main, ["mine", str(ray_copy), "--quiet", "--replicas", "2", "--summary", str(summary)])
    assert dist.exit_code == 0, dist.output
    a = circuitmod.load(local.output.strip().splitlines()[-1])
    b = circuitmod.load(dist.output.strip().splitlines()[-1])
    assert a.pairs() == b.pairs()
    for x, y in zip(a.neurons, b.neurons, strict=True):
        assert abs(x.delta - y.delta) <= 1e-9
    s = json.loads(summary.read_text())
    assert len(s["replicas"]) == 2 and sum(s["replicas"].values()) == s["shards_captured"] > 2
