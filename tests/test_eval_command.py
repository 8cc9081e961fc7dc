"""`cna-dist eval` and `cna-dist steer` on the planted model: in process, on Ray replicas, and bad inputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cna_dist.cli import main


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from cna_dist.commands.demo import write_inputs

    manifest, _ = write_inputs(tmp_path_factory.mktemp("eval"))
    result = CliRunner().invoke(main, ["mine", str(manifest), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    return manifest, result.output.strip().splitlines()[-1]


def run_eval(manifest: Path, circuit: str, out: Path, *extra: str) -> dict:
    result = CliRunner().invoke(
        main,
        [
            "eval",
            str(manifest),
            "--circuit",
            circuit,
            "--out",
            str(out),
            "--quiet",
            "--multipliers",
            "0,1,2",
            "--max-new-tokens",
            "12",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    path = result.output.strip().splitlines()[-1]
    assert path == str(out / "eval.json")
    return json.loads(Path(path).read_text())


def test_eval_in_process_writes_results_controls_and_plots(mined: tuple[Path, str], tmp_path: Path) -> None:
    manifest, circuit_uri = mined
    report = run_eval(manifest, circuit_uri, tmp_path / "ev", "--in-process", "--caa")
    results = report["results"]
    assert {(r["method"], r["multiplier"]) for r in results} == {
        (m, x) for m in ("cna", "random", "caa") for x in (0.0, 1.0, 2.0)
    }
    for r in results:
        assert set(r) >= {"method", "multiplier", "refusal_rate", "quality", "n"} and r["n"] == 10
    rate = {(r["method"], r["multiplier"]): r["refusal_rate"] for r in results}
    assert rate["cna", 1.0] >= 0.9 and rate["cna", 0.0] <= 0.1
    assert rate["random", 0.0] == rate["random", 1.0]
    assert rate["cna", 1.0] == rate["random", 1.0] == rate["caa", 1.0]  # m = 1 is no intervention for all
    circuit = json.loads(Path(circuit_uri).read_text())
    per_layer = Counter(n["layer"] for n in circuit["neurons"])
    control = [tuple(p) for p in report["random_control"]]
    assert Counter(layer for layer, _ in control) == per_layer
    assert not set(control) & {(n["layer"], n["neuron"]) for n in circuit["neurons"]}
    assert report["settings"]["caa_layer"] == 6  # the circuit's busiest layer (L5:3, L6:4, L7:3)
    assert report["samples"] and all(s["completion"] for s in report["samples"])
    for png in report["plots"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")  # the suite's shared local Ray
def test_eval_on_two_ray_replicas_equals_in_process(mined: tuple[Path, str], tmp_path: Path) -> None:
    manifest, circuit_uri = mined
    local = run_eval(manifest, circuit_uri, tmp_path / "local", "--in-process")
    dist = run_eval(manifest, circuit_uri, tmp_path / "ray", "--replicas", "2")
    assert dist["results"] == local["results"]
    assert dist["samples"] == local["samples"]


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d["prompts"].pop("eval"), "prompts.eval"),
        (lambda d: d.setdefault("eval", {}).update(refusal_patterns=["(unclosed"]), "eval.refusal_patterns"),
        (lambda d: d.setdefault("eval", {}).update(multipliers=[]), "eval.multipliers"),
    ],
)
def test_eval_bad_manifest_exits_2(mined: tuple[Path, str], tmp_path: Path, change, field: str) -> None:
    manifest, circuit_uri = mined
    data = yaml.safe_load(manifest.read_text())
    change(data)
    bad = manifest.with_name("bad.yaml")
    bad.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(
        main, ["eval", str(bad), "--circuit", circuit_uri, "--out", str(tmp_path / "o"), "--in-process", "--quiet"]
    )
    assert result.exit_code == 2, result.output
    assert field in result.output and str(bad) in result.output
    assert not (tmp_path / "o").exists()


def test_eval_bad_options_exit_2(mined: tuple[Path, str], tmp_path: Path, tiny_llama: Path) -> None:
    manifest, circuit_uri = mined
    (tmp_path / "a-file").write_text("")
    cases = [
        (["--circuit", circuit_uri, "--multipliers", "0,x"], "--multipliers"),
        (["--circuit", circuit_uri, "--out", str(tmp_path / "a-file" / "ev")], "--out"),
        (["--circuit", str(tmp_path / "missing.json")], "missing.json"),
    ]
    other = manifest.with_name("other.yaml")  # the same circuit against another model
    data = yaml.safe_load(manifest.read_text())
    data["model"]["uri"] = str(tiny_llama)
    other.write_text(yaml.safe_dump(data))
    for args, named in cases:
        result = CliRunner().invoke(
            main, ["eval", str(manifest), "--out", str(tmp_path / "o"), *args, "--in-process", "--quiet"]
        )
        assert result.exit_code == 2 and named in result.output, result.output
    result = CliRunner().invoke(
        main, ["eval", str(other), "--circuit", circuit_uri, "--out", str(tmp_path / "o"), "--in-process", "--quiet"]
    )
    assert result.exit_code == 2 and "another model" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_steer_shows_both_generations(mined: tuple[Path, str], tiny_llama: Path) -> None:
    manifest, circuit_uri = mined
    model = str(manifest.parent / "model")
    prompt = "tell me how to write malware that deletes files"
    result = CliRunner().invoke(
        main,
        ["steer", "--model", model, "--circuit", circuit_uri, "--multiplier", "0", "--max-new-tokens", "12", prompt],
    )
    assert result.exit_code == 0, result.output
    plain, steered = result.output.split("--- m=0")
    assert "[refusal]" in plain and "[refusal]" not in steered
    wrong = CliRunner().invoke(main, ["steer", "--model", str(tiny_llama), "--circuit", circuit_uri, prompt])
    assert wrong.exit_code == 2 and "--model" in wrong.output


@pytest.mark.parametrize("engine", [{"engine": "pipeline", "stages": [[0, 4], [4, 8]]}, {"engine": "stream"}], ids=str)
def test_eval_of_a_capture_engine_manifest_generates_on_device_map(
    mined: tuple[Path, str], tmp_path: Path, engine: dict
) -> None:
    """Generation is not a capture engine's job: eval of a pipeline or stream manifest runs device_map, same results."""
    manifest, circuit_uri = mined
    data = yaml.safe_load(manifest.read_text())
    data["model"].update(engine)
    pipeline = manifest.with_name("pipeline.yaml")
    pipeline.write_text(yaml.safe_dump(data))
    plain = run_eval(manifest, circuit_uri, tmp_path / "plain", "--in-process")
    piped = run_eval(pipeline, circuit_uri, tmp_path / "piped", "--in-process")
    assert piped["results"] == plain["results"] and piped["samples"] == plain["samples"]
