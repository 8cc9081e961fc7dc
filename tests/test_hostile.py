"""Hostile input through the CLI: every case exits 2 naming the file, field and value, and writes nothing.

Only what tests/test_manifest.py, test_validate.py, test_prompts.py, test_checkpoint.py, test_circuit.py and
test_corruption.py do not already cover: path traversal through names and slugs, YAML bombs, non-numbers where
numbers go, binary and deeply nested input files, a prompt longer than the model takes, broken weights, a tokenizer
with nothing to pad with, and circuits that name neurons the model lacks or hold NaN.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from cna_dist.cli import main
from tests.conftest import snapshot


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(workspace: Path, command: str, *needles: str, extra: tuple[str, ...] = ()) -> Result:
    """Run `command MANIFEST`: exit 2, every needle in the message, not a byte written under the workspace."""
    before = snapshot(workspace.parent)
    args = [command, workspace, *(["--in-process", "--quiet"] if command == "mine" else []), *extra]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    assert snapshot(workspace.parent) == before
    return result


def edit(workspace: Path, change: Callable[[dict], object]) -> None:
    data = yaml.safe_load(workspace.read_text())
    change(data)
    workspace.write_text(yaml.safe_dump(data))


# -- the manifest -------------------------------------------------------------------------------------------------

NUMBERS = [
    # (id, change, field, value as the message shows it)
    ("name-dotdot", lambda d: d.update(name=".."), "name", "'..'"),
    ("name-dot", lambda d: d.update(name="."), "name", "'.'"),
    ("name-hidden", lambda d: d.update(name=".refusal"), "name", "'.refusal'"),
    ("name-too-long", lambda d: d.update(name="a" * 300), "name", "at most 100"),
    ("top-k-true", lambda d: d["select"].update(top_k=True), "select.top_k", "got true"),
    ("top-k-zero", lambda d: d["select"].update(top_k=0), "select.top_k", "got 0"),
    ("threshold-true", lambda d: d["universal"].update(threshold=True), "universal.threshold", "got true"),
    ("exclude-true", lambda d: d["select"].update(exclude_layers=[True]), "select.exclude_layers", "got true"),
    ("batch-zero", lambda d: d.update(capture={"max_batch_size": 0}), "capture.max_batch_size", "got 0"),
    ("batch-negative", lambda d: d.update(capture={"max_batch_size": -8}), "capture.max_batch_size", "got -8"),
    ("batch-true", lambda d: d.update(capture={"max_batch_size": True}), "capture.max_batch_size", "got true"),
    ("budget-zero", lambda d: d.update(capture={"token_budget": 0}), "capture.token_budget", "got 0"),
    ("budget-fraction", lambda d: d.update(capture={"token_budget": 100.5}), "capture.token_budget", "100.5"),
    ("shard-rows-zero", lambda d: d.update(capture={"shard_rows": 0}), "capture.shard_rows", "got 0"),
    ("limit-zero", lambda d: d["prompts"]["positive"].update(limit=0), "prompts.positive.limit", "got 0"),
    ("eval-batch-zero", lambda d: d.update(eval={"max_batch_size": 0}), "eval.max_batch_size", "got 0"),
    ("multiplier-nan", lambda d: d.update(eval={"multipliers": [0.0, float("nan")]}), "eval.multipliers", "nan"),
    ("multiplier-inf", lambda d: d.update(eval={"multipliers": [float("inf")]}), "eval.multipliers", "inf"),
    ("gpus-negative", lambda d: d["model"].update(gpus_per_replica=-1), "model.gpus_per_replica", "got -1"),
]


@pytest.mark.parametrize("change,field,value", [n[1:] for n in NUMBERS], ids=[n[0] for n in NUMBERS])
@pytest.mark.parametrize("command", ["validate", "mine"])
def test_names_and_sizes_out_of_bounds(workspace: Path, command: str, change, field: str, value: str) -> None:
    edit(workspace, change)
    refused(workspace, command, str(workspace), field, value)


def laughs(levels: int) -> str:
    """The "billion laughs" document: 9 aliases per level, 9**levels strings once expanded."""
    lines = ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


BOMBS = [
    # an alias bomb in an unknown key, a known key and an error message's value: each would hang or run out of memory
    ("laughs-unknown-key", lambda m: m + laughs(9), "aliases are expanded"),
    ("laughs-in-name", lambda m: laughs(9) + m.replace("name: refusal", "name: *l9"), "aliases are expanded"),
    ("laughs-in-options", lambda m: laughs(9) + m + "  storage_options: {x: *l9}\n", "aliases are expanded"),
    ("cyclic-alias", lambda m: m.replace("name: refusal", "name: &a [*a]"), "cyclic"),
    ("deep-nesting", lambda m: m + "deep: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
    ("over-a-mebibyte", lambda m: m + "# " + "x" * (1 << 20) + "\n", "over the 1048576"),
]


@pytest.mark.parametrize("bomb,needle", [b[1:] for b in BOMBS], ids=[b[0] for b in BOMBS])
@pytest.mark.parametrize("command", ["validate", "mine"])
def test_yaml_bombs_are_refused_in_moments(workspace: Path, command: str, bomb, needle: str) -> None:
    workspace.write_text(bomb(workspace.read_text()))
    t0 = time.perf_counter()
    refused(workspace, command, str(workspace), needle)
    assert time.perf_counter() - t0 < 20  # expanded, 9**9 strings would take minutes and gigabytes


def test_a_few_aliases_are_fine(workspace: Path) -> None:
    workspace.write_text(
        workspace.read_text().replace("output:\n", "x-opts: &opts {}\noutput:\n  storage_options: *opts\n")
    )
    refused(workspace, "validate", "x-opts", "unknown key")  # the anchor's own key is unknown, nothing else
    workspace.write_text(workspace.read_text().replace("x-opts: &opts {}\n", "").replace("*opts", "{}"))
    assert cli("validate", workspace).exit_code == 0


def test_a_manifest_in_another_encoding_is_named(workspace: Path) -> None:
    workspace.write_bytes(workspace.read_text().replace("refusal", "r\xe9fusal").encode("latin-1"))
    refused(workspace, "validate", str(workspace), "not UTF-8")


def test_a_manifest_with_bom_and_crlf_is_accepted(workspace: Path) -> None:
    workspace.write_bytes(b"\xef\xbb\xbf" + workspace.read_text().replace("\n", "\r\n").encode())
    result = cli("validate", workspace)
    assert result.exit_code == 0, result.output


# -- registry paths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri,slug",
    [
        ("s3://bucket/models/..", "model"),
        ("s3://bucket/models/../", "model"),
        ("s3://bucket/.", "model"),
        ("gs://bucket/models/...hidden", "hidden"),
        ("s3://bucket/Qwen2.5-72B-Instruct/", "Qwen2.5-72B-Instruct"),
        ("/models/a b/c?d", "c-d"),
    ],
)
def test_model_slugs_never_leave_the_registry_folder(uri: str, slug: str) -> None:
    from cna_dist.circuit import registry

    assert registry.model_slug(uri) == slug
    assert registry.version_uri("/reg", "refusal", registry.model_slug(uri), 1).startswith("/reg/refusal/")


# -- prompt files ---------------------------------------------------------------------------------------------


def test_a_binary_prompt_file_is_named_through_mine(workspace: Path) -> None:
    (workspace.parent / "prompts" / "harmful.jsonl").write_bytes(b'"fine"\n"\xff\xfe broken"\n')
    refused(workspace, "mine", "harmful.jsonl", "not UTF-8")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_deeply_nested_prompt_file_is_named(workspace: Path, suffix: str) -> None:
    path = workspace.parent / "prompts" / f"deep{suffix}"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    edit(workspace, lambda d: d["prompts"]["positive"].update(uri=f"./prompts/deep{suffix}"))
    refused(workspace, "mine", f"deep{suffix}", "nested too deeply")


def test_bom_and_crlf_prompt_files_mine_the_same_circuit(workspace: Path, tmp_path: Path) -> None:
    """Windows-edited prompt files are the same prompts: the rows (hashes of rendered prompts) are shared."""
    first = cli("mine", workspace, "--in-process", "--quiet")
    assert first.exit_code == 0, first.output
    for name in ("harmful", "harmless", "diverse"):
        path = workspace.parent / "prompts" / f"{name}.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    second = cli("mine", workspace, "--in-process", "--quiet", "--summary", tmp_path / "s.json")
    assert second.exit_code == 0, second.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["prompts_captured"] == 0  # every row reused
    neurons = [json.loads(Path(r.output.strip().splitlines()[-1]).read_text())["neurons"] for r in (first, second)]
    assert neurons[0] == neurons[1]


# -- the checkpoint -------------------------------------------------------------------------------------------


@pytest.fixture
def own_model(workspace: Path, tiny_llama: Path) -> Path:
    """A copy of the tiny model the workspace's manifest points at, to damage."""
    link = workspace.parent / "models" / "tiny-instruct"
    link.unlink()
    shutil.copytree(tiny_llama, link)
    return link


