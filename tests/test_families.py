"""Every dense family cna-dist knows: single-device rows equal an independent oracle, steering equals scaled weights.

For each family cna-dist knows, a tiny random model is built from transformers' own config class (3 layers,
hidden 32, sliding windows narrower than the prompts, soft-capping where the config has it, mixed layer types,
Gemma 3's sliding_window_pattern and two rotary bases, SmolLM3's layers without rotary, Granite's multipliers,
Llama 3 rope scaling), saved with save_pretrained and loaded through the project's own path. The oracle is HF's
own full forward with eager attention, one prompt at a time, unpadded, hooking the input of each layer's
mlp.down_proj at the last token. Single-device rows equal it in float32 to 1e-5 relative (and 1e-5 of the rows'
largest magnitude absolute, for values that cancel near zero), batched and padded (every other engine equals
single-device bit for bit: tests/test_engine_contract.py); steering at m = 1 is bit-identical to none, m = 0 and
m = 2 equal the same model with those down_proj columns scaled in its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from cna_dist.capture import hf
from cna_dist.demo.models import save_checkpoint
from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import DEFAULT_WORDS
from cna_dist.model import arch
from cna_dist.prompts.batching import Limits
from cna_dist.steer import hooks as steer

WINDOW = 4  # every prompt below is longer than this: sliding layers mask for real
LIMITS = Limits(token_budget=40, max_batch_size=4)  # several padded batches of mixed lengths
_SIZES = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4}
_SIZES |= {"num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128}
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0}
_LLAMA3 |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 8}
_SLIDING_QWEN = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}

# model_type -> (config class, family-specific settings)
FAMILIES: dict[str, tuple[type, dict[str, Any]]] = {
    "llama": (transformers.LlamaConfig, {"rope_parameters": _LLAMA3}),
    "qwen2": (transformers.Qwen2Config, _SLIDING_QWEN),
    "qwen3": (transformers.Qwen3Config, _SLIDING_QWEN),
    "mistral": (transformers.MistralConfig, {"sliding_window": WINDOW}),
    "gemma2": (
        transformers.Gemma2Config,
        {"sliding_window": WINDOW, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    ),
    "gemma3_text": (transformers.Gemma3TextConfig, {"sliding_window": WINDOW, "sliding_window_pattern": 2}),
    "phi3": (transformers.Phi3Config, {"sliding_window": WINDOW}),
    "olmo2": (transformers.Olmo2Config, {}),
    "granite": (
        transformers.GraniteConfig,
        {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2, "logits_scaling": 2.0},
    ),
    "smollm3": (
        transformers.SmolLM3Config,
        {"no_rope_layers": [1, 0, 1], "use_sliding_window": True, "sliding_window": WINDOW},
    ),
}


def test_every_family_cna_dist_knows_is_tested_here() -> None:
    assert sorted(FAMILIES) == sorted(
        set(arch.known()) - arch.MOE
    )  # MoE: tests/test_moe_families.py, test_moe_engines.py


def build(model_type: str, path: Path) -> Path:
    """A seeded random checkpoint of the family: weights drawn with std 0.15 (not HF's 0.02) so rows differ
    visibly between prompts; norm weights keep the family's own initial values."""
    tok = build_tokenizer(DEFAULT_WORDS)
    cls, extra = FAMILIES[model_type]
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = cls(vocab_size=len(tok), tie_word_embeddings=False, **_SIZES, **ids, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32)
    gen = torch.Generator().manual_seed(sum(map(ord, model_type)))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    save_checkpoint(model, tok, path)
    return path


def prompts(vocab: int, n: int = 9, seed: int = 0) -> list[list[int]]:
    """Ragged prompts, all longer than the sliding window (lengths 5 to 13), from real token ids (no pad id 0)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(WINDOW + 1, 14))).tolist() for _ in range(n)]


def oracle(path: Path, token_ids: list[list[int]]) -> np.ndarray:
    """HF's own forward, eager attention, one unpadded prompt at a time: mlp.down_proj's input at the last token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    layers = model.model.layers
    rows = np.zeros((len(token_ids), len(layers), layers[0].mlp.down_proj.in_features), dtype=np.float32)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, k=k: seen.__setitem__(k, a[0][0, -1].clone()))
        for k, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for i, ids in enumerate(token_ids):
            model(input_ids=torch.tensor([ids]))
            rows[i] = torch.stack([seen[k] for k in range(len(layers))]).numpy()
    for hook in hooks:
        hook.remove()
    return rows


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One family's checkpoint, prompts, single-device rows (the project's path) and the oracle's rows."""
    model_type = request.param
    path = build(model_type, tmp_path_factory.mktemp(model_type))
    backend = hf.HFBackend.load(path, dtype="float32", trust_remote_code=False)
    token_ids = prompts(backend.model.config.vocab_size)
    [(lo, hi, rows)], overflow = backend.capture_parts(token_ids, "float32", LIMITS)
    backend.close()
    assert (lo, hi, overflow) == (0, 3, 0)
    return {"type": model_type, "path": path, "ids": token_ids, "single": rows, "oracle": oracle(path, token_ids)}


