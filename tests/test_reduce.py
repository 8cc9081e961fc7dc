"""The reduction against brute force: ties, exclusions, both universal scopes, float64 means."""

from __future__ import annotations

import numpy as np
import pytest

from cna_dist.reduce import cna as r


def brute_select(delta: np.ndarray, k: int, exclude: list[int], universal: np.ndarray | None) -> list[tuple[int, int]]:
    cands = [
        (layer, j)
        for layer in range(delta.shape[0])
        for j in range(delta.shape[1])
        if layer not in exclude and (universal is None or not universal[layer, j])
    ]
    cands.sort(key=lambda lj: (-abs(delta[lj]), lj))
    return cands[:k]


def brute_counts(acts: np.ndarray, fraction: float, scope: str) -> np.ndarray:
    n_prompts, n_layers, width = acts.shape
    counts = np.zeros((n_layers, width), dtype=int)
    for p in range(n_prompts):
        if scope == "global":
            items = [(-abs(float(acts[p, layer, j])), layer, j) for layer in range(n_layers) for j in range(width)]
            items.sort()
            for _, layer, j in items[: max(1, int(fraction * n_layers * width))]:
                counts[layer, j] += 1
        else:
            for layer in range(n_layers):
                items = sorted((-abs(float(acts[p, layer, j])), j) for j in range(width))
                for _, j in items[: max(1, int(fraction * width))]:
                    counts[layer, j] += 1
    return counts


def as_pairs(flat: np.ndarray, width: int) -> list[tuple[int, int]]:
    return [(int(i // width), int(i % width)) for i in flat]


@pytest.mark.parametrize("seed", range(12))
def test_select_matches_brute_force_with_ties_and_exclusions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_layers, width = rng.integers(2, 7), rng.integers(3, 40)
    # Few distinct values, both signs: many exact ties in |delta|.
    delta = rng.integers(-4, 5, size=(n_layers, width)).astype(np.float64) * 0.5
    exclude = sorted(set(rng.integers(0, n_layers, size=rng.integers(0, 3)).tolist()))
    universal = rng.random((n_layers, width)) < 0.2
    for k in (1, 3, 17, n_layers * width):
        for uni in (None, universal):
            got = as_pairs(r.select(delta, k, exclude, uni), width)
            assert got == brute_select(delta, k, exclude, uni)


def test_select_rejects_nan() -> None:
    delta = np.zeros((3, 4))
    delta[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        r.select(delta, 2, [], None)


@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("seed", range(6))
def test_universal_counts_match_brute_force(scope: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    acts = rng.integers(-3, 4, size=(7, 4, 25)).astype(np.float16)  # ties everywhere
    for fraction in (0.001, 0.05, 0.2):
        np.testing.assert_array_equal(r.universal_counts(acts, fraction, scope), brute_counts(acts, fraction, scope))


def test_prompt_top_mask_takes_exactly_n() -> None:
    acts = np.ones((3, 10), dtype=np.float32)  # all tied: the smallest ids win
    mask = r.prompt_top_mask(acts, 0.1, "global")
    assert mask.sum() == 3 and mask[0, :3].all()
    mask = r.prompt_top_mask(acts, 0.25, "per_layer")
    assert mask.sum() == 6 and mask[:, :2].all()


def test_min_count_is_robust_to_float_products() -> None:
    assert r.min_count(0.7, 10) == 7  # 0.7 * 10 == 7.000000000000001 in float
    assert r.min_count(0.8, 5) == 4
    assert r.min_count(0.8, 6) == 5
    counts = np.array([[6, 7, 8]])
    np.testing.assert_array_equal(r.universal_mask(counts, 10, 0.7), [[False, True, True]])


def test_moments_are_float64_and_mergeable() -> None:
    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((101, 3, 8)) * 1000).astype(np.float16)
    whole = r.Moments.zeros((3, 8)).add(acts)
    split = r.Moments.zeros((3, 8)).add(acts[:40]).merge(r.Moments.zeros((3, 8)).add(acts[40:]))
    expected = acts.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(whole.mean(), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(split.mean(), expected, rtol=0, atol=1e-9)
    assert whole.sum.dtype == np.float64


def test_reduce_in_memory_keeps_universal_out_and_records_displaced() -> None:
    rng = np.random.default_rng(1)
    pos = rng.standard_normal((20, 4, 50)) * 0.1
    neg = rng.standard_normal((20, 4, 50)) * 0.1
    div = rng.standard_normal((10, 4, 50)) * 0.1
    pos[:, 3, 7] += 2.0  # the planted signal
    for acts in (pos, neg, div):
        acts[:, 2, 5] += 100.0  # universal: huge everywhere...
    pos[:, 2, 5] += 5.0  # ...and stronger on the positive set
    red = r.reduce_in_memory(
        {"positive": pos, "negative": neg, "diverse": div},
        k=1,
        exclude_layers=[0, 1],
        universal_fraction=0.005,
        universal_threshold=0.8,
        universal_scope="global",
    )
    assert as_pairs(red.selected, 50) == [(3, 7)]
    assert as_pairs(red.displaced, 50) == [(2, 5)]
    assert red.universal is not None and red.universal[2, 5]
