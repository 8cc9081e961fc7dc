"""A model with a 72B model's activation shape and a tiny hidden size, and as many distinct prompts as asked.

A captured row of this model has exactly the bytes of a Qwen2.5-72B row (80 layers x 29568 neurons, 4.7 MB in
float16), or of a Llama-3.1-70B row (80 x 28672), while a forward pass costs a CPU little: what the store, the reduce
and the driver pay at the real row size can be measured here (tests/test_scale.py, benchmarks/scale.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import torch

from cna_dist.demo.models import save_random_model
from cna_dist.demo.words import DEFAULT_WORDS

# (layers, intermediate_size) of the real checkpoints
SHAPES = {"qwen2": (80, 29568), "llama": (80, 28672)}
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
