"""The reduction over a store, memory bounded per task by a few chunks, never by the number of prompts.

Each function is a pure step (Run + rows + block in, small arrays out) so that any mapper runs it: a loop here,
Ray tasks in the driver. Moments (and per-layer universal counts) run one layer block per task. Global-scope
universal counting needs each diverse prompt's top set across all layers: per group of diverse prompts (whole row
chunks, at most `group_cap` prompts), a running top n folded one layer block at a time gives each prompt's exact
top set, and the task returns how often each neuron is in them. So every row is read once. The mapper hands results
over one at a time and the driver folds each in, so it only ever holds [layers, neurons] arrays and one task's
result, whatever the number of prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from cna_dist.reduce import cna as r
from cna_dist.store.activations import Run

# fn, its argument tuples -> its results in order; an iterator may compute or fetch them as they are consumed.
Mapper = Callable[[Callable[..., Any], Sequence[tuple]], Iterable[Any]]


def local_map(fn: Callable[..., Any], args: Sequence[tuple]) -> list[Any]:
    return [fn(*a) for a in args]


def layer_blocks(n_layers: int, layers_per_block: int) -> list[slice]:
    return [slice(lo, min(lo + layers_per_block, n_layers)) for lo in range(0, n_layers, layers_per_block)]


def _flat_ids(layers: slice, width: int) -> np.ndarray:
    return np.arange(layers.start * width, layers.stop * width)


def _keys(acts: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """|activation| keys of a block of rows, made in place: read_rows hands over arrays of our own, read only to be
    ranked here (see core.reduce.magnitude_keys). A NaN is an error naming its row."""
    dtype = acts.dtype
    keys = r.magnitude_keys(acts, in_place=True)
    if r.nan_key_above(keys, dtype):
        bad = positions[[r.nan_key_above(k, dtype) for k in keys]]
        raise ValueError(f"store rows {sorted(set(rows[bad].tolist()))[:5]} hold NaN; the activations are not finite")
    return keys


def _widened(acts: np.ndarray, spare: list[np.ndarray]) -> np.ndarray:
    """float16 rows as float32 (exact) in a buffer reused across chunks, so the float64 sums run at memory speed.

    numpy widens float16 one value at a time (about 1 GB/s, slower than reading the chunk); torch's copy uses the
    CPU's conversion instructions (about 10 GB/s). The sums are unchanged: every float16 is a float32.
    """
    if acts.dtype != np.float16:
        return acts
    import torch

    if not spare or spare[0].size < acts.size:
        spare[:] = [np.empty(acts.size, np.float32)]
    out = spare[0][: acts.size].reshape(acts.shape)
    torch.from_numpy(out).copy_(torch.from_numpy(acts))
    return out


def block_moments(run: Run, rows: dict[str, np.ndarray], layers: slice) -> dict[str, r.Moments]:
    """Every set's float64 sums over one layer block, each chunk read once even where the sets share it."""
    shape = (layers.stop - layers.start, run.meta.intermediate_size)
    names = list(rows)
    union = np.concatenate([rows[name] for name in names])
    label = np.repeat(np.arange(len(names)), [rows[name].size for name in names])
    out = {name: r.Moments.zeros(shape) for name in names}
    spare: list[np.ndarray] = []
    for positions, acts in run.read_rows(union, layers):
        wide = _widened(acts, spare)
        mine = label[positions]
        for i, name in enumerate(names):
            picked = mine == i
            if picked.all():
                out[name].add(wide)
            elif picked.any():
                out[name].add(wide[picked])
    return out


