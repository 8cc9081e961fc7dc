"""`bake` as a command: sharded checkpoints, dtype conversion, an interrupted bake finished by a re-run, and every
bad input refused with exit 2 before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

from cna_dist.bake import writer
from cna_dist.cli import main
from cna_dist.demo.models import save_random_model
from cna_dist.steer import hooks as steer
from tests.conftest import snapshot
from tests.test_bake import load, outputs, write_circuit

PAIRS = [(0, 3), (1, 0), (1, 63), (3, 10)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Llama saved in several safetensors shards with an index, and a circuit on it."""
    root = tmp_path_factory.mktemp("bake-sharded")
    plain = save_random_model(root / "plain", arch="llama", n_layers=4, hidden_size=32, intermediate_size=64, seed=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(plain)
    path = root / "sharded"
    model.save_pretrained(path, max_shard_size="60KB")
    for f in plain.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            (path / f.name).write_bytes(f.read_bytes())
    assert len(list(path.glob("*.safetensors"))) >= 4
    return path, write_circuit(root / "c.json", path, PAIRS, 4, 64)


def touched_shards(source: Path) -> set[str]:
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    return {index[f"model.layers.{layer}.mlp.down_proj.weight"] for layer, _ in PAIRS}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["bake", *args])
    return result.exit_code, result.output


