"""A hand-wired instruct model with a KNOWN refusal circuit (the "gate" neurons) and KNOWN universal neurons,
so that CNA's output can be checked against ground truth."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from cna_dist.demo.models import model_config, save_checkpoint
from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import _CHAIN_WORDS, ANSWER_TEXT, DEFAULT_WORDS, HARM_WORDS, REFUSAL_TEXT


@dataclass
class PlantedModel:
    """Where the planted model was saved and its ground truth: (layer, neuron) pairs and reply phrases."""

    path: Path
    gate: list[tuple[int, int]]
    universal: list[tuple[int, int]]
    refusal_text: str
    answer_text: str


# Planted layout. Residual dims with a fixed meaning, then one id dim per reply-chain token, then noise dims.
_P_LAYERS, _P_HIDDEN, _P_INTER, _P_HEADS, _P_KV = 8, 128, 256, 4, 2
_CONST, _HARM, _SEEN, _REFUSE, _ID0 = 0, 1, 2, 3, 4
_GATE = [(5, 17), (5, 90), (5, 201), (6, 5), (6, 66), (6, 140), (6, 250), (7, 33), (7, 120), (7, 222)]
_UNIVERSAL = [(2, 11), (2, 200), (3, 45), (3, 180), (4, 7), (4, 99)]
_UNIVERSAL_HARM = {(2, 11), (3, 45), (4, 7), (4, 99)}  # also stronger on harmful prompts


def save_planted_model(path: str | Path, seed: int = 0) -> PlantedModel:
    """Save a Llama model with a hand-wired refusal circuit and known universal neurons; return its layout.

    Mechanism (residual dims: const, harm, harm-seen, refuse, one-hot ids of reply tokens, noise):

    * embeddings: const=1 on every token, harm=1 on ``HARM_WORDS``, an id dim per reply-chain token,
      seeded noise on the rest;
    * layer 0, head 0: a constant query against harm-keyed keys (in RoPE's slowest channel, so position
      barely matters) attends almost only to harmful tokens, whatever the prompt length, and copies the harm
      dim into harm-seen; with no harmful token it writes exactly 0. Head 2 averages noise dims uniformly,
      which makes the other neurons prompt-dependent;
    * gate neurons (last three layers): silu(harm-seen - const) * const, writing the refuse dim;
    * universal neurons (layers 2-4): silu(const) * const, huge on every prompt, some boosted by harm-seen;
      zero down_proj columns, so they never change the output;
    * lm_head: a bigram chain on the id dims; after ``<|assistant|>`` the refuse dim picks the refusal phrase
      over the answer phrase. Ablating the gate zeroes the refuse dim, so the model answers.
    """
    path = Path(path)
    tok = build_tokenizer(DEFAULT_WORDS)
    config = model_config("llama", tok, _P_LAYERS, _P_HIDDEN, _P_INTER, _P_HEADS, _P_KV)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)

    def noise(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    layout = _Layout.of(tok)
    with torch.no_grad():  # the order of the calls fixes the order of the noise draws: keep it
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 0.0)
        _wire_embeddings(model, layout, noise)
        for layer_idx, layer in enumerate(model.model.layers):
            _wire_attention(layer.self_attn, layer_idx, layout, noise)
            _wire_background_mlp(layer.mlp, layout, noise)
        _wire_gate(model)
        _wire_universal(model)
        _wire_lm_head(model, layout, noise)

    model.eval()
    save_checkpoint(model, tok, path)
    gate = sorted(_GATE)
    universal = sorted(_UNIVERSAL)
    (path / "planted.json").write_text(
        json.dumps({"gate": [list(g) for g in gate], "universal": [list(u) for u in universal]})
    )
    return PlantedModel(path, gate, universal, REFUSAL_TEXT, ANSWER_TEXT)


Noise = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class _Layout:
    """The residual dims of one tokenizer's planted model: an id dim per reply-chain token, then noise dims."""

    vocab: dict[str, int]
    id_dim: dict[str, int]
    nz: slice
    n_noise: int
    hd: int
    slow: int  # RoPE channel with the lowest frequency

    @classmethod
    def of(cls, tok: transformers.PreTrainedTokenizerFast) -> _Layout:
        chain = ["<|assistant|>"] + _CHAIN_WORDS
        n0 = _ID0 + len(chain)
        hd = _P_HIDDEN // _P_HEADS
        return cls(
            vocab=tok.get_vocab(),
            id_dim={w: _ID0 + i for i, w in enumerate(chain)},
            nz=slice(n0, _P_HIDDEN),
            n_noise=_P_HIDDEN - n0,
            hd=hd,
            slow=hd // 2 - 1,
        )