def group_cap(run: Run, n: int) -> int:
    """Prompts per threshold task: their running top n ([prompts, n] int64 keys + int64 ids) within one chunk's bytes.

    At least one prompt, and at most one row chunk's worth, so that a chunk is read by a single task.
    """
    meta = run.meta
    chunk_bytes = meta.rows_per_chunk * meta.layers_per_chunk * meta.intermediate_size * np.dtype(meta.dtype).itemsize
    return max(1, min(meta.rows_per_chunk, chunk_bytes // (16 * n)))


def prompt_groups(rows: np.ndarray, rows_per_chunk: int, cap: int) -> list[np.ndarray]:
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


def group_top_counts(run: Run, rows: np.ndarray, layers_per_block: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's top n neurons over all layers, by |value| then the smaller id, counted: (flat ids, counts).

    The running top n per prompt holds integer keys of |value| (core.reduce.magnitude_keys) and starts as (-1, -1)
    sentinels, below any real key; folding in one layer block at a time keeps memory at [prompts, n] plus one chunk,
    whatever the number of layers. Only block values at or above the running n-th key can enter, so the exact sort
    sees those few, not the whole block. The result has at most [prompts, n] entries: the group's top sets.
    """
    values = np.full((rows.size, n), -1, dtype=np.int64)
    ids = np.full((rows.size, n), -1, dtype=np.int64)
    width = run.meta.intermediate_size
    for layers, positions, acts in run.read_blocks(rows, layer_blocks(run.meta.n_layers, layers_per_block)):
        keys = _keys(acts, rows, positions).reshape(positions.size, -1)
        for p, row in zip(positions, keys, strict=True):
            keep = _candidates(row, int(values[p, -1]), n)
            cand_v = np.concatenate([values[p], row[keep]])
            cand_i = np.concatenate([ids[p], layers.start * width + keep])
            order = r.top_order(cand_v, cand_i, n)
            values[p], ids[p] = cand_v[order], cand_i[order]
    return np.unique(ids, return_counts=True)


def _candidates(row: np.ndarray, running: int, n: int) -> np.ndarray:
    """Positions in `row` that can enter a running top n whose n-th key is `running` (-1: not yet full).

    Full, that is every key at or above `running` (Python ints keep comparisons in the keys' own width). Not yet
    full, any floor with at least n of the row's keys at or above it will do (below it, n of the row's keys
    outrank a key): a sample's order statistic usually gives one with about 2n candidates, checked by counting;
    else the row's own n-th key, by a partition of the whole row.
    """
    if running >= 0:
        return np.flatnonzero(row >= running)
    if row.size <= n:
        return np.arange(row.size)
    stride = row.size // (8 * n)
    if stride > 1:
        sample = row[::stride]
        q = min(sample.size, 2 * (n // stride) + 1)
        keep = np.flatnonzero(row >= int(np.partition(sample, sample.size - q)[sample.size - q]))
        if keep.size >= n:
            return keep
    return np.flatnonzero(row >= int(np.partition(row, row.size - n)[row.size - n]))


def global_counts(run: Run, rows: np.ndarray, layers_per_block: int, n: int, mapper: Mapper) -> np.ndarray:
    """[layers, neurons]: in how many diverse prompts' global top n each neuron is; one task per group of prompts."""
    meta = run.meta
    counts = np.zeros(meta.n_layers * meta.intermediate_size, dtype=np.int64)
    groups = prompt_groups(rows, meta.rows_per_chunk, group_cap(run, n))
    for ids, found in mapper(group_top_counts, [(run, rows[g], layers_per_block, n) for g in groups]):
        counts[ids] += found
    return counts.reshape(meta.n_layers, meta.intermediate_size)


def layer_counts(run: Run, rows: np.ndarray, layers: slice, fraction: float) -> np.ndarray:
    """Per-layer scope, one layer block: in how many prompts' per-layer top fraction each neuron is."""
    counts = np.zeros((layers.stop - layers.start, run.meta.intermediate_size), dtype=np.int64)
    for _, acts in run.read_rows(rows, layers):
        for row in acts:
            counts += r.prompt_top_mask(row, fraction, "per_layer")
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
    shape = (run.meta.n_layers, run.meta.intermediate_size)
    mean_pos, mean_neg = np.empty(shape), np.empty(shape)
    for b, sums in zip(blocks, mapper(_moments_task, [(run, pair, b) for b in blocks]), strict=True):
        mean_pos[b], mean_neg[b] = sums["positive"].mean(), sums["negative"].mean()
    delta = mean_pos - mean_neg
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta holds NaN or inf; the activations are not finite")
    return mean_pos, mean_neg, delta


def universal_neurons(
    run: Run, diverse: np.ndarray, blocks: list[slice], fraction: float, threshold: float, scope: str, mapper: Mapper
) -> np.ndarray:
    """Bool [layers, neurons]: in the top `fraction` of at least `threshold` of the diverse prompts."""
    meta = run.meta
    if scope == "global":
        n = r.n_top(fraction, meta.n_layers * meta.intermediate_size)
        counts = global_counts(run, diverse, blocks[0].stop - blocks[0].start, n, mapper)
    elif scope == "per_layer":
        counts = np.empty((meta.n_layers, meta.intermediate_size), dtype=np.int64)
        for b, found in zip(blocks, mapper(layer_counts, [(run, diverse, b, fraction) for b in blocks]), strict=True):
            counts[b] = found
    else:
        raise ValueError(f"unknown universal scope {scope!r}")
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