def rewrite_weights(model: Path, change: Callable[[dict], object]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    change(tensors)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def test_a_huge_single_line_prompt_is_refused_before_capture(workspace: Path, own_model: Path) -> None:
    config = json.loads((own_model / "tokenizer_config.json").read_text())
    (own_model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 512}))
    (workspace.parent / "prompts" / "huge.txt").write_text("how do i build a bomb " * 50_000)  # one line, no newline
    edit(workspace, lambda d: d["prompts"]["positive"].update(uri="./prompts/huge.txt"))
    refused(workspace, "mine", "huge.txt", "prompts.positive", "prompt 1 of 1 has", "model_max_length 512")


CHECKPOINTS = [
    ("truncated", lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:-100]),
     ["model.safetensors", "truncated"]),
    ("header-cut", lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:40]),
     ["model.safetensors", "truncated"]),
    ("missing-tensor", lambda m: rewrite_weights(m, lambda t: t.pop("model.layers.2.mlp.down_proj.weight")),
     ["model.uri", "lacks 1 tensor", "model.layers.2.mlp.down_proj.weight", "random values"]),
    ("wrong-shape", lambda m: rewrite_weights(
        m, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"][:32]})),
     ["model.safetensors", "model.layers.1.mlp.up_proj.weight", "[32, 32]", "[64, 32]"]),
    ("not-safetensors", lambda m: (m / "model.safetensors").write_text("<html>Access denied</html>"),
     ["model.safetensors", "does not fit"]),
    ("config-unbuildable", lambda m: (m / "config.json").write_text(
        json.dumps({**json.loads((m / "config.json").read_text()), "hidden_act": "no-such-activation"})),
     ["model.uri", "describes no model", "no-such-activation"]),
]  # fmt: skip


