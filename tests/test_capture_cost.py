"""Capture computes only what rows need: nothing past the last down_proj input, little padding.

Rows stay equal to the one-prompt, unpadded, full-model reference (float32, 1e-5 relative, as in test_capture).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cna_dist.capture import hf
from cna_dist.capture import single as cap
from cna_dist.prompts.batching import plan_batches
from tests.test_capture import reference_capture


def test_nothing_after_the_last_down_proj_input_runs_and_the_model_is_unchanged_outside(tiny_llama) -> None:
    model, tokenizer = hf.load(tiny_llama, dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(ids).logits
    calls: list[str] = []
    last = model.model.layers[-1]
    model.model.norm.register_forward_hook(lambda *a: calls.append("norm"))
    last.mlp.down_proj.register_forward_hook(lambda *a: calls.append("down_proj"))
    last.mlp.up_proj.register_forward_hook(lambda m, args, out: calls.append(f"up_proj rows {out.shape[1]}"))
    with cap.Capturer(model) as capturer:
        got, _ = cap.capture_with(capturer, [[5, 6, 7, 8, 9], [5, 6, 7]], tokenizer.pad_token_id, dtype="float32")
        assert calls == ["up_proj rows 5"]  # the last MLP's input is computed as before; no down_proj, no final norm
        with torch.no_grad():
            after = model(ids).logits  # hooks still registered, inactive: generation and steering see no change
    assert torch.equal(before, after)
    np.testing.assert_allclose(got[0], reference_capture(model, [5, 6, 7, 8, 9]), rtol=0, atol=1e-5)


def brute_force(lengths: list[int], budget: int, rows: int, overhead: int) -> int:
    """The least padded tokens + overhead per batch over every way of cutting the sorted lengths."""
    sizes = sorted(lengths)
    best = None
    for cuts in itertools.product([False, True], repeat=len(sizes) - 1):
        batches, current = [], [sizes[0]]
        for size, cut in zip(sizes[1:], cuts, strict=True):
            if cut:
                batches.append(current)
                current = []
            current.append(size)
        batches.append(current)
        if any(len(b) > rows or (len(b) > 1 and len(b) * b[-1] > budget) for b in batches):
            continue
        cost = sum(len(b) * b[-1] + overhead for b in batches)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_batch_plan_wastes_the_least_padding_within_the_limits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=9).tolist()
    budget, rows, overhead = 120, 4, int(rng.integers(0, 40))
    plan = plan_batches(lengths, budget, rows, overhead_tokens=overhead)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert all(len(b) <= rows and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget) for b in plan)
    cost = sum(len(b) * max(lengths[i] for i in b) + overhead for b in plan)
    assert cost == brute_force(lengths, budget, rows, overhead)