def test_single_device_rows_equal_the_oracle(family: dict[str, Any]) -> None:
    assert family["single"].shape == family["oracle"].shape == (9, 3, 48)
    scale = float(np.abs(family["oracle"]).max())  # 1e-5 of the rows' scale absolute, for values near zero
    np.testing.assert_allclose(family["single"], family["oracle"], rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(family["oracle"]).max() > 0.1  # rows of substance, not near-zeros that any code would match


def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_steering(family: dict[str, Any]) -> None:
    """m = 1 bit-identical to no steering (logits, and eval's steered generation through the backend); m = 0 and
    m = 2 equal the same model with those down_proj columns scaled in its weights."""
    model, tokenizer = hf.load(family["path"], dtype="float32")
    ids = family["ids"][0]
    pairs = [(0, 3), (1, 0), (1, 47), (2, 20)]
    plain = _logits(model, ids)
    with steer.steered(model, pairs, 1.0):
        assert torch.equal(_logits(model, ids), plain)
    backend = hf.HFBackend(model, tokenizer)
    try:
        texts = backend.generate(family["ids"][:3], {}, 3, LIMITS)
        assert backend.generate(family["ids"][:3], {"pairs": pairs, "multiplier": 1.0}, 3, LIMITS) == texts
    finally:
        backend.close()
    for m in (0.0, 2.0):
        with steer.steered(model, pairs, m):
            steered = _logits(model, ids)
        projs = [model.model.layers[layer].mlp.down_proj for layer, _ in pairs]
        saved = [p.weight.clone() for p in projs]
        with torch.no_grad():
            for proj, (_, neuron) in zip(projs, pairs, strict=True):
                proj.weight[:, neuron] *= m
        baked = _logits(model, ids)
        with torch.no_grad():
            for proj, weight in zip(projs, saved, strict=True):
                proj.weight.copy_(weight)
        torch.testing.assert_close(steered, baked, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(steered, plain)


def _workspace(tmp_path: Path, checkpoint: Path) -> Path:
    """The spec's minimal manifest around `checkpoint` (linked as ./models/tiny-instruct)."""
    from tests.conftest import DIVERSE, HARMFUL, HARMLESS, MINIMAL, write_jsonl

    (tmp_path / "models").mkdir(parents=True)
    (tmp_path / "models" / "tiny-instruct").symlink_to(checkpoint, target_is_directory=True)
    for name, texts in (("harmful", HARMFUL), ("harmless", HARMLESS), ("diverse", DIVERSE)):
        write_jsonl(tmp_path / "prompts" / f"{name}.jsonl", texts)
    (tmp_path / "manifest.yaml").write_text(MINIMAL)
    return tmp_path / "manifest.yaml"


def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | changes))
    return dst


