"""Mixture-of-experts models on the pipeline and stream engines: rows bit-identical to single-device capture.

Those engines build decoder layers from config and fill them straight from the checkpoint's safetensors, while
transformers 5 builds fused expert parameters (`mlp.experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) that
released checkpoints and `save_pretrained` keep one tensor per expert. A stage must assemble them exactly as
transformers' own loader does, read only its own layers' tensors, run the experts implementation the full model
runs and record with the MoE recorder; then every row equals single-device capture bit for bit (float32,
torch.equal / np.array_equal), which equals the independent oracle (tests/test_moe_families.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import torch
import transformers
from click.testing import CliRunner

from cna_dist.capture import hf
from cna_dist.capture.pipeline import PipelineBackend
from cna_dist.capture.stage import load_stage, stage_config
from cna_dist.capture.stream import StreamBackend
from cna_dist.cli import main
from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import DEFAULT_WORDS
from cna_dist.model.moe import MoeLastTokenRows
from tests.test_engine_contract import N_LAYERS, SPLIT, pipeline_rows, single_rows, stream_rows
from tests.test_families import _workspace, prompts
from tests.test_moe_families import LIMITS, MOE, build
from tests.test_stage import Recorder


@pytest.fixture(scope="module", params=sorted(MOE))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A per-expert checkpoint of the family (as save_pretrained writes it), prompts and single-device rows."""
    path = build(request.param, tmp_path_factory.mktemp(request.param) / "model", num_hidden_layers=N_LAYERS)
    token_ids = prompts(len(build_tokenizer(DEFAULT_WORDS)))
    return {"type": request.param, "path": path, "ids": token_ids, "single": single_rows(path, token_ids)}


def test_the_checkpoint_holds_one_tensor_per_expert(family: dict[str, Any]) -> None:
    """What the stages must assemble: no fused expert tensor on disk."""
    with safetensors.safe_open(str(family["path"] / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert not any(name.endswith(("gate_up_proj", "experts.down_proj")) for name in names)
    part = "w2" if family["type"] == "mixtral" else "down_proj"
    experts = [
        n for n in names if n.startswith("model.layers.1.") and ".experts." in n and n.endswith(f".{part}.weight")
    ]
    assert len(experts) == 4


def test_pipeline_workers_record_with_the_moe_recorder(family: dict[str, Any]) -> None:
    """Rows bit-identical to single-device on every engine: tests/test_engine_contract.py; here, which recorder."""
    backend = PipelineBackend.load(family["path"], SPLIT, dtype="float32", gpus=0)
    try:
        assert all(isinstance(worker.rows, MoeLastTokenRows) for worker in backend.workers)
    finally:
        backend.close()


def test_stage_tensors_equal_the_loaded_model(family: dict[str, Any]) -> None:
    """Every parameter of a stage, fused experts included, equals transformers' own loading of the checkpoint; the
    stage runs the experts implementation the full model runs."""
    model, _ = hf.load(family["path"], dtype="float32")
    stage = load_stage(family["path"], 1, 3)
    assert stage.config._experts_implementation == model.config._experts_implementation == "grouped_mm"
    theirs = {f"layers.{k}.{name}": value for k in (1, 2) for name, value in model.model.layers[k].state_dict().items()}
    ours = {
        f"layers.{1 + int(name.split('.')[1])}.{name.split('.', 2)[2]}": v for name, v in stage.state_dict().items()
    }
    assert ours.keys() == theirs.keys()
    assert any(name.endswith("experts.gate_up_proj") for name in ours)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


def test_a_stage_reads_only_its_layers_tensors(family: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each per-expert tensor of layer 1 once, nothing of another layer: the stream engine's memory bound."""
    with safetensors.safe_open(str(family["path"] / "model.safetensors"), framework="pt") as handle:
        expected = sorted(name for name in handle.keys() if name.startswith("model.layers.1."))
    recorder = Recorder(monkeypatch)
    load_stage(family["path"], 1, 2)
    assert sorted(recorder.keys) == expected and recorder.files == ["model.safetensors"]


def fused_copy(path: Path, out: Path) -> Path:
    """The same model saved by transformers 5 without converting back to the original format: fused experts."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.save_pretrained(out, save_original_format=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).write_bytes((path / name).read_bytes())
    return out


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_fused_checkpoints_load_as_saved(model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint holding the fused tensors (Mixtral's under mlp.*, not block_sparse_moe.*) fills the stage from
    them as they are, and its stream rows equal single-device rows of the per-expert original."""
    original = build(model_type, tmp_path / "original", num_hidden_layers=N_LAYERS)
    fused = fused_copy(original, tmp_path / "fused")
    with safetensors.safe_open(str(fused / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= names
    assert not any(".experts.0." in name or "block_sparse_moe" in name for name in names)
    manifest = _workspace(tmp_path / "ws", fused)
    manifest.write_text(manifest.read_text().replace("top_k: 40", "top_k: 8"))  # 1 candidate layer of 32 (mixtral)
    validated = CliRunner().invoke(main, ["validate", str(manifest)])
    assert validated.exit_code == 0, validated.output  # the weight check takes fused experts as they are
    recorder = Recorder(monkeypatch)
    stage = load_stage(fused, 1, 2)
    assert sorted(recorder.keys) == sorted(name for name in names if name.startswith("model.layers.1."))
    monkeypatch.undo()
    reference = load_stage(original, 1, 2).state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in stage.state_dict().items())
    token_ids = prompts(len(build_tokenizer(DEFAULT_WORDS)), n=5)
    assert np.array_equal(stream_rows(fused, token_ids), single_rows(original, token_ids))


def test_sharded_checkpoint_with_experts_over_several_files(tmp_path: Path) -> None:
    """A layer's experts split over shards: each piece comes from the file the weight_map names."""
    original = build("qwen3_moe", tmp_path / "original", num_hidden_layers=N_LAYERS)
    model = transformers.AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="4KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (sharded / name).write_bytes((original / name).read_bytes())
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    layer1 = {file for name, file in weight_map.items() if name.startswith("model.layers.1.mlp.experts.")}
    assert len(layer1) >= 2 and "model.layers.1.mlp.experts.3.up_proj.weight" in weight_map
    token_ids = prompts(len(build_tokenizer(DEFAULT_WORDS)), n=5)
    assert np.array_equal(pipeline_rows(sharded, token_ids), single_rows(original, token_ids))


def test_a_missing_expert_tensor_is_bad_input_naming_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from cna_dist.errors import BadInput

    path = build("olmoe", tmp_path / "model", num_hidden_layers=N_LAYERS)
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    del tensors[key]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match=rf"model\.safetensors: tensor '{key}' is missing"):
        load_stage(path, 2, 3)
    load_stage(path, 0, 2)  # a stage that does not need it never notices


def test_stage_config_runs_the_models_experts_implementation(tmp_path: Path) -> None:
    """A config that asks for an implementation keeps it; otherwise the one from_pretrained picks."""
    path = build("olmoe", tmp_path / "model", num_hidden_layers=1)
    assert stage_config(path)._experts_implementation == "grouped_mm"
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"experts_implementation": "batched_mm"}))
    model, _ = hf.load(path, dtype="float32")
    assert stage_config(path)._experts_implementation == model.config._experts_implementation == "batched_mm"


