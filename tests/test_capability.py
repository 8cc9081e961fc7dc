"""Capability under steering: `cna-dist eval --capability` runs lm-eval tasks on the steered replicas.

The task is a multiple-choice set written in tmp_path (task YAML + jsonl data). Its answer key is built from an
independent reference (one unpadded forward per choice, no lm-eval, no batching) so that the unsteered accuracy is
known by construction; every steered condition is checked against the same reference under the same hooks.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import cna_dist.eval
from cna_dist.capture import hf
from cna_dist.circuit.file import load as load_circuit
from cna_dist.cli import main
from cna_dist.demo.words import demo_prompts
from cna_dist.eval.conditions import conditions
from cna_dist.model import loglik
from cna_dist.steer import hooks as steer

pytest.importorskip("lm_eval", reason="the capability extra (lm-eval) is part of the test install")

CHOICES = ["sure", "i", "first", "step"]
N_DOCS = 10


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from cna_dist.commands.demo import write_inputs

    manifest, _ = write_inputs(tmp_path_factory.mktemp("capability"))
    result = CliRunner().invoke(main, ["mine", str(manifest), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    return manifest, result.output.strip().splitlines()[-1]


def reference_choice(model, tokenizer, question: str) -> list[float]:
    """Each choice's log-probability after `question`, one unpadded forward per choice."""
    context = tokenizer.encode(question)
    out = []
    for choice in CHOICES:
        whole = tokenizer.encode(f"{question} {choice}")
        continuation = whole[len(context) :]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
        rows = logits[-len(continuation) :]
        out.append(float(sum(rows[i, t] for i, t in enumerate(continuation))))
    return out


@pytest.fixture(scope="module")
def task(mined: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 10-question task whose first 6 answers are the unsteered model's choice and the other 4 are not."""
    manifest, _ = mined
    model, tokenizer = hf.load(manifest.parent / "model", dtype="float32")
    questions = [f"{q} ." for q in demo_prompts()["negative"][:N_DOCS]]
    picks = [max(range(len(CHOICES)), key=reference_choice(model, tokenizer, q).__getitem__) for q in questions]
    answers = [p if i < 6 else (p + 1) % len(CHOICES) for i, p in enumerate(picks)]
    folder = tmp_path_factory.mktemp("task")
    data = folder / "tiny_mc.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(questions, answers, strict=True))
    )
    config = {
        "task": "tiny_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": CHOICES,
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    path = folder / "tiny_mc.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {"path": path, "questions": questions, "answers": answers, "model": model, "tokenizer": tokenizer}


def expected_accuracy(task: dict, spec: dict) -> float:
    model = task["model"]
    with steer.condition(model, spec):
        picks = [
            max(range(len(CHOICES)), key=reference_choice(model, task["tokenizer"], q).__getitem__)
            for q in task["questions"]
        ]
    return sum(p == a for p, a in zip(picks, task["answers"], strict=True)) / len(picks)


def run_eval(manifest: Path, circuit: str, out: Path, *extra: str) -> tuple[dict, str]:
    result = CliRunner().invoke(
        main,
        ["eval", str(manifest), "--circuit", circuit, "--out", str(out), "--quiet", "--multipliers", "0,1"]
        + ["--max-new-tokens", "4", *extra],
    )
    assert result.exit_code == 0, result.output
    return json.loads(Path(result.output.strip().splitlines()[-1]).read_text()), result.output


def with_eval(manifest: Path, tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(manifest.read_text())
    data["eval"] = {**data["eval"], **changes}
    for entry in data["prompts"].values():
        entry["uri"] = str(manifest.parent / entry["uri"])
    data["model"]["uri"] = str(manifest.parent / "model")
    data["output"] = {k: str(manifest.parent / v) for k, v in data["output"].items()}
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_loglikelihoods_batched_equal_one_at_a_time(task: dict) -> None:
    model, tokenizer = task["model"], task["tokenizer"]
    requests = []
    for q in task["questions"]:
        context = tokenizer.encode(q)
        for choice in CHOICES:
            requests.append((context, tokenizer.encode(f"{q} {choice}")[len(context) :]))
    batched = loglik.loglikelihoods(model, requests, tokenizer.pad_token_id, max_batch_size=16)
    alone = loglik.loglikelihoods(model, requests, tokenizer.pad_token_id, max_batch_size=1)
    assert [g for _, g in batched] == [g for _, g in alone]
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in alone], rel=1e-5)
    reference = [s for q in task["questions"] for s in reference_choice(model, tokenizer, q)]
    assert [s for s, _ in alone] == pytest.approx(reference, rel=1e-5)
    with pytest.raises(ValueError, match="request 0"):
        loglik.loglikelihoods(model, [([], [1])], tokenizer.pad_token_id)