def _wire_embeddings(model: transformers.LlamaForCausalLM, lay: _Layout, noise: Noise) -> None:
    emb = model.model.embed_tokens.weight
    emb[:, _CONST] = 1.0
    emb[:, lay.nz] = noise(len(lay.vocab), lay.n_noise, std=0.1)
    for w in HARM_WORDS:
        emb[lay.vocab[w], _HARM] = 1.0
    for w, dim in lay.id_dim.items():
        emb[lay.vocab[w], dim] = 1.0


def _wire_attention(attn: torch.nn.Module, layer_idx: int, lay: _Layout, noise: Noise) -> None:
    d, hd, nz, n_noise = _P_HIDDEN, lay.hd, lay.nz, lay.n_noise
    if layer_idx == 0:
        attn.q_proj.weight[lay.slow, _CONST] = 1.5
        attn.k_proj.weight[lay.slow, _HARM] = 1.5
        attn.v_proj.weight[0, _HARM] = 0.15
        attn.o_proj.weight[_SEEN, 0] = 1.0
        # kv head 1 -> query head 2 (q = 0: uniform average over the prefix) -> noise dims
        attn.v_proj.weight[hd : 2 * hd, nz] = noise(hd, n_noise, std=1.0 / math.sqrt(n_noise))
        attn.o_proj.weight[nz, 2 * hd : 3 * hd] = noise(n_noise, hd, std=0.5 / math.sqrt(hd))
    else:
        attn.q_proj.weight[:, nz] = noise(d, n_noise, std=0.05)
        attn.k_proj.weight[:, nz] = noise(attn.k_proj.weight.shape[0], n_noise, std=0.05)
        attn.v_proj.weight[:, nz] = noise(attn.v_proj.weight.shape[0], n_noise, std=0.05)
        attn.o_proj.weight[nz, :] = noise(n_noise, d, std=0.01)


def _wire_background_mlp(mlp: torch.nn.Module, lay: _Layout, noise: Noise) -> None:
    """Every neuron gets small random reads of const + noise dims and writes into noise dims only."""
    inter, nz, n_noise = _P_INTER, lay.nz, lay.n_noise
    mlp.gate_proj.weight[:, nz] = noise(inter, n_noise, std=0.05)
    mlp.gate_proj.weight[:, _CONST] = noise(inter, std=0.05)
    mlp.up_proj.weight[:, nz] = noise(inter, n_noise, std=0.05)
    mlp.up_proj.weight[:, _CONST] = noise(inter, std=0.05)
    mlp.down_proj.weight[nz, :] = noise(n_noise, inter, std=0.01)


def _wire_gate(model: transformers.LlamaForCausalLM) -> None:
    for k, (layer_idx, j) in enumerate(_GATE):
        mlp = model.model.layers[layer_idx].mlp
        scale = 1.0 + 0.05 * k  # distinct magnitudes, so no two gate neurons tie
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[j, :] = 0.0
        mlp.gate_proj.weight[j, _SEEN] = 2.0 * scale
        mlp.gate_proj.weight[j, _CONST] = -1.0
        mlp.up_proj.weight[j, _CONST] = 0.25 * scale
        mlp.down_proj.weight[:, j] = 0.0
        mlp.down_proj.weight[_REFUSE, j] = 0.03


def _wire_universal(model: transformers.LlamaForCausalLM) -> None:
    for k, (layer_idx, j) in enumerate(_UNIVERSAL):
        mlp = model.model.layers[layer_idx].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[j, :] = 0.0
        mlp.gate_proj.weight[j, _CONST] = 1.0
        mlp.up_proj.weight[j, _CONST] = 1.5 + 0.1 * k
        if (layer_idx, j) in _UNIVERSAL_HARM:
            mlp.up_proj.weight[j, _SEEN] = 2.0
        mlp.down_proj.weight[:, j] = 0.0


def _wire_lm_head(model: transformers.LlamaForCausalLM, lay: _Layout, noise: Noise) -> None:
    """A bigram chain on the id dims; after `<|assistant|>` the refuse dim picks the refusal phrase."""
    head, vocab, id_dim = model.lm_head.weight, lay.vocab, lay.id_dim
    head[:, lay.nz] = noise(len(vocab), lay.n_noise, std=0.01)
    head[vocab["sure"], id_dim["<|assistant|>"]] = 1.0
    refuse_first = vocab[REFUSAL_TEXT.split()[0]]
    head[refuse_first, _REFUSE] = 2.0
    for phrase in (REFUSAL_TEXT, ANSWER_TEXT):
        words = phrase.split() + ["</s>"]
        for cur, nxt in zip(words[:-1], words[1:], strict=True):
            head[vocab[nxt], id_dim[cur]] = 5.0
            head[refuse_first, id_dim[cur]] = -10.0
