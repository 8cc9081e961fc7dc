"""The reduction over a store, memory bounded per task by a few chunks, never by the number of prompts.

Each function is a pure step (Run + rows + block in, small arrays out) so that any mapper runs it: a loop here,
Ray tasks in the driver. Moments and universal counts run one layer block per task. Global-scope universal counting
needs each diverse prompt's own threshold across all layers, so it takes two passes: first, per group of diverse
prompts (whole row chunks, at most `group_cap` prompts), a running top n folded one layer block at a time gives
each prompt's exact n-th (value, id); then per-block counting against those thresholds. The driver only ever holds
[layers, neurons] arrays and one (value, id) pair per diverse prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cna_dist.core import reduce as r
from cna_dist.io.store import Run

Mapper = Callable[[Callable[..., Any], Sequence[tuple]], list[Any]]


def local_map(fn: Callable[..., Any], args: Sequence[tuple]) -> list[Any]:
    return [fn(*a) for a in args]


def layer_blocks(n_layers: int, layers_per_block: int) -> list[slice]:
    return [slice(lo, min(lo + layers_per_block, n_layers)) for lo in range(0, n_layers, layers_per_block)]


def _flat_ids(layers: slice, width: int) -> np.ndarray:
    return np.arange(layers.start * width, layers.stop * width)


def _abs64(row: np.ndarray) -> np.ndarray:
    """|activation| in float64 (exact for float16/float32), one array allocated rather than two."""
    a = row.astype(np.float64)
    return np.abs(a, out=a)


def block_moments(run: Run, rows: dict[str, np.ndarray], layers: slice) -> dict[str, r.Moments]:
    shape = (layers.stop - layers.start, run.meta.intermediate_size)
    out = {}
    for name, set_rows in rows.items():
        m = r.Moments.zeros(shape)
        for _, acts in run.read_rows(set_rows, layers):
            m.add(acts)
        out[name] = m
    return out


def group_cap(run: Run, n: int) -> int:
    """Prompts per threshold task: their running top n ([prompts, n] float64 + int64) within one chunk's bytes.

    At least one prompt, and at most one row chunk's worth, so that a chunk is read by a single task.
    """
    meta = run.meta
    chunk_bytes = meta.rows_per_chunk * meta.layers_per_chunk * meta.intermediate_size * np.dtype(meta.dtype).itemsize
    return max(1, min(meta.rows_per_chunk, chunk_bytes // (16 * n)))


def threshold_groups(rows: np.ndarray, rows_per_chunk: int, cap: int) -> list[np.ndarray]:
    """Positions in `rows` packed into groups of at most `cap`, a row chunk split only when it alone exceeds `cap`.

    Grouping by chunk means no two tasks read the same chunk unless a chunk holds more than `cap` of the prompts.
    """
    order = np.argsort(rows, kind="stable")
    chunks = rows[order] // rows_per_chunk
    groups: list[np.ndarray] = []
    current: list[np.ndarray] = []
    size = 0
    for per_chunk in np.split(order, np.flatnonzero(np.diff(chunks)) + 1):
        for lo in range(0, per_chunk.size, cap):
            piece = per_chunk[lo : lo + cap]
            if current and size + piece.size > cap:
                groups.append(np.concatenate(current))
                current, size = [], 0
            current.append(piece)
            size += piece.size
    if current:
        groups.append(np.concatenate(current))
    return groups


def prompt_thresholds(run: Run, rows: np.ndarray, layers_per_block: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's global n-th (|value|, flat id) in (-value, id) order: the exact threshold of its top set.

    The running top n per prompt starts as (-inf, -1) sentinels, which any real |activation| outranks; folding in
    one layer block at a time keeps memory at [prompts, n] plus one chunk, whatever the number of layers. Only block
    values at or above the running n-th value can enter, so the exact sort sees those few, not the whole block.
    """
    meta = run.meta
    values = np.full((rows.size, n), -np.inf)
    ids = np.full((rows.size, n), -1, dtype=np.int64)
    for layers in layer_blocks(meta.n_layers, layers_per_block):
        block_ids = _flat_ids(layers, meta.intermediate_size)
        for positions, acts in run.read_rows(rows, layers):
            for p, row in zip(positions, acts, strict=True):
                a = _abs64(row).reshape(-1)
                keep = np.flatnonzero(a >= values[p, -1])
                cand_v = np.concatenate([values[p], a[keep]])
                cand_i = np.concatenate([ids[p], block_ids[keep]])
                order = r.top_order(cand_v, cand_i, n)
                values[p], ids[p] = cand_v[order], cand_i[order]
    return values[:, -1].copy(), ids[:, -1].copy()


def global_thresholds(
    run: Run, rows: np.ndarray, layers_per_block: int, n: int, mapper: Mapper
) -> tuple[np.ndarray, np.ndarray]:
    """All diverse prompts' thresholds, one task per group of prompts; the driver keeps 16 bytes per prompt."""
    groups = threshold_groups(rows, run.meta.rows_per_chunk, group_cap(run, n))
    found = mapper(prompt_thresholds, [(run, rows[g], layers_per_block, n) for g in groups])
    thr_v = np.empty(rows.size)
    thr_id = np.empty(rows.size, dtype=np.int64)
    for g, (v, i) in zip(groups, found, strict=True):
        thr_v[g], thr_id[g] = v, i
    return thr_v, thr_id


