"""`bake`: the baked checkpoint, loaded by plain transformers, equals the hook-steered source at M.

Exactly (torch.equal logits, same greedy tokens) for M in {0, 0.5, 2} in float32 and bfloat16, where scaling the
weight column and scaling the neuron commute with rounding; within the dtype's tolerance for M = 0.3. One tiny
random model per dense family, built from its transformers config class; the steering oracle is
`cna_dist.steer.hooks.steered` (forward pre-hooks on every layer's mlp.down_proj).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

from cna_dist.circuit import file as circuitmod
from cna_dist.cli import main
from cna_dist.demo.models import save_checkpoint
from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import DEFAULT_WORDS
from cna_dist.model import checkpoint
from cna_dist.steer import hooks as steer

N_LAYERS, HIDDEN, INTER = 3, 32, 24
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {}),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, {}),
}
# (layer, neuron): layer 0 too, several per layer, the first and last columns
PAIRS = [(0, 0), (0, INTER - 1), (1, 5), (1, 6), (1, 17), (2, 3)]


def save_family(path: Path, family: str, seed: int) -> Path:
    """A seeded random checkpoint of `family` (std 0.15 so that prompts differ visibly; norms left as built)."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    tok = build_tokenizer(DEFAULT_WORDS)
    config = cfg_cls(
        vocab_size=len(tok),
        intermediate_size=INTER,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **COMMON,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    save_checkpoint(model.eval(), tok, path)
    return path


def write_circuit(path: Path, model: Path, pairs: list[tuple[int, int]], n_layers: int, width: int) -> Path:
    """A circuit of `pairs` on the checkpoint at `model` (its real fingerprint), saved as version 1."""
    config = json.loads((model / "config.json").read_text())
    ref = circuitmod.ModelRef(
        uri=str(model),
        architecture=config["architectures"][0],
        n_layers=n_layers,
        intermediate_size=width,
        fingerprint=checkpoint.fingerprint(str(model)),
    )
    delta = np.zeros((n_layers, width))
    for rank, (layer, neuron) in enumerate(pairs):
        delta[layer, neuron] = len(pairs) - rank
    c = circuitmod.build(
        name="refusal",
        model=ref,
        params={"k": len(pairs)},
        prompts={"positive": circuitmod.PromptRef(uri="/p.jsonl", sha256="a" * 64, count=1)},
        delta=delta,
        mean_pos=delta,
        mean_neg=np.zeros_like(delta),
        selected=np.array([a * width + b for a, b in pairs], dtype=np.int64),
        universal=None,
        displaced=np.empty(0, np.int64),
        run="r1",
        store=None,
    )
    c.version = 1
    path.write_text(c.to_json())
    return path


def bake(circuit: Path, m: float, out: Path, *extra: str) -> None:
    result = CliRunner().invoke(
        main, ["bake", "--circuit", str(circuit), "--multiplier", str(m), "--out", str(out), *extra]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)


def load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def assert_within_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to a few units in the last place of the largest logit, in the logits' dtype."""
    tol = 8 * torch.finfo(want.dtype).eps * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


PROMPT = torch.tensor([[1, 7, 30, 41, 52, 63, 74, 85, 96, 12]])


@torch.no_grad()
def outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(PROMPT).logits
    tokens = model.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("bake-families")
    out = {}
    for i, family in enumerate(FAMILIES):
        model = save_family(root / family, family, seed=10 + i)
        out[family] = (model, write_circuit(root / f"{family}.json", model, PAIRS, N_LAYERS, INTER))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_baked_equals_steered(family: str, family_models: dict, tmp_path: Path) -> None:
    source, circuit = family_models[family]
    multipliers = (0.0, 0.5, 2.0, 0.3)
    for m in multipliers:
        bake(circuit, m, tmp_path / f"m{m}")
    for dtype in (torch.float32, torch.bfloat16):
        model = load(source, dtype)
        with torch.no_grad():
            plain = model(PROMPT).logits
        for m in multipliers:
            with steer.steered(model, PAIRS, m):
                want_logits, want_tokens = outputs(model)
            assert not torch.equal(plain, want_logits), "the circuit must change the logits"
            got_logits, got_tokens = outputs(load(tmp_path / f"m{m}", dtype))
            if m != 0.3:
                assert torch.equal(got_logits, want_logits), (family, m, dtype)
                assert torch.equal(got_tokens, want_tokens), (family, m, dtype)
            else:
                assert_within_rounding(got_logits, want_logits)


def test_only_circuit_columns_change(family_models: dict, tmp_path: Path) -> None:
    """Every tensor but the down projections is byte-identical; those differ exactly in the circuit's columns."""
    source, circuit = family_models["llama"]
    out = tmp_path / "baked"
    bake(circuit, 0.5, out)
    with safe_open(source / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            x, y = a.get_tensor(name), b.get_tensor(name)
            layer = int(name.split(".")[2]) if name.endswith("mlp.down_proj.weight") else None
            cols = [n for lay, n in PAIRS if lay == layer]
            expected = x.clone()
            if cols:
                expected[:, cols] *= 0.5
            assert torch.equal(y, expected), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    rec = json.loads((out / "cna-bake.json").read_text())
    assert rec["schema"] == "cna-bake/1" and rec["multiplier"] == 0.5 and rec["circuit"]["version"] == 1
    assert rec["source"]["fingerprint"] == checkpoint.fingerprint(str(source))
    assert sum(rec["changed_tensors"].values()) == len(PAIRS)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "tags:\n- cna-dist" in card
    assert str(circuit) in card and "M = 0.5" in card and rec["source"]["fingerprint"] in card
    assert not (out / ".cna-bake-partial").exists()
    assert not list(out.glob("*.cna-partial"))
