"""Models with a large model's activation shape and a tiny hidden size, and as many distinct prompts as asked.

A captured row of this model has exactly the bytes of a Qwen2.5-72B row (80 layers x 29568 neurons, 4.7 MB in
float16), or of a Llama-3.1-70B row (80 x 28672), while a forward pass costs a CPU little: what the store, the reduce
and the driver pay at the real row size can be measured here (tests/test_scale.py, benchmarks/scale.py).
`save_moe_scale_model` does the same for the largest mixture-of-experts row: Qwen3-235B-A22B, 94 layers x 128
experts x 1536 = 18.5M neurons, 37 MB per prompt in float16.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import torch

from cna_dist.demo.models import save_random_model
from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import DEFAULT_WORDS

# (layers, intermediate_size) of the real checkpoints
SHAPES = {"qwen2": (80, 29568), "llama": (80, 28672)}
# (layers, routed experts, expert width, experts per token) of the real mixture-of-experts checkpoints
MOE_SHAPES = {"qwen3_moe": (94, 128, 1536, 8)}
SETS = ("positive", "negative", "diverse")


def save_scale_model(path: str | Path, arch: Literal["qwen2", "llama"] = "qwen2", seed: int = 0) -> Path:
    """A seeded random checkpoint of the real layer count and MLP width, hidden size 8, weights saved in float16.

    float16 halves the checkpoint (113 MB for Qwen2 shape) without changing what it exercises: replicas load it
    in the manifest's `model.dtype`.
    """
    n_layers, width = SHAPES[arch]
    path = save_random_model(
        path, arch=arch, n_layers=n_layers, hidden_size=8, intermediate_size=width, n_heads=2, n_kv_heads=1, seed=seed
    )
    from safetensors.torch import load_file, save_file

    for weights in sorted(Path(path).glob("*.safetensors")):
        tensors = {name: t.to(torch.float16) for name, t in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    return Path(path)


def scale_prompts(n: int, seed: int = 0) -> dict[str, list[str]]:
    """`n` distinct prompts of 6 to 14 vocabulary words, split in thirds: positive, negative, diverse."""
    if n < len(SETS):
        raise ValueError(f"need at least {len(SETS)} prompts, got {n}")
    rng = random.Random(seed)
    words = [w for w in DEFAULT_WORDS if w.isalpha()]
    seen: set[str] = set()
    prompts: list[str] = []
    while len(prompts) < n:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    cut = [n * i // len(SETS) for i in range(len(SETS) + 1)]
    return {name: prompts[cut[i] : cut[i + 1]] for i, name in enumerate(SETS)}


def save_moe_scale_model(
    path: str | Path,
    seed: int = 0,
    *,
    n_layers: int | None = None,
    n_experts: int | None = None,
    expert_width: int | None = None,
    top_k: int | None = None,
    hidden_size: int = 8,
) -> Path:
    """A seeded random Qwen3-MoE checkpoint of Qwen3-235B-A22B's row shape (by default), weights in float16.

    Every layer is a MoE layer of `n_experts` experts of width `expert_width` (a row of 94 x 128 x 1536 = 18.5M
    neurons); hidden size 8 keeps the weights at 887 MB. The tensors are drawn one at a time (std 0.15, norms 1)
    from names and shapes of a model built on the meta device and written straight to safetensors: no float32
    copy of the whole model is ever held. The smaller sizes are for tests of the same builder.
    """
    import transformers
    from safetensors.torch import save_file

    real_layers, real_experts, real_width, real_top_k = MOE_SHAPES["qwen3_moe"]
    path = Path(path)
    tok = build_tokenizer(DEFAULT_WORDS)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,  # dense MLP width: unused, every layer is sparse
        moe_intermediate_size=real_width if expert_width is None else expert_width,
        num_hidden_layers=real_layers if n_layers is None else n_layers,
        num_experts=real_experts if n_experts is None else n_experts,
        num_experts_per_tok=real_top_k if top_k is None else top_k,
        norm_topk_prob=True,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float16",
    )
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in transformers.Qwen3MoeForCausalLM(config).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: (torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.15).to(torch.float16)
        for name, shape in shapes.items()
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(path)
    generation = transformers.GenerationConfig(
        do_sample=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    generation.save_pretrained(path)
    tok.save_pretrained(path)
    return path
