"""Steering: scale a circuit's neurons (the down_proj input) by m at every position, prompt and generated alike;
CAA, the baseline: add a contrastive vector to one layer's MLP output."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from cna_dist.model import arch
from cna_dist.model.arch import decoder, mlps
from cna_dist.model.arch import neurons as down_projs
from cna_dist.prompts.batching import batches


def scales(
    pairs: Iterable[tuple[int, int]], multiplier: float, n_layers: int, width: int, dtype: torch.dtype
) -> dict[int, torch.Tensor]:
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

    x * 1.0 is exact in IEEE arithmetic, so m = 1 gives bit-identical logits to no hook at all. A family with its
    own steering (`cna_dist.model.arch.Family.steering`, e.g. mixture-of-experts layers) steers its way.
    """
    family = arch.of(model.config, source=type(model).__name__) if hasattr(model, "config") else None
    if family is not None and family.steering is not None:
        with family.steering(model, list(pairs), multiplier):
            yield
        return
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


# ------------------------------------------------------------------------------------------------------- CAA
# Contrastive activation addition, the baseline the paper compares CNA with: add alpha * (mean_pos - mean_neg) of
# one layer's MLP output at every position.


def _checked_layers(layers: Iterable[int], n_layers: int) -> list[int]:
    out = sorted({int(layer) for layer in layers})
    if not out:
        raise ValueError("no layers given")
    bad = [layer for layer in out if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} is outside the model ({n_layers} layers)")
    return out


def _output(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (MoE blocks return (hidden, router_logits))."""
    return output[0] if isinstance(output, tuple) else output


class _Done(Exception):
    """Raised by the deepest hook: the layers above it cannot change what was already recorded."""


def _mean_mlp_outputs(
    model: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    pad_id: int,
    layers: list[int],
    token_budget: int,
    max_batch_size: int,
) -> dict[int, torch.Tensor]:
    """Per layer, the float64 mean over prompts of the MLP output at the last real token."""
    if not token_ids:
        raise ValueError("no prompts to average")
    blocks = mlps(model)
    inner = decoder(model)
    device = inner.embed_tokens.weight.device
    seen: dict[int, torch.Tensor] = {}
    sums = {layer: torch.zeros(blocks[layer].down_proj.out_features, dtype=torch.float64) for layer in layers}
    last = layers[-1]

    def hook_for(layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            seen[layer] = _output(output)[:, -1]  # left padding: the last real token is at -1 in every row
            if layer == last:
                raise _Done

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        for batch in batches(token_ids, pad_id, token_budget, max_batch_size):
            ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as Capturer.forward: each row as if alone
            seen.clear()
            try:
                inner(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            except _Done:
                pass
            for layer in layers:
                sums[layer] += seen[layer].to("cpu", torch.float64).sum(0)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: total / len(token_ids) for layer, total in sums.items()}


@torch.no_grad()  # not inference_mode: callers may edit or reuse the returned vectors
def caa_vectors(
    model: torch.nn.Module,
    pos_ids: Sequence[Sequence[int]],
    neg_ids: Sequence[Sequence[int]],
    pad_id: int,
    layers: Sequence[int],
    *,
    token_budget: int = 8192,
    max_batch_size: int = 64,
) -> dict[int, torch.Tensor]:
    """CAA steering vectors {layer: mean_pos - mean_neg} of the MLP output at the last real token.

    Means are accumulated in float64 (like CNA's delta) and returned in float32; padding does not change them.
    """
    chosen = _checked_layers(layers, len(mlps(model)))
    pos = _mean_mlp_outputs(model, pos_ids, pad_id, chosen, token_budget, max_batch_size)
    neg = _mean_mlp_outputs(model, neg_ids, pad_id, chosen, token_budget, max_batch_size)
    return {layer: (pos[layer] - neg[layer]).to(torch.float32) for layer in chosen}


@contextmanager
def added(model: torch.nn.Module, vectors: dict[int, torch.Tensor], alpha: float) -> Iterator[None]:
    """Add alpha * vectors[layer] to that layer's MLP output at every position while the context is open.

    alpha == 0 registers no hook at all, so its logits are bit-identical to no intervention (x + 0 * v is not:
    it turns -0.0 into 0.0 and an inf in v into NaN).
    """
    blocks = mlps(model)
    if vectors:
        _checked_layers(vectors, len(blocks))
    shifts: dict[int, torch.Tensor] = {}
    for layer, vec in vectors.items():
        proj = blocks[layer].down_proj
        if tuple(vec.shape) != (proj.out_features,):
            raise ValueError(
                f"layer {layer}: CAA vector has shape {tuple(vec.shape)}, the MLP output is ({proj.out_features},)"
            )
        shifts[layer] = (alpha * vec.detach().to(torch.float32)).to(proj.weight.device)
    handles = []
    try:
        if alpha != 0:
            for layer, shift in sorted(shifts.items()):

                def hook(module: torch.nn.Module, args: tuple, output: Any, shift: torch.Tensor = shift) -> Any:
                    # In the output's dtype (not the weight's: quantized weights are integers); a no-op in float32.
                    if isinstance(output, tuple):
                        return (output[0] + shift.to(output[0].dtype), *output[1:])
                    return output + shift.to(output.dtype)

                handles.append(blocks[layer].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def caa_layer(pairs: Iterable[tuple[int, int]]) -> int:
    """The layer holding most of the circuit's neurons (ties: the shallower one), CAA's default single layer."""
    counts = Counter(int(layer) for layer, _ in pairs)
    if not counts:
        raise ValueError("empty circuit: no layer to steer")
    return min(counts, key=lambda layer: (-counts[layer], layer))


def condition(model: torch.nn.Module, spec: dict[str, Any]) -> AbstractContextManager[None]:
    """One steering condition as plain data (it travels to replica actors): neurons scaled, CAA added, or none."""
    if "pairs" in spec:
        return steered(model, [tuple(p) for p in spec["pairs"]], float(spec["multiplier"]))
    if "caa" in spec:
        vectors = {int(layer): torch.tensor(v, dtype=torch.float32) for layer, v in spec["caa"].items()}
        return added(model, vectors, float(spec["alpha"]))
    return nullcontext()