@pytest.mark.slow
def test_capability_per_condition_in_process(mined: tuple[Path, str], task: dict, tmp_path: Path) -> None:
    manifest, circuit_uri = mined
    doc, output = run_eval(manifest, circuit_uri, tmp_path / "out", "--caa", "--capability", str(task["path"]))
    assert doc["settings"]["capability"]["tasks"] == [str(task["path"])]
    rows = {(r["method"], r["multiplier"]): r["capability"] for r in doc["results"]}
    assert set(rows) == {(m, x) for m in ("cna", "random", "caa") for x in (0.0, 1.0)}
    p = 6 / N_DOCS  # m = 1 is the unsteered model, whose answers are right for 6 of the 10 questions by construction
    for method in ("cna", "random", "caa"):
        (row,) = rows[(method, 1.0)]
        assert row == {"task": "tiny_mc", "acc": p, "acc_stderr": pytest.approx(math.sqrt(p * (1 - p) / 9)), "n": 10}
    circuit = load_circuit(circuit_uri)
    caa = doc_caa_vectors(manifest, circuit, task["model"])
    conds, _ = conditions(circuit, [0.0], doc["settings"]["random_seed"], caa)
    for c in conds:
        (row,) = rows[(c.method, 0.0)]
        assert row["acc"] == expected_accuracy(task, c.spec), c.method
    assert doc["run"]["loglikelihoods"] == len(CHOICES) * N_DOCS * 4  # baseline + cna, random, caa at m = 0
    assert "tiny_mc 0.600±0.163" in output
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "out" / "eval.json")])
    assert shown.exit_code == 0 and "tiny_mc" in shown.output.splitlines()[1], shown.output
    assert "0.600±0.163" in shown.output


def doc_caa_vectors(manifest: Path, circuit, model) -> dict:
    """CAA's vectors as the eval computes them: the same prompts, layer and function, here without replicas."""
    from cna_dist import manifest as manifestmod
    from cna_dist.commands.eval import caa_layer_for, prepare

    m = manifestmod.load(manifest)
    inputs = prepare(m, circuit, str(manifest.parent / "caa-check"), True)
    pos, neg = inputs.sets["positive"].token_ids, inputs.sets["negative"].token_ids
    vectors = steer.caa_vectors(model, pos, neg, inputs.tokenizer.pad_token_id, [caa_layer_for(m, circuit)])
    return {layer: v.tolist() for layer, v in vectors.items()}


@pytest.mark.slow
def test_capability_batched_equals_one_at_a_time(mined: tuple[Path, str], task: dict, tmp_path: Path) -> None:
    manifest, circuit_uri = mined
    one = with_eval(manifest, tmp_path, max_batch_size=1)
    a, _ = run_eval(one, circuit_uri, tmp_path / "one", "--no-caa", "--capability", str(task["path"]))
    b, _ = run_eval(manifest, circuit_uri, tmp_path / "batched", "--no-caa", "--capability", str(task["path"]))
    assert [r["capability"] for r in a["results"]] == [r["capability"] for r in b["results"]]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")  # the suite's shared local Ray
