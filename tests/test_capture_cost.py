"""Capture computes only what rows need: a shared prefix once, nothing past the last down_proj input, little padding.

Rows stay equal to the one-prompt, unpadded, full-model reference (float32, 1e-5 relative, as in test_capture).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cna_dist.model import capture as cap
from cna_dist.model import hf
from cna_dist.model import prefix as prefixmod
from cna_dist.model.batching import plan_batches
from tests.test_capture import reference_capture


def prompts_with_prefix(vocab: int, n: int, shared: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    head = rng.integers(4, vocab, size=shared).tolist()
    return [head + rng.integers(4, vocab, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen"])
def test_shared_prefix_once_and_rows_equal_the_reference(
    which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = hf.load(request.getfixturevalue(which), dtype="float32")
    token_ids = prompts_with_prefix(model.config.vocab_size, 6, shared=20, seed=3)
    token_ids.append(token_ids[0][:21])  # one token past the prefix: its last token is never in the prefix
    prefixes: list[int] = []
    real = prefixmod.SharedPrefix.__init__

    def spy(self, decoder, prefix, device) -> None:
        prefixes.append(len(prefix))
        real(self, decoder, prefix, device)

    monkeypatch.setattr(prefixmod.SharedPrefix, "__init__", spy)
    expected = np.stack([reference_capture(model, ids) for ids in token_ids])
    scale = np.abs(expected).max(axis=2, keepdims=True)
    for batch_size in (1, 7):
        got, _ = cap.capture(
            model, token_ids, tokenizer.pad_token_id, dtype="float32", token_budget=10**6, max_batch_size=batch_size
        )
        assert (np.abs(got - expected) / scale).max() < 1e-5, batch_size
    assert prefixes == [20, 20]


def test_shared_length_leaves_every_last_token_and_skips_short_prefixes() -> None:
    assert prefixmod.shared_length([[1] * 10 + [2], [1] * 10 + [3, 4]]) == 10
    assert prefixmod.shared_length([[1] * 10, [1] * 12]) == 9  # the shorter prompt keeps its last token
    assert prefixmod.shared_length([[1] * 5 + [2], [1] * 5 + [3]]) == 0  # under MIN_PREFIX
    assert prefixmod.shared_length([[1] * 20]) == 0


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
        assert calls == ["up_proj rows 1"]  # the last MLP on the last position only; no down_proj, no final norm
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