@pytest.mark.parametrize("damage,needles", [c[1:] for c in CHECKPOINTS], ids=[c[0] for c in CHECKPOINTS])
@pytest.mark.parametrize("command", ["validate", "mine"])
def test_broken_weights_are_named_before_anything_loads(
    workspace: Path, own_model: Path, command: str, damage, needles: list[str]
) -> None:
    damage(own_model)
    refused(workspace, command, *needles)


def test_a_tokenizer_with_nothing_to_pad_with_is_named(workspace: Path, own_model: Path) -> None:
    tok = json.loads((own_model / "tokenizer_config.json").read_text())
    tok.update(pad_token=None, eos_token=None, unk_token=None)
    (own_model / "tokenizer_config.json").write_text(json.dumps(tok))
    refused(workspace, "mine", str(own_model), "no pad, eos or unk token")


# -- circuit files given to steer and eval ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The planted demo model's manifest (with eval prompts) and its mined circuit."""
    from cna_dist.commands.demo import write_inputs

    manifest, _ = write_inputs(tmp_path_factory.mktemp("hostile-eval"))
    result = cli("mine", manifest, "--quiet", "--in-process")
    assert result.exit_code == 0, result.output
    return manifest, Path(result.output.strip().splitlines()[-1])


def edited(circuit: Path, change: Callable[[dict], object], out: Path) -> Path:
    data = json.loads(circuit.read_text())
    change(data)
    out.write_text(json.dumps(data))
    return out


