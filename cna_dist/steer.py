"""Steering: scale a circuit's neurons (the down_proj input) by m at every position, prompt and generated alike."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from cna_dist.model import down_projs


def scales(pairs: Iterable[tuple[int, int]], multiplier: float, n_layers: int, width: int,
           dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Per-layer scale vectors: m at the circuit's neurons, exactly 1 elsewhere."""
    out: dict[int, torch.Tensor] = {}
    for layer, neuron in pairs:
        if not (0 <= layer < n_layers and 0 <= neuron < width):
            raise ValueError(f"neuron L{layer} N{neuron} is outside the model ({n_layers} x {width})")
        vec = out.setdefault(layer, torch.ones(width, dtype=dtype))
        vec[neuron] = multiplier
    return out


@contextmanager
def steered(model: torch.nn.Module, pairs: Iterable[tuple[int, int]], multiplier: float) -> Iterator[None]:
    """Multiply the given neurons by `multiplier` while the context is open.

    x * 1.0 is exact in IEEE arithmetic, so m = 1 gives bit-identical logits to no hook at all.
    """
    projs = down_projs(model)
    weight = projs[0].weight
    vectors = scales(pairs, multiplier, len(projs), projs[0].in_features, weight.dtype)
    handles = []
    try:
        for layer, vec in vectors.items():
            vec = vec.to(projs[layer].weight.device)

            def hook(module: torch.nn.Module, args: tuple, vec: torch.Tensor = vec) -> tuple:
                return (args[0] * vec, *args[1:])

            handles.append(projs[layer].register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
