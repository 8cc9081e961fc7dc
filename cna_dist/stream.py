"""The reduction over a store, one layer block per task, memory bounded by one chunk row-range.

Each function is a pure step (Run + block in, small arrays out) so that any mapper runs it: a loop here,
Ray tasks in the driver. Global-scope universal counting needs each diverse prompt's own threshold across
all layers, so it takes two passes: per-block top-n candidates per prompt, merged exactly into each
prompt's n-th (value, id); then per-block counting against those thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cna_dist import reduce as r
from cna_dist.store import Run

Mapper = Callable[[Callable[..., Any], Sequence[tuple]], list[Any]]


def local_map(fn: Callable[..., Any], args: Sequence[tuple]) -> list[Any]:
    return [fn(*a) for a in args]


def layer_blocks(n_layers: int, layers_per_block: int) -> list[slice]:
    return [slice(lo, min(lo + layers_per_block, n_layers)) for lo in range(0, n_layers, layers_per_block)]


def _flat_ids(layers: slice, width: int) -> np.ndarray:
    return np.arange(layers.start * width, layers.stop * width)


def block_moments(run: Run, rows: dict[str, np.ndarray], layers: slice) -> dict[str, r.Moments]:
    shape = (layers.stop - layers.start, run.meta.intermediate_size)
    out = {}
    for name, set_rows in rows.items():
        m = r.Moments.zeros(shape)
        for _, acts in run.read_rows(set_rows, layers):
            m.add(acts)
        out[name] = m
    return out


def block_prompt_tops(run: Run, rows: np.ndarray, layers: slice, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per diverse prompt, its n largest |activation| in this block: (values [P, n], flat ids [P, n])."""
    ids = _flat_ids(layers, run.meta.intermediate_size)
    m = min(n, ids.size)
    values = np.empty((rows.size, m), dtype=np.float64)
    chosen = np.empty((rows.size, m), dtype=np.int64)
    for positions, acts in run.read_rows(rows, layers):
        for p, row in zip(positions, acts, strict=True):
            flat = np.abs(row.astype(np.float64)).reshape(-1)
            order = r.top_order(flat, ids, m)
            values[p], chosen[p] = flat[order], ids[order]
    return values, chosen


def merge_prompt_tops(parts: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's global n-th (value, id) in (-value, id) order: the exact threshold of its top set."""
    values = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    thr_v = np.empty(values.shape[0])
    thr_id = np.empty(values.shape[0], dtype=np.int64)
    for i in range(values.shape[0]):
        order = r.top_order(values[i], ids[i], n)
        thr_v[i], thr_id[i] = values[i][order[-1]], ids[i][order[-1]]
    return thr_v, thr_id


def block_counts(run: Run, rows: np.ndarray, layers: slice, fraction: float, scope: str,
                 thresholds: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    width = run.meta.intermediate_size
    ids = _flat_ids(layers, width).reshape(layers.stop - layers.start, width)
    counts = np.zeros(ids.shape, dtype=np.int64)
    for positions, acts in run.read_rows(rows, layers):
        for p, row in zip(positions, acts, strict=True):
            if scope == "per_layer":
                counts += r.prompt_top_mask(row, fraction, "per_layer")
            else:
                assert thresholds is not None
                a = np.abs(row.astype(np.float64))
                v, last = thresholds[0][p], thresholds[1][p]
                counts += (a > v) | ((a == v) & (ids <= last))
    return counts


def block_candidates(delta: np.ndarray, layers: slice, k: int, exclude: list[int],
                     universal: np.ndarray | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """This block's top-k (flat ids, |delta|), with and without the universal filter, for an exact merge."""
    width = delta.shape[1]
    ids = _flat_ids(layers, width)
    excluded = np.isin(np.arange(layers.start, layers.stop), exclude)
    base = np.repeat(~excluded, width)
    scores = np.abs(delta.reshape(-1))
    out = {}
    for key, mask in (("filtered", base if universal is None else base & ~universal.reshape(-1)),
                      ("unfiltered", base)):
        keep = np.flatnonzero(mask)
        order = r.top_order(scores[keep], ids[keep], k)
        out[key] = (ids[keep][order], scores[keep][order])
    return out


def _moments_task(run: Run, rows: dict[str, np.ndarray], layers: slice) -> dict[str, r.Moments]:
    return block_moments(run, rows, layers)


def reduce_store(run: Run, rows: dict[str, np.ndarray], *, k: int, exclude_layers: list[int],
                 universal_fraction: float, universal_threshold: float, universal_scope: str,
                 layers_per_block: int | None = None, mapper: Mapper = local_map) -> r.Reduction:
    """The whole reduction streamed from the store; equals reduce_in_memory over the same rows."""
    meta = run.meta
    blocks = layer_blocks(meta.n_layers, layers_per_block or meta.layers_per_chunk)
    sums = mapper(_moments_task, [(run, {"positive": rows["positive"], "negative": rows["negative"]}, b)
                                  for b in blocks])
    mean_pos = np.concatenate([s["positive"].mean() for s in sums])
    mean_neg = np.concatenate([s["negative"].mean() for s in sums])
    delta = mean_pos - mean_neg
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta holds NaN or inf; the activations are not finite")
    universal = None
    if "diverse" in rows:
        diverse = rows["diverse"]
        thresholds = None
        if universal_scope == "global":
            n = r.n_top(universal_fraction, meta.n_layers * meta.intermediate_size)
            tops = mapper(block_prompt_tops, [(run, diverse, b, n) for b in blocks])
            thresholds = merge_prompt_tops(tops, n)
        counts = np.concatenate(mapper(block_counts, [(run, diverse, b, universal_fraction, universal_scope,
                                                       thresholds) for b in blocks]))
        universal = r.universal_mask(counts, diverse.size, universal_threshold)
    parts = local_map(block_candidates, [(delta[b], b, k, exclude_layers, None if universal is None else universal[b])
                                         for b in blocks])
    merged = {}
    for key in ("filtered", "unfiltered"):
        ids = np.concatenate([p[key][0] for p in parts])
        scores = np.concatenate([p[key][1] for p in parts])
        merged[key] = r.top_ids(scores, ids, k)
    displaced = np.empty(0, dtype=np.int64)
    if universal is not None:
        displaced = merged["unfiltered"][universal.reshape(-1)[merged["unfiltered"]]]
    return r.Reduction(mean_pos, mean_neg, delta, universal, merged["filtered"], displaced)