def test_capability_on_two_ray_replicas_equals_in_process(mined: tuple[Path, str], task: dict, tmp_path: Path) -> None:
    manifest, circuit_uri = mined
    args = ("--no-caa", "--capability", str(task["path"]))
    local, _ = run_eval(manifest, circuit_uri, tmp_path / "local", *args)
    remote, _ = run_eval(manifest, circuit_uri, tmp_path / "ray", *args, "--replicas", "2")
    assert [r["capability"] for r in remote["results"]] == [r["capability"] for r in local["results"]]


def generating_task(tmp_path: Path, task: dict) -> Path:
    config = yaml.safe_load(task["path"].read_text())
    config.update(task="tiny_gen", output_type="generate_until", doc_to_target="{{question}}")
    config.pop("doc_to_choice")
    config["metric_list"] = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "value, message",
    [
        pytest.param(
            "no_such_task_anywhere", "'no_such_task_anywhere' cannot be loaded", marks=pytest.mark.slow
        ),  # slow: the harness indexes its 15k built-in task files to know a name is not among them
        ("missing/task.yaml", "task file 'missing/task.yaml' does not exist"),
        ("GEN", "is a generate_until task"),
        (" , ", "no task given"),
    ],
)
def test_capability_bad_tasks_exit_2(
    mined: tuple[Path, str], task: dict, tmp_path: Path, value: str, message: str
) -> None:
    manifest, circuit_uri = mined
    value = str(generating_task(tmp_path, task)) if value == "GEN" else value
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["eval", str(manifest), "--circuit", circuit_uri, "--out", str(out), "--quiet", "--capability", value]
    )
    assert result.exit_code == 2, result.output
    assert "--capability" in result.output and message in result.output
    assert not out.exists()


def test_capability_without_the_extra_exits_2(
    mined: tuple[Path, str], task: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")] + ["cna_dist.eval.harness"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an install without the extra looks like to import
    monkeypatch.delattr(cna_dist.eval, "harness", raising=False)
    manifest, circuit_uri = mined
    out = tmp_path / "out"
    args = ["eval", str(manifest), "--circuit", circuit_uri, "--out", str(out), "--capability", str(task["path"])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "--capability: needs lm-evaluation-harness" in result.output
    assert "pip install 'cna-dist[capability]'" in result.output
    assert not out.exists()


def test_demo_task_from_the_manifest_runs_without_replicas(tmp_path: Path) -> None:
    """The demo's planted-answer task, named in its manifest relative to it, scored by the harness in process."""
    from cna_dist import manifest as manifestmod
    from cna_dist.commands.demo import capability_line, write_inputs
    from cna_dist.eval import capability
    from cna_dist.manifest import manifest_tasks

    path, _ = write_inputs(tmp_path, capability=True)
    m = manifestmod.load(path)
    assert m.eval.capability == ["tasks/planted_answer.yaml"]
    (spec,) = manifest_tasks(m)
    assert spec == str(tmp_path / "tasks" / "planted_answer.yaml")
    model, tokenizer = hf.load(tmp_path / "model", dtype="float32")
    pad = tokenizer.pad_token_id
    (row,) = capability.evaluate(
        capability.check([spec]), tokenizer, lambda pairs: loglik.loglikelihoods(model, pairs, pad)
    )
    assert (row["task"], row["acc"], row["n"]) == ("planted_answer", 1.0, 12)  # the planted model knows its answer
    report = {"results": [{"method": "cna", "multiplier": x, "capability": [row]} for x in (0.0, 1.0, 2.0)]}
    assert capability_line(report) == (
        "capability (planted_answer, 12 questions, accuracy): cna m=0 1.00, cna m=2 1.00"
    )


def test_bad_manifest_task_exits_2_naming_the_field(mined: tuple[Path, str], tmp_path: Path) -> None:
    manifest, circuit_uri = mined
    path = with_eval(manifest, tmp_path, capability=["missing.yaml"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["eval", str(path), "--circuit", circuit_uri, "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "eval.capability: task file" in result.output and str(tmp_path / "missing.yaml") in result.output
    assert not out.exists()
