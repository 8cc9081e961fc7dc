"""Which engine runs a replica's model, and how a pipeline splits its layers: plain rules, checked up front.

Engines (SPEC §3): `single` (one device), `device_map` (accelerate splits the model over the replica's GPUs; one
stage computes at a time), `pipeline` (one worker per stage, micro-batches in flight on every stage at once),
`stream` (one device, a whole shard through one layer at a time while the next layer loads). Only `single` and
`device_map` hold the whole model with its head, so only they generate; `generator_engine` is where eval's engine
is decided for any manifest.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence


def resolve(engine: str, gpus: int) -> str:
    """The engine a manifest's `model.engine` means for a replica of `gpus` GPUs."""
    if engine == "stream":
        return "stream"
    if engine == "pipeline" or (engine == "auto" and gpus > 1):
        return "pipeline"
    return "device_map" if gpus > 1 else "single"


GENERATES = ("single", "device_map")  # the engines whose model can also generate (cna_dist.capture.backend.Generator)


def generator_engine(engine: str, gpus: int) -> str:
    """The engine eval generates on for a manifest's `model.engine` on a replica of `gpus` GPUs.

    An engine that generates is kept; the capture-only engines generate on the whole model over the same devices:
    `pipeline` on `device_map` (`single` on one device), `stream` on `single`.
    """
    resolved = resolve(engine, gpus)
    return resolved if resolved in GENERATES else resolve("device_map", gpus)


def balanced(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) layer ranges covering [0, n_layers), sizes differing by at most one.

    Later stages are never smaller: the first stage also holds the embedding (vocab x hidden, about one layer's
    worth of memory on large-vocabulary models), so the leftover layers go to the end. Capture needs no final
    norm or lm_head, so the last stage carries nothing extra. ValueError if n_stages < 1 or > n_layers.
    """
    if n_stages < 1 or n_stages > n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages (need 1 <= stages <= layers)")
    base, extra = divmod(n_layers, n_stages)
    sizes = [base + (i >= n_stages - extra) for i in range(n_stages)]
    bounds = list(itertools.accumulate(sizes, initial=0))
    return list(itertools.pairwise(bounds))


def stage_ranges(stages: int | Sequence[Sequence[int]] | None, n_layers: int, gpus: int) -> list[tuple[int, int]]:
    """The pipeline's layer ranges: explicit, a balanced count, or one stage per GPU (at least one)."""
    if stages is None:
        return balanced(n_layers, max(gpus, 1))
    if isinstance(stages, int):
        return balanced(n_layers, stages)
    return [(int(lo), int(hi)) for lo, hi in stages]


def check_ranges(ranges: list[tuple[int, int]], n_layers: int, gpus: int) -> str | None:
    """What is wrong with a pipeline split, or None: contiguous from 0 to n_layers, one stage per GPU."""
    edges = [0, *[edge for span in ranges for edge in span], n_layers]
    if any(lo >= hi for lo, hi in ranges) or any(edges[i] != edges[i + 1] for i in range(0, len(edges), 2)):
        return f"stages {ranges} must be non-empty [lo, hi) ranges covering layers 0 to {n_layers} in order"
    if gpus > 1 and len(ranges) != gpus:
        return f"{len(ranges)} stages for a replica of {gpus} GPUs: one stage per GPU"
    return None


def compute_bound_tokens(layer_load_s: float, tokens_per_s: float, margin: float = 2.0) -> int:
    """Tokens a streamed shard needs so each layer's compute covers the next layer's load, with a margin.

    While layer l computes over the shard's tokens, layer l+1 loads: the device idles unless
    tokens / tokens_per_s >= layer_load_s. Compute per token is fixed by the model; the load is one layer's weights.
    """
    if layer_load_s <= 0 or tokens_per_s <= 0:
        raise ValueError(f"need a positive load time and speed, got {layer_load_s} s and {tokens_per_s} tokens/s")
    return max(1, int(margin * layer_load_s * tokens_per_s + 0.5))