CIRCUITS = [
    ("layer-beyond", lambda d: d["neurons"][0].update(layer=99), ["neurons.0", "L99", "outside the model"]),
    ("neuron-beyond", lambda d: d["neurons"][0].update(neuron=10**6), ["neurons.0", "N1000000", "outside the model"]),
    ("nan-delta", lambda d: d["neurons"][0].update(delta=float("nan")), ["neurons.0.delta", "finite", "nan"]),
    ("inf-mean", lambda d: d["neurons"][1].update(mean_pos=float("inf")), ["neurons.1.mean_pos", "finite"]),
    ("duplicate", lambda d: d["neurons"].append(dict(d["neurons"][0])), ["listed twice"]),
    ("layer-as-text", lambda d: d["neurons"][0].update(layer="3"), ["neurons.0.layer", "'3'"]),
    ("name-traversal", lambda d: d.update(name="../../etc"), ["name", "'../../etc'"]),
    ("universal-beyond", lambda d: d.update(universal=[[50, 0]]), ["universal neuron [50, 0]"]),
]


@pytest.mark.parametrize("change,needles", [c[1:] for c in CIRCUITS], ids=[c[0] for c in CIRCUITS])
@pytest.mark.parametrize("command", ["steer", "eval"])
def test_circuits_naming_what_the_model_lacks_or_holding_nan(
    mined: tuple[Path, Path], tmp_path: Path, command: str, change, needles: list[str]
) -> None:
    manifest, circuit = mined
    bad = edited(circuit, change, tmp_path / "bad.json")
    args = {
        "steer": ["steer", "--model", manifest.parent / "model", "--circuit", bad, "hello"],
        "eval": ["eval", manifest, "--circuit", bad, "--out", tmp_path / "ev", "--in-process", "--quiet"],
    }[command]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    for needle in [str(bad), *needles]:
        assert needle in result.output, (needle, result.output)
    assert not (tmp_path / "ev").exists()


def test_steer_refuses_a_circuit_whose_model_shape_was_edited(mined: tuple[Path, Path], tmp_path: Path) -> None:
    """Neurons inside the shape the file claims, but the file claims more layers than the model has."""
    manifest, circuit = mined

    def grow(d: dict) -> None:
        d["model"]["n_layers"] = 40
        d["neurons"][0]["layer"] = 30

    bad = edited(circuit, grow, tmp_path / "grown.json")
    result = cli("steer", "--model", manifest.parent / "model", "--circuit", bad, "hello")
    assert result.exit_code == 2 and str(bad) in result.output and "model.n_layers: 40" in result.output, result.output


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_multipliers_are_refused(mined: tuple[Path, Path], tmp_path: Path, value: str) -> None:
    manifest, circuit = mined
    steer = cli("steer", "--model", manifest.parent / "model", "--circuit", circuit, "--multiplier", value, "hi")
    assert steer.exit_code == 2 and "--multiplier" in steer.output and value in steer.output, steer.output
    ev = cli("eval", manifest, "--circuit", circuit, "--multipliers", f"0,{value}", "--out", tmp_path / "ev")
    assert ev.exit_code == 2 and "--multipliers" in ev.output and value in ev.output, ev.output
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize(
    "text,needle",
    [(laughs(9) + "manifests: *l9\n", "aliases are expanded"), ("manifests: &a [*a]\n", "cyclic")],
    ids=["laughs", "cyclic"],
)
def test_a_nightly_list_bomb_is_refused_in_moments(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "nightly.yaml").write_text(text)
    t0 = time.perf_counter()
    result = cli("nightly", tmp_path / "nightly.yaml", "--report", tmp_path / "report.json", "--in-process")
    assert result.exit_code == 2 and needle in result.output and "nightly.yaml" in result.output, result.output
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b"])
def test_import_ref_refuses_a_name_that_is_not_a_slug(tmp_path: Path, tiny_llama: Path, name: str) -> None:
    (tmp_path / "ref.json").write_text(json.dumps({"neurons": {"2,-1,5": 1.5}}))
    result = cli(
        "import-ref", tmp_path / "ref.json", "--name", name, "--model", tiny_llama, "--out", tmp_path / "c.json"
    )
    assert result.exit_code == 2 and "--name" in result.output and repr(name) in result.output, result.output
    assert not (tmp_path / "c.json").exists()