def test_sharded_bake_rewrites_only_shards_with_circuit_neurons(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    source, circuit = sharded
    out = tmp_path / "out"
    code, output = invoke("--circuit", str(circuit), "--multiplier", "2", "--out", str(out))
    assert code == 0, output
    touched = touched_shards(source)
    for f in sorted(source.glob("*.safetensors")):
        same = (out / f.name).read_bytes() == f.read_bytes()
        assert same == (f.name not in touched), f.name
    assert (out / "model.safetensors.index.json").read_bytes() == (source / "model.safetensors.index.json").read_bytes()
    model = load(source, torch.float32)
    with steer.steered(model, PAIRS, 2.0):
        want = outputs(model)
    got = outputs(load(out, torch.float32))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    code, output = invoke("--circuit", str(circuit), "--multiplier", "2", "--out", str(out))
    assert code == 0 and "already baked" in output


def test_dtype_conversion(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    source, circuit = sharded
    out = tmp_path / "bf16"
    code, output = invoke("--circuit", str(circuit), "--multiplier", "0.5", "--out", str(out), "--dtype", "bfloat16")
    assert code == 0, output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                assert t.dtype == torch.bfloat16, name
                total += t.numel() * 2
    assert index["metadata"]["total_size"] == total
    model = load(source, torch.bfloat16)
    with steer.steered(model, PAIRS, 0.5):
        want = outputs(model)
    baked = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # its config's dtype
    assert next(baked.parameters()).dtype == torch.bfloat16
    got = outputs(baked)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dies_at", [1, 2])
def test_interrupted_bake_is_finished_by_a_rerun(
    sharded: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_at: int
) -> None:
    """The process dies in the middle of its first or second rewritten shard (its header already written)."""
    source, circuit = sharded
    out = tmp_path / "out"
    real_rewrite, real_transformed, calls, scaled = writer.rewrite, writer.transformed, [], []

    def rewrite(*args, **kwargs):
        calls.append(args[2].name)
        return real_rewrite(*args, **kwargs)

    def transformed(*args, **kwargs):
        if len(calls) == dies_at:
            raise KeyboardInterrupt
        scaled.append(args)
        return real_transformed(*args, **kwargs)

    monkeypatch.setattr(writer, "rewrite", rewrite)
    monkeypatch.setattr(writer, "transformed", transformed)
    with pytest.raises(KeyboardInterrupt):
        from cna_dist.commands import bake as command

        command.run(str(circuit), 0.0, str(out))
    monkeypatch.undo()
    assert (out / f"{calls[-1]}.cna-partial").exists() and not (out / calls[-1]).exists()
    names = {p.name for p in out.iterdir()}
    assert "config.json" not in names and "cna-bake.json" not in names and "README.md" not in names
    assert ".cna-bake-partial" in names
    with pytest.raises((OSError, ValueError)):
        transformers.AutoModelForCausalLM.from_pretrained(out)  # does not look like a checkpoint

    # another bake into the unfinished folder is refused, and writes nothing
    before = snapshot(out)
    code, output = invoke("--circuit", str(circuit), "--multiplier", "2", "--out", str(out))
    assert code == 2 and "unfinished bake" in output
    assert snapshot(out) == before

    code, output = invoke("--circuit", str(circuit), "--multiplier", "0", "--out", str(out))
    assert code == 0, output
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    # every shard before the one it died in is kept: a rewritten shard finished before is not written again
    assert f"rewrote {len(touched_shards(source)) - (dies_at - 1)} weight files" in output
    assert f"{shards.index(calls[-1])} finished before" in output
    fresh = tmp_path / "fresh"
    assert invoke("--circuit", str(circuit), "--multiplier", "0", "--out", str(fresh))[0] == 0
    for f in fresh.iterdir():
        if f.name != "cna-bake.json" and f.name != "README.md":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert {p.name for p in out.iterdir()} == {p.name for p in fresh.iterdir()}


def _circuit_with(path: Path, circuit: Path, **changes) -> Path:
    doc = json.loads(circuit.read_text())
    for key, value in changes.items():
        target = doc
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("fingerprint", "was mined on"),
        ("layers", "model.n_layers: 5, but the model's down projections give 4"),
        ("width", "model.intermediate_size: 128, but the model's down projections give 64"),
        ("not_empty", "is not empty"),
        ("nan", "--multiplier"),
        ("same_folder", "the source model's folder"),
        ("quantized", "quantized down projections"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    sharded: tuple[Path, Path], tmp_path: Path, case: str, expected: str
) -> None:
    source, circuit = sharded
    out, m = tmp_path / "out", "2"
    args: list[str] = []
    if case == "fingerprint":
        circuit = _circuit_with(tmp_path / "c.json", circuit, **{"model.fingerprint": "0" * 64})
    elif case == "layers":
        circuit = _circuit_with(tmp_path / "c.json", circuit, **{"model.n_layers": 5})
    elif case == "width":
        circuit = _circuit_with(tmp_path / "c.json", circuit, **{"model.intermediate_size": 128})
    elif case == "not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "nan":
        m = "nan"
    elif case == "same_folder":
        out = source
    elif case == "quantized":
        import shutil

        from safetensors.torch import save_file

        model = tmp_path / "quant"
        shutil.copytree(source, model)
        save_file({"model.layers.1.mlp.down_proj.weight_scale_inv": torch.ones(1)}, model / "extra.safetensors")
        args = ["--model", str(model)]
    before = snapshot(tmp_path), snapshot(source)
    code, output = invoke("--circuit", str(circuit), "--multiplier", m, "--out", str(out), *args)
    assert code == 2, output
    assert expected in output
    assert (snapshot(tmp_path), snapshot(source)) == before


def test_inspect_shows_a_bakes_provenance(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    source, circuit = sharded
    out = tmp_path / "out"
    assert invoke("--circuit", str(circuit), "--multiplier", "0.5", "--out", str(out))[0] == 0
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert f"circuit refusal v1 ({circuit}) at M = 0.5" in result.output
    assert f"source: {source}" in result.output and f"{len(PAIRS)} neurons = {len(PAIRS)} columns" in result.output
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    assert doc["schema"] == "cna-bake/1" and doc["problems"] == []

    shard = sorted(out.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-4])  # a damaged copy of the checkpoint
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 1 and f"problem: {shard.name}" in result.output

    (out / "cna-bake.json").unlink()
    (out / ".cna-bake-partial").mkdir()
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 1 and "unfinished bake" in result.output


def test_bake_killed_in_its_first_file_is_resumed(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single-file checkpoint: the run dies before any file is finished, and the re-run still knows the folder."""
    circuit = write_circuit(tmp_path / "c.json", tiny_llama, PAIRS, 4, 64)
    out = tmp_path / "out"

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "transformed", dies)
    with pytest.raises(KeyboardInterrupt):
        from cna_dist.commands import bake as command

        command.run(str(circuit), 2.0, str(out))
    monkeypatch.undo()
    assert (out / "model.safetensors.cna-partial").exists() and not (out / "model.safetensors").exists()
    code, output = invoke("--circuit", str(circuit), "--multiplier", "2", "--out", str(out))
    assert code == 0, output
    assert "rewrote 1 weight files" in output and not (out / "model.safetensors.cna-partial").exists()