def block_counts(
    run: Run,
    rows: np.ndarray,
    layers: slice,
    fraction: float,
    scope: str,
    thresholds: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    width = run.meta.intermediate_size
    ids = _flat_ids(layers, width).reshape(layers.stop - layers.start, width)
    counts = np.zeros(ids.shape, dtype=np.int64)
    flat_counts, flat_ids = counts.reshape(-1), ids.reshape(-1)
    for positions, acts in run.read_rows(rows, layers):
        for p, row in zip(positions, acts, strict=True):
            if scope == "per_layer":
                counts += r.prompt_top_mask(row, fraction, "per_layer")
            else:
                assert thresholds is not None
                a = _abs64(row)
                v, last = thresholds[0][p], thresholds[1][p]
                counts += a > v
                ties = np.flatnonzero(a.reshape(-1) == v)  # in the top set up to the threshold's own id
                flat_counts[ties[flat_ids[ties] <= last]] += 1
    return counts


def block_candidates(
    delta: np.ndarray, layers: slice, k: int, exclude: list[int], universal: np.ndarray | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """This block's top-k (flat ids, |delta|), with and without the universal filter, for an exact merge."""
    width = delta.shape[1]
    ids = _flat_ids(layers, width)
    excluded = np.isin(np.arange(layers.start, layers.stop), exclude)
    base = np.repeat(~excluded, width)
    scores = np.abs(delta.reshape(-1))
    out = {}
    for key, mask in (("filtered", base if universal is None else base & ~universal.reshape(-1)), ("unfiltered", base)):
        keep = np.flatnonzero(mask)
        order = r.top_order(scores[keep], ids[keep], k)
        out[key] = (ids[keep][order], scores[keep][order])
    return out


def _moments_task(run: Run, rows: dict[str, np.ndarray], layers: slice) -> dict[str, r.Moments]:
    return block_moments(run, rows, layers)


def means(run: Run, rows: dict[str, np.ndarray], blocks: list[slice], mapper: Mapper) -> tuple[np.ndarray, ...]:
    """mean_pos, mean_neg and their delta [layers, neurons], one task per layer block (float64 sums)."""
    pair = {"positive": rows["positive"], "negative": rows["negative"]}
    sums = mapper(_moments_task, [(run, pair, b) for b in blocks])
    mean_pos = np.concatenate([s["positive"].mean() for s in sums])
    mean_neg = np.concatenate([s["negative"].mean() for s in sums])
    del sums  # the driver holds [layers, neurons] arrays only: drop the per-block sums before the next pass
    delta = mean_pos - mean_neg
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta holds NaN or inf; the activations are not finite")
    return mean_pos, mean_neg, delta


def universal_neurons(
    run: Run, diverse: np.ndarray, blocks: list[slice], fraction: float, threshold: float, scope: str, mapper: Mapper
) -> np.ndarray:
    """Bool [layers, neurons]: in the top `fraction` of at least `threshold` of the diverse prompts."""
    meta = run.meta
    thresholds = None
    if scope == "global":
        n = r.n_top(fraction, meta.n_layers * meta.intermediate_size)
        thresholds = global_thresholds(run, diverse, blocks[0].stop - blocks[0].start, n, mapper)
    counts = np.concatenate(mapper(block_counts, [(run, diverse, b, fraction, scope, thresholds) for b in blocks]))
    return r.universal_mask(counts, diverse.size, threshold)


def merged_selection(
    delta: np.ndarray, blocks: list[slice], k: int, exclude_layers: list[int], universal: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact global top k (ranked flat ids) merged from each block's, and the universal neurons it displaced."""
    parts = local_map(
        block_candidates,
        [(delta[b], b, k, exclude_layers, None if universal is None else universal[b]) for b in blocks],
    )
    merged = {}
    for key in ("filtered", "unfiltered"):
        ids = np.concatenate([p[key][0] for p in parts])
        scores = np.concatenate([p[key][1] for p in parts])
        merged[key] = r.top_ids(scores, ids, k)
    displaced = np.empty(0, dtype=np.int64)
    if universal is not None:
        displaced = merged["unfiltered"][universal.reshape(-1)[merged["unfiltered"]]]
    return merged["filtered"], displaced


def reduce_store(
    run: Run,
    rows: dict[str, np.ndarray],
    *,
    k: int,
    exclude_layers: list[int],
    universal_fraction: float,
    universal_threshold: float,
    universal_scope: str,
    layers_per_block: int | None = None,
    mapper: Mapper = local_map,
) -> r.Reduction:
    """The whole reduction streamed from the store; equals reduce_in_memory over the same rows."""
    blocks = layer_blocks(run.meta.n_layers, layers_per_block or run.meta.layers_per_chunk)
    mean_pos, mean_neg, delta = means(run, rows, blocks, mapper)
    universal = None
    if "diverse" in rows:
        universal = universal_neurons(
            run, rows["diverse"], blocks, universal_fraction, universal_threshold, universal_scope, mapper
        )
    selected, displaced = merged_selection(delta, blocks, k, exclude_layers, universal)
    return r.Reduction(mean_pos, mean_neg, delta, universal, selected, displaced)
