"""A hand-wired instruct model with a KNOWN refusal circuit (the "gate" neurons) and KNOWN universal neurons,
so that CNA's output can be checked against ground truth."""

from __future__ import annotations

import json
import math
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

    d, inter, hd = _P_HIDDEN, _P_INTER, _P_HIDDEN // _P_HEADS
    vocab = tok.get_vocab()
    chain = ["<|assistant|>"] + _CHAIN_WORDS
    id_dim = {w: _ID0 + i for i, w in enumerate(chain)}
    n0 = _ID0 + len(chain)
    nz = slice(n0, d)
    n_noise = d - n0
    slow = hd // 2 - 1  # RoPE channel with the lowest frequency

    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 0.0)

        emb = model.model.embed_tokens.weight
        emb[:, _CONST] = 1.0
        emb[:, nz] = noise(len(vocab), n_noise, std=0.1)
        for w in HARM_WORDS:
            emb[vocab[w], _HARM] = 1.0
        for w, dim in id_dim.items():
            emb[vocab[w], dim] = 1.0

        for layer_idx, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if layer_idx == 0:
                attn.q_proj.weight[slow, _CONST] = 1.5
                attn.k_proj.weight[slow, _HARM] = 1.5
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

            # Every neuron gets small random reads of const + noise dims and writes into noise dims only.
            mlp.gate_proj.weight[:, nz] = noise(inter, n_noise, std=0.05)
            mlp.gate_proj.weight[:, _CONST] = noise(inter, std=0.05)
            mlp.up_proj.weight[:, nz] = noise(inter, n_noise, std=0.05)
            mlp.up_proj.weight[:, _CONST] = noise(inter, std=0.05)
            mlp.down_proj.weight[nz, :] = noise(n_noise, inter, std=0.01)

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

        for k, (layer_idx, j) in enumerate(_UNIVERSAL):
            mlp = model.model.layers[layer_idx].mlp
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight[j, :] = 0.0
            mlp.gate_proj.weight[j, _CONST] = 1.0
            mlp.up_proj.weight[j, _CONST] = 1.5 + 0.1 * k
            if (layer_idx, j) in _UNIVERSAL_HARM:
                mlp.up_proj.weight[j, _SEEN] = 2.0
            mlp.down_proj.weight[:, j] = 0.0

        head = model.lm_head.weight
        head[:, nz] = noise(len(vocab), n_noise, std=0.01)
        head[vocab["sure"], id_dim["<|assistant|>"]] = 1.0
        refuse_first = vocab[REFUSAL_TEXT.split()[0]]
        head[refuse_first, _REFUSE] = 2.0
        for phrase in (REFUSAL_TEXT, ANSWER_TEXT):
            words = phrase.split() + ["</s>"]
            for cur, nxt in zip(words[:-1], words[1:], strict=True):
                head[vocab[nxt], id_dim[cur]] = 5.0
                head[refuse_first, id_dim[cur]] = -10.0

    model.eval()
    save_checkpoint(model, tok, path)
    gate = sorted(_GATE)
    universal = sorted(_UNIVERSAL)
    (path / "planted.json").write_text(
        json.dumps({"gate": [list(g) for g in gate], "universal": [list(u) for u in universal]})
    )
    return PlantedModel(path, gate, universal, REFUSAL_TEXT, ANSWER_TEXT)
