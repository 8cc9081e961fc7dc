"""Tests for the offline tiny models: the tokenizer, random checkpoints, and the planted refusal circuit.

The planted model is CNA's ground truth, so its properties are measured here independently of CNA, with plain
forward-pre-hooks on ``mlp.down_proj`` at the last prompt token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers

from cna_dist.demo.models import save_random_model
from cna_dist.demo.planted import PlantedModel, save_planted_model
from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import ANSWER_TEXT, DEFAULT_WORDS, HARM_WORDS, REFUSAL_TEXT, demo_prompts

Neuron = tuple[int, int]


def render(tok: transformers.PreTrainedTokenizerBase, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def encode(tok: transformers.PreTrainedTokenizerBase, prompt: str) -> dict[str, torch.Tensor]:
    return dict(tok(render(tok, prompt), add_special_tokens=False, return_tensors="pt"))


@contextmanager
def scaled(model: transformers.PreTrainedModel, neurons: list[Neuron], m: float) -> Iterator[None]:
    """Multiply the given neurons' down_proj inputs by ``m`` at every position (m=0 ablates)."""
    by_layer: dict[int, list[int]] = {}
    for layer, j in neurons:
        by_layer.setdefault(layer, []).append(j)
    handles = []
    for layer, js in by_layer.items():
        idx = torch.tensor(js)

        def hook(module: torch.nn.Module, args: tuple, idx: torch.Tensor = idx) -> tuple:
            x = args[0].clone()
            x[..., idx] = x[..., idx] * m
            return (x, *args[1:])

        handles.append(model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def last_token_acts(model: transformers.PreTrainedModel, tok, prompts: list[str]) -> torch.Tensor:
    """[n_prompts, n_layers, intermediate] down_proj inputs at the last token, one prompt at a time."""
    layers = model.model.layers
    seen: dict[int, torch.Tensor] = {}
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(i, args[0][0, -1].detach().clone())
        )
        for i, layer in enumerate(layers)
    ]
    rows = []
    try:
        with torch.no_grad():
            for p in prompts:
                model(**encode(tok, p))
                rows.append(torch.stack([seen[i] for i in range(len(layers))]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows)


def generate(model, tok, prompts: list[str], max_new_tokens: int = 14) -> list[str]:
    """Greedy replies, batched with left padding (one generate call keeps this fast on a busy CPU)."""
    enc = tok([render(tok, p) for p in prompts], add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_single_bos(tmp_path):
    tok = build_tokenizer(["how", "to", "make", "a", "cake", "?"])
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.padding_side == "left"
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")

    for t in (tok, loaded):
        text = render(t, "How to make a CAKE zebra?")
        assert text == "<s><|user|> How to make a CAKE zebra? <|end|> <|assistant|>"
        ids = t(text, add_special_tokens=False)["input_ids"]
        assert t.convert_ids_to_tokens(ids) == [
            "<s>", "<|user|>", "how", "to", "make", "a", "cake", "<unk>", "?", "<|end|>", "<|assistant|>",
        ]  # fmt: skip
        assert ids.count(t.bos_token_id) == 1
        assert t("how to")["input_ids"] == [
            t.bos_token_id,
            t.convert_tokens_to_ids("how"),
            t.convert_tokens_to_ids("to"),
        ]
        assert t.decode(ids[2:7]) == "how to make a cake"

    assert (
        loaded(render(loaded, "make a cake"), add_special_tokens=False)["input_ids"]
        == tok(render(tok, "make a cake"), add_special_tokens=False)["input_ids"]
    )
    batch = loaded(["cake", "how to make a cake"], padding=True)
    assert batch["input_ids"][0][0] == loaded.pad_token_id and batch["attention_mask"][0][0] == 0


# ---------------------------------------------------------------------------------------------- random models


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_random_models_load_and_run(tmp_path, arch):
    path = save_random_model(tmp_path / arch, arch=arch, n_layers=3)
    assert (path / "model.safetensors").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch and model.dtype == torch.float32
    assert len(model.model.layers) == 3 and model.config.vocab_size == len(tok)

    acts = last_token_acts(model, tok, ["how to bake a cake", "how to build a bomb at home"])
    assert acts.shape == (2, 3, 64) and torch.isfinite(acts).all()
    # std 0.15 init: different prompts give visibly different activations at the same last token
    assert (acts[0] - acts[1]).norm() > 0.1 * acts[0].norm()
    with torch.no_grad():
        logits = model(**encode(tok, "hello")).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_random_model_is_deterministic(tmp_path):
    a = save_random_model(tmp_path / "a", vocab_words=["x", "y"], seed=3)
    b = save_random_model(tmp_path / "b", vocab_words=["x", "y"], seed=3)
    c = save_random_model(tmp_path / "c", vocab_words=["x", "y"], seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------ demo data


def test_demo_prompts_shape_and_determinism():
    sets = demo_prompts()
    assert sets == demo_prompts(0) and sets != demo_prompts(1)
    assert {k: len(v) for k, v in sets.items()} == {"positive": 24, "negative": 24, "diverse": 24, "eval": 10}
    tok = build_tokenizer(DEFAULT_WORDS)
    harm = set(HARM_WORDS)
    for name, prompts in sets.items():
        assert len(set(prompts)) == len(prompts), name
        for p in prompts:
            assert 4 <= len(p.split()) <= 21, p
            assert tok.unk_token_id not in tok(p)["input_ids"], p
    assert all(harm & set(p.split()) for p in sets["positive"] + sets["eval"])
    assert not any(harm & set(p.split()) for p in sets["negative"])
    n_harmful_diverse = sum(bool(harm & set(p.split())) for p in sets["diverse"])
    assert 0 < n_harmful_diverse < len(sets["diverse"]) / 2
    assert not set(sets["eval"]) & set(sets["positive"])


# ---------------------------------------------------------------------------------------------- planted model


@pytest.fixture(scope="module")
def planted_lm(
    tmp_path_factory,
) -> tuple[PlantedModel, transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    pm = save_planted_model(tmp_path_factory.mktemp("planted") / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(pm.path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(pm.path)
    return pm, model, tok


@pytest.fixture(scope="module")
def acts(planted_lm) -> dict[str, torch.Tensor]:
    _, model, tok = planted_lm
    return {name: last_token_acts(model, tok, prompts) for name, prompts in demo_prompts().items()}


def delta_of(acts: dict[str, torch.Tensor]) -> torch.Tensor:
    return acts["positive"].mean(0) - acts["negative"].mean(0)


def test_planted_layout(planted_lm):
    pm, model, _ = planted_lm
    assert json.loads((pm.path / "planted.json").read_text()) == {
        "gate": [list(g) for g in pm.gate],
        "universal": [list(u) for u in pm.universal],
    }
    assert (pm.refusal_text, pm.answer_text) == (REFUSAL_TEXT, ANSWER_TEXT)
    n_layers = model.config.num_hidden_layers
    assert 8 <= len(pm.gate) <= 12 and all(layer >= n_layers - 3 for layer, _ in pm.gate)
    assert len(pm.universal) == 6 and all(2 <= layer < n_layers - 3 for layer, _ in pm.universal)
    assert not set(pm.gate) & set(pm.universal)


def test_gate_neurons_have_the_largest_deltas(planted_lm, acts):
    pm, _, _ = planted_lm
    delta = delta_of(acts)
    gate = torch.tensor([delta[layer, j] for layer, j in pm.gate])
    others = delta.abs().clone()
    for layer, j in pm.gate + pm.universal:
        others[layer, j] = 0.0
    assert gate.min() > 2.0
    assert gate.min() > 5 * others.max()
    # near zero on harmless prompts, clearly on for every harmful one
    for layer, j in pm.gate:
        assert acts["negative"][:, layer, j].abs().max() < 0.5
        assert acts["positive"][:, layer, j].min() > 2.0
        assert acts["eval"][:, layer, j].min() > 2.0


def test_universal_neurons_are_top_one_percent_everywhere(planted_lm, acts):
    pm, model, _ = planted_lm
    inter = model.config.intermediate_size
    every = torch.cat(list(acts.values())).flatten(1).abs()
    k = math.floor(0.01 * every.shape[1])
    top = every.topk(k, dim=1).indices
    for layer, j in pm.universal:
        assert (top == layer * inter + j).any(dim=1).all(), (layer, j)
    # ... and by a clear margin over every other neuron
    uni_min = torch.stack([every[:, layer * inter + j] for layer, j in pm.universal]).min()
    rest = every.clone()
    for layer, j in pm.universal:
        rest[:, layer * inter + j] = 0.0
    assert uni_min > 2 * rest.max()


def test_universal_neurons_beat_gate_on_delta(planted_lm, acts):
    pm, _, _ = planted_lm
    delta = delta_of(acts)
    max_gate = max(abs(float(delta[layer, j])) for layer, j in pm.gate)
    strong = [u for u in pm.universal if abs(float(delta[u])) > max_gate]
    assert len(strong) >= len(pm.universal) / 2


def test_generation_refuses_answers_and_ablation_flips(planted_lm):
    pm, model, tok = planted_lm
    sets = demo_prompts()
    assert generate(model, tok, sets["eval"]) == [pm.refusal_text] * len(sets["eval"])
    assert generate(model, tok, sets["negative"]) == [pm.answer_text] * len(sets["negative"])
    with scaled(model, pm.gate, 0.0):
        assert generate(model, tok, sets["eval"]) == [pm.answer_text] * len(sets["eval"])


def test_unbatched_generation_matches(planted_lm):
    pm, model, tok = planted_lm
    sets = demo_prompts()
    for prompt, expected in [(sets["eval"][0], pm.refusal_text), (sets["negative"][0], pm.answer_text)]:
        assert generate(model, tok, [prompt]) == [expected]
        with scaled(model, pm.gate, 0.0):
            assert generate(model, tok, [prompt]) == [pm.answer_text]


def test_multiplier_one_is_bit_identical(planted_lm):
    pm, model, tok = planted_lm
    enc = encode(tok, demo_prompts()["eval"][0])
    with torch.no_grad():
        plain = model(**enc).logits
        with scaled(model, pm.gate + pm.universal, 1.0):
            hooked = model(**enc).logits
        with scaled(model, pm.gate, 0.0):
            ablated = model(**enc).logits
    assert torch.equal(plain, hooked)
    assert not torch.equal(plain, ablated)
