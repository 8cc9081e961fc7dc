"""Seeded random Llama / Qwen2 / Mistral checkpoints saved with `save_pretrained`, to exercise loading and hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import transformers

from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import DEFAULT_WORDS

_ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def model_config(
    arch: str,
    tok: transformers.PreTrainedTokenizerFast,
    n_layers: int,
    hidden: int,
    inter: int,
    n_heads: int,
    n_kv: int,
) -> transformers.PretrainedConfig:
    cfg_cls, _ = _ARCHS[arch]
    return cfg_cls(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=hidden // n_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )


def save_checkpoint(model: transformers.PreTrainedModel, tok: transformers.PreTrainedTokenizerFast, path: Path) -> None:
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def save_random_model(
    path: str | Path,
    arch: Literal["llama", "qwen2", "mistral"] = "llama",
    n_layers: int = 4,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_words: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Save a seeded random float32 causal LM plus its tokenizer to ``path`` and return the path.

    Weights are drawn with std 0.15 (not HF's 0.02) so activations differ visibly between prompts; norm
    weights stay 1. Drawing from our own generator keeps the checkpoint identical across library versions.
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    path = Path(path)
    tok = build_tokenizer(DEFAULT_WORDS if vocab_words is None else vocab_words)
    config = model_config(arch, tok, n_layers, hidden_size, intermediate_size, n_heads, n_kv_heads)
    model = _ARCHS[arch][1](config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    model.eval()
    save_checkpoint(model, tok, path)
    return path