def engines_of(manifest: Path) -> set[str]:
    """The engines the run's committed shards say made their rows."""
    from cna_dist import manifest as manifestmod
    from cna_dist.store.activations import ActivationStore

    store = ActivationStore(manifestmod.load(manifest).output.store)
    markers = store.open_run(store.load_meta(store.runs()[0]), create=False).markers().values()
    return {m["made_by"]["engine"] for m in markers}


def test_stream_rows_need_the_models_experts_implementation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a width where HF's eager experts loop rounds differently from grouped_mm (hidden 128, 8 experts of 64),
    stream rows are bit-identical because the stage runs grouped_mm as the loaded model does; forced to eager, the
    same stages give rows that are close but not equal (so the test above would notice a wrong choice)."""
    from cna_dist.capture import stage as stagemod

    path = build(
        "qwen3_moe", tmp_path / "model", hidden_size=128, moe_intermediate_size=64, num_experts=8, num_hidden_layers=3
    )
    token_ids = prompts(len(build_tokenizer(DEFAULT_WORDS)), n=5)
    single = single_rows(path, token_ids)
    assert np.array_equal(stream_rows(path, token_ids), single)
    monkeypatch.setattr(stagemod, "_experts_implementation", lambda fam, config: "eager")
    eager = stream_rows(path, token_ids)
    assert not np.array_equal(eager, single)
    np.testing.assert_allclose(eager, single, rtol=1e-4, atol=1e-4 * np.abs(single).max())


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_bfloat16_stage_rows_equal_single_device(model_type: str, tmp_path: Path) -> None:
    """The float32 checkpoint converted to bfloat16 while loading: per-expert pieces converted one by one give the
    same fused weights as transformers' conversion, and the same rows on both stage engines."""
    path = build(model_type, tmp_path / "model", num_hidden_layers=N_LAYERS)
    token_ids = prompts(len(build_tokenizer(DEFAULT_WORDS)), n=5)
    backend = hf.HFBackend.load(path, dtype="bfloat16", trust_remote_code=False)
    try:
        [(_, _, single)], _ = backend.capture_parts(token_ids, "float32", LIMITS)
    finally:
        backend.close()
    pipeline = PipelineBackend.load(path, SPLIT, dtype="bfloat16", gpus=0)
    stream = StreamBackend.load(path, dtype="bfloat16", gpus=0)
    try:
        parts, _ = pipeline.capture_parts(token_ids, "float32", LIMITS)
        [(_, _, streamed)], _ = stream.capture_parts(token_ids, "float32", LIMITS)
    finally:
        pipeline.close()
        stream.close()
    assert np.array_equal(np.concatenate([rows for _, _, rows in parts], axis=1), single)
    assert np.array_equal(streamed, single)


def _mine(manifest: Path) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["mine", str(manifest), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    return json.loads(Path(result.stdout.strip().splitlines()[-1]).read_text())


def test_mine_on_the_stream_engine_equals_single_device(tmp_path: Path) -> None:
    """`cna-dist mine --in-process` with `model.engine: stream` on Qwen2-MoE (routed and shared experts): the same
    circuit, neurons, deltas and means as the single-device engine, bit for bit in a float32 store."""
    path = build("qwen2_moe", tmp_path / "model", num_hidden_layers=4)
    circuits = {}
    for engine in ("auto", "stream"):
        manifest = _workspace(tmp_path / engine, path)
        text = manifest.read_text().replace("  diverse: {uri: ./prompts/diverse.jsonl}", "")
        text = text.replace("  uri: ./models/tiny-instruct", f"  uri: ./models/tiny-instruct\n  engine: {engine}")
        manifest.write_text(text + "capture: {dtype: float32}\n")
        circuits[engine] = _mine(manifest)
        assert engines_of(manifest) == {"single" if engine == "auto" else engine}
    single, stream = circuits["auto"], circuits["stream"]
    assert stream["model"]["intermediate_size"] == 4 * 8 + 12  # E x I + the shared expert
    assert len(stream["neurons"]) == 40 and stream["neurons"] == single["neurons"]
