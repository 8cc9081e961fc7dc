"""The CNA reduction in plain numpy: float64 means, delta, universal counts, exact top-k selection.

Neurons are addressed by a flat id `layer * intermediate_size + neuron`, so "ties go to the smaller
(layer, neuron)" is simply "ties go to the smaller flat id". Every function here takes and returns
arrays and is used unchanged by the in-memory path and by the distributed reduce's per-block tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def n_top(fraction: float, n: int) -> int:
    """How many neurons a fraction of n means: at least one, rounded down (spec §1)."""
    return max(1, int(fraction * n))


@dataclass
class Moments:
    """Running float64 sum and count of one prompt set, mergeable across shards."""

    sum: np.ndarray
    count: int = 0

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> Moments:
        return cls(np.zeros(shape, dtype=np.float64), 0)

    def add(self, acts: np.ndarray) -> Moments:
        """Add a block of rows [rows, ...]; the sum runs in float64 whatever the stored dtype."""
        self.sum += acts.sum(axis=0, dtype=np.float64)
        self.count += acts.shape[0]
        return self

    def merge(self, other: Moments) -> Moments:
        return Moments(self.sum + other.sum, self.count + other.count)

    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("mean of an empty prompt set")
        return self.sum / self.count


def top_order(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, largest first, ties to the smaller id. Exact for any k.

    argpartition narrows to the k-th score; only the candidates at or above it are sorted.
    """
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k < n:
        kth = np.partition(scores, n - k)[n - k]
        keep = np.flatnonzero(scores >= kth)
    else:
        keep = np.arange(n)
    order = np.lexsort((ids[keep], -scores[keep]))
    return keep[order[:k]]


def top_ids(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    return ids[top_order(scores, ids, k)]


# |x| as an unsigned integer of the same width: IEEE floats order by their bits once the sign bit is cleared, so
# comparisons, partitions and ties on these keys are exactly those on |x| (-0.0 == 0.0, subnormals in order), at
# integer speed and with no float64 copy. A NaN's key is above the infinity's, so callers can tell it apart.
_KEY_BITS = {2: (np.uint16, 0x7FFF, 0x7C00), 4: (np.uint32, 0x7FFFFFFF, 0x7F800000)}


def _key_bits(dtype: np.dtype) -> tuple[type, int, int]:
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or dtype.itemsize not in _KEY_BITS:
        raise ValueError(f"magnitude keys need float16 or float32, not {dtype}")
    return _KEY_BITS[dtype.itemsize]


def magnitude_keys(acts: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Integer keys ordered as |acts|; `nan_key_above` tells whether any was NaN.

    `in_place` overwrites `acts` (its sign bits) rather than allocating: for a block read only to be ranked.
    """
    view, mask, _ = _key_bits(acts.dtype)
    bits = acts.view(view)
    return np.bitwise_and(bits, view(mask), out=bits if in_place else None)


def nan_key_above(keys: np.ndarray, dtype: np.dtype) -> bool:
    return keys.size > 0 and int(keys.max()) > _key_bits(dtype)[2]


def keys_of(magnitudes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The keys of |values| given as float64 magnitudes of `dtype` values (exact: each is a `dtype` value)."""
    return magnitude_keys(np.asarray(magnitudes).astype(dtype))


def magnitudes_of(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 |value| of each key: the inverse of `keys_of`."""
    view, _, _ = _key_bits(dtype)
    return np.asarray(keys).astype(view).view(dtype).astype(np.float64)


def prompt_top_mask(acts: np.ndarray, fraction: float, scope: str) -> np.ndarray:
    """Boolean [layers, neurons]: the prompt's top fraction of neurons by |activation|, exactly n of them."""
    a = np.abs(acts.astype(np.float64, copy=False))
    n_layers, width = a.shape
    mask = np.zeros(a.shape, dtype=bool)
    if scope == "global":
        flat = a.reshape(-1)
        chosen = top_ids(flat, np.arange(flat.size), n_top(fraction, flat.size))
        mask.reshape(-1)[chosen] = True
    elif scope == "per_layer":
        n = n_top(fraction, width)
        ids = np.arange(width)
        for layer in range(n_layers):
            mask[layer, top_ids(a[layer], ids, n)] = True
    else:
        raise ValueError(f"unknown universal scope {scope!r}")
    return mask


def universal_counts(acts: np.ndarray, fraction: float, scope: str) -> np.ndarray:
    """For each neuron, in how many prompts [prompt, layer, neuron] it is in that prompt's top set."""
    counts = np.zeros(acts.shape[1:], dtype=np.int64)
    for row in acts:
        counts += prompt_top_mask(row, fraction, scope)
    return counts


def min_count(threshold: float, n_prompts: int) -> int:
    """Smallest count meeting `count / n_prompts >= threshold`, robust to 0.7 * 10 = 7.000000000000001."""
    return max(1, math.ceil(threshold * n_prompts - 1e-9))


def universal_mask(counts: np.ndarray, n_prompts: int, threshold: float) -> np.ndarray:
    return counts >= min_count(threshold, n_prompts)


def candidate_mask(shape: tuple[int, int], exclude_layers: list[int], universal: np.ndarray | None) -> np.ndarray:
    mask = np.ones(shape, dtype=bool)
    mask[[layer for layer in exclude_layers if layer < shape[0]]] = False
    if universal is not None:
        mask &= ~universal
    return mask


def select(delta: np.ndarray, k: int, exclude_layers: list[int], universal: np.ndarray | None = None) -> np.ndarray:
    """Flat ids of the circuit: the k candidates of largest |delta|, ties to the smaller (layer, neuron)."""
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta holds NaN or inf; the activations are not finite")
    mask = candidate_mask(delta.shape, exclude_layers, universal).reshape(-1)
    ids = np.flatnonzero(mask)
    return top_ids(np.abs(delta.reshape(-1)[ids]), ids, k)


def displaced_universal(delta: np.ndarray, k: int, exclude_layers: list[int], universal: np.ndarray) -> np.ndarray:
    """Universal neurons that would have entered the top k without the universal filter (flat ids, ranked)."""
    unfiltered = select(delta, k, exclude_layers, None)
    return unfiltered[universal.reshape(-1)[unfiltered]]


@dataclass
class Reduction:
    """What the circuit is assembled from, whichever path (in memory or distributed) computed it."""

    mean_pos: np.ndarray
    mean_neg: np.ndarray
    delta: np.ndarray
    universal: np.ndarray | None  # bool [layers, neurons]; None without a diverse set
    selected: np.ndarray  # ranked flat ids
    displaced: np.ndarray  # ranked flat ids of universal neurons kept out of the top k


def reduce_in_memory(
    acts: dict[str, np.ndarray],
    k: int,
    exclude_layers: list[int],
    universal_fraction: float,
    universal_threshold: float,
    universal_scope: str,
) -> Reduction:
    """The whole reduction over activations held in memory: [prompt, layer, neuron] per set."""
    shape = acts["positive"].shape[1:]
    mean_pos = Moments.zeros(shape).add(acts["positive"]).mean()
    mean_neg = Moments.zeros(shape).add(acts["negative"]).mean()
    delta = mean_pos - mean_neg
    universal = None
    displaced = np.empty(0, dtype=np.int64)
    if "diverse" in acts:
        counts = universal_counts(acts["diverse"], universal_fraction, universal_scope)
        universal = universal_mask(counts, acts["diverse"].shape[0], universal_threshold)
        displaced = displaced_universal(delta, k, exclude_layers, universal)
    return Reduction(mean_pos, mean_neg, delta, universal, select(delta, k, exclude_layers, universal), displaced)