def test_validate_checks_the_architecture(tmp_path: Path) -> None:
    """validate accepts a known family, and refuses (exit 2, naming model_type and the known families, writing
    nothing) an unknown one and a config the family cannot capture."""
    from click.testing import CliRunner

    from cna_dist.cli import main

    gemma = build("gemma3_text", tmp_path / "gemma")
    ok = CliRunner().invoke(main, ["validate", str(_workspace(tmp_path / "ok", gemma))])
    assert ok.exit_code == 0, ok.output
    gpt2 = _with_config(gemma, tmp_path / "gpt2", model_type="gpt2")
    refused = CliRunner().invoke(main, ["validate", str(_workspace(tmp_path / "unknown", gpt2))])
    assert refused.exit_code == 2
    assert f"unsupported model_type 'gpt2'; cna-dist knows {arch.known()}" in refused.output
    assert not (tmp_path / "unknown" / "out").exists()
    embedding = _with_config(gemma, tmp_path / "bidirectional", use_bidirectional_attention=True)
    refused = CliRunner().invoke(main, ["validate", str(_workspace(tmp_path / "embedding", embedding))])
    assert refused.exit_code == 2 and "use_bidirectional_attention is set" in refused.output
    broken = _with_config(gemma, tmp_path / "broken", layer_types=["full_attention"])
    refused = CliRunner().invoke(main, ["validate", str(_workspace(tmp_path / "types", broken))])
    assert refused.exit_code == 2 and "layer_types has 1 entries, not num_hidden_layers=3" in refused.output


@pytest.mark.parametrize("model_type, engine", [("gemma3_text", "auto"), ("qwen3", "stream")])
def test_mined_circuit_equals_an_oracle_reduce(tmp_path: Path, model_type: str, engine: str) -> None:
    """`cna-dist mine --in-process` on a non-Llama family: its circuit's neurons and deltas are the top |delta| of
    HF-forward oracle rows of the same rendered prompts (float32 store, no universal filtering)."""
    import json

    from click.testing import CliRunner

    from cna_dist.cli import main
    from cna_dist.model.checkpoint import load_tokenizer
    from cna_dist.prompts import sets as promptsmod
    from tests.conftest import HARMFUL, HARMLESS

    path = build(model_type, tmp_path / "model")
    manifest = _workspace(tmp_path / "ws", path)
    text = manifest.read_text().replace("  diverse: {uri: ./prompts/diverse.jsonl}", "")
    text = text.replace("  uri: ./models/tiny-instruct", f"  uri: ./models/tiny-instruct\n  engine: {engine}")
    manifest.write_text(text + "capture: {dtype: float32}\n")
    result = CliRunner().invoke(main, ["mine", str(manifest), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    circuit = json.loads(Path(result.stdout.strip().splitlines()[-1]).read_text())

    tok = load_tokenizer(path)
    chat = promptsmod.use_chat_template(tok, None)
    ids = {
        name: [promptsmod.encode(tok, promptsmod.render(tok, t, chat), chat) for t in texts]
        for name, texts in (("pos", HARMFUL), ("neg", HARMLESS))
    }
    delta = oracle(path, ids["pos"]).astype(np.float64).mean(0) - oracle(path, ids["neg"]).astype(np.float64).mean(0)
    want = sorted(((2, n) for n in range(delta.shape[1])), key=lambda p: (-abs(delta[p]), p))[:40]
    got = [(n["layer"], n["neuron"]) for n in circuit["neurons"]]
    assert got == want
    np.testing.assert_allclose([n["delta"] for n in circuit["neurons"]], [delta[p] for p in want], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "engine, gpus, made",
    [("auto", 0, "single"), ("device_map", 0, "single"), ("pipeline", 0, "pipeline"), ("stream", 0, "stream")],
)
def test_the_engine_registry_loads_each_engine(tmp_path: Path, engine: str, gpus: int, made: str) -> None:
    """One place picks the engine: `capture.registry.load` for the engine `engines.resolve` names, the generator only
    where the engine generates (no GPU here: device_map falls back to one device and says so in made_by)."""
    from types import SimpleNamespace

    from cna_dist.capture.registry import load

    path = build("qwen3", tmp_path / "qwen3")
    spec = SimpleNamespace(
        backend="hf",
        engine=engine,
        gpus=gpus,
        dtype="float32",
        trust_remote_code=False,
        max_memory_per_gpu=None,
        stages=2,
        hidden_budget=None,
    )
    loaded = load(spec, path)
    try:
        assert loaded.engine.made_by()["engine"] == loaded.engine.name == made
        assert loaded.engine.made_by()["backend"] == "hf"
        assert (loaded.engine.n_layers, loaded.engine.intermediate_size) == (3, 48)
        assert (loaded.generator is loaded.engine) == (made == "single") and (loaded.generator is None) == (
            made != "single"
        )
    finally:
        loaded.engine.close()
    with pytest.raises(ValueError, match="unknown capture backend 'vllm'; known: hf"):
        load(SimpleNamespace(**{**vars(spec), "backend": "vllm"}), path)
