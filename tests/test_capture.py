"""Batched, left-padded capture equals one-prompt unpadded capture (float32, 1e-5 relative)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cna_dist.capture import hf, plumbing
from cna_dist.capture.single import Capturer
from cna_dist.model import checkpoint as modelmod
from cna_dist.prompts import sets as promptsmod
from cna_dist.prompts.batching import collate, plan_batches
from tests.helpers import capture


def reference_capture(model, ids: list[int]) -> np.ndarray:
    """The reference method: one prompt, no padding, hooks registered for this prompt only, full model."""
    acts = {}
    handles = []
    for layer, proj in enumerate(hf.down_projs(model)):

        def hook(module, args, layer=layer):
            acts[layer] = args[0][0, -1].detach().float().clone()

        handles.append(proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([acts[i] for i in range(len(acts))]).numpy()


def random_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[1, 2, 3, 250, 7, 120], rng.integers(1, 200, size=n - 6)])
    return [rng.integers(4, vocab, size=int(length)).tolist() for length in lengths]


def distinct_plans(lengths: list[int], max_batch_sizes: range) -> dict[tuple, list[int]]:
    """Each distinct batch plan the planner makes over these row limits -> the limits that give it. Capture at two
    limits with the same plan runs the same forwards on the same padded batches, so one run checks them all."""
    plans: dict[tuple, list[int]] = {}
    for batch_size in max_batch_sizes:
        plan = tuple(map(tuple, plan_batches(lengths, token_budget=10**9, max_batch_size=batch_size)))
        plans.setdefault(plan, []).append(batch_size)
    return plans


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen"])
def test_batched_equals_single_for_every_batch_size(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    model, tokenizer = hf.load(path, dtype="float32")
    token_ids = random_prompts(model.config.vocab_size, 64, seed=len(which))
    expected = np.stack([reference_capture(model, t) for t in token_ids])
    scale = np.abs(expected).max(axis=2, keepdims=True)  # relative to each layer's magnitude for this prompt
    plans = distinct_plans([len(t) for t in token_ids], range(1, 65))
    assert sorted(b for sizes in plans.values() for b in sizes) == list(range(1, 65))
    for sizes in plans.values():  # every batch size 1..64, each distinct plan run once
        got, overflow = capture(
            model, token_ids, tokenizer.pad_token_id, dtype="float32", token_budget=10**9, max_batch_size=sizes[0]
        )
        assert overflow == 0
        err = np.abs(got - expected) / scale
        assert err.max() < 1e-5, (sizes, float(err.max()))
    # and all 64 prompts in one batch (lengths 1 to 250): the most padding a row can get, which the planner avoids
    with Capturer(model) as capturer:
        overflow = torch.zeros((), dtype=torch.int64)
        whole = capturer.submit(collate(token_ids, list(range(64)), tokenizer.pad_token_id), "float32", overflow)
        err = np.abs(whole.result() - expected) / scale
    assert int(overflow) == 0 and err.max() < 1e-5, float(err.max())


def test_token_budget_bounds_padded_batch_size() -> None:
    lengths = [5, 50, 3, 40, 41, 2, 500, 9]
    batches = plan_batches(lengths, token_budget=100, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
    assert [6] in batches  # longer than the budget: alone, not cut


def test_chat_template_rendering_has_one_bos(tiny_llama: Path) -> None:
    _, tokenizer = hf.load(tiny_llama, dtype="float32")
    assert promptsmod.use_chat_template(tokenizer, None)
    rendered = promptsmod.render(tokenizer, "how do i bake a cake", chat=True)
    ids = promptsmod.encode(tokenizer, rendered, chat=True)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    plain = promptsmod.encode(tokenizer, "how do i bake a cake", chat=False)
    assert plain.count(tokenizer.bos_token_id) == 1


def test_float16_overflow_saturates_and_is_counted() -> None:
    values = torch.tensor([[1.0, 70000.0, -1e6, 3.0]])
    overflow = torch.zeros((), dtype=torch.int64)
    stored = plumbing.to_store(values, "float16", overflow).numpy()
    assert int(overflow) == 2 and stored.dtype == np.float16
    assert stored.tolist() == [[1.0, plumbing.FLOAT16_MAX, -plumbing.FLOAT16_MAX, 3.0]]  # saturated, never inf


def test_capture_skips_lm_head(tiny_llama: Path) -> None:
    model, tokenizer = hf.load(tiny_llama, dtype="float32")
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        capture(model, [[5, 6, 7]], tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert calls == []


def test_unsupported_architecture_is_clear(tmp_path: Path) -> None:
    from cna_dist.errors import BadInput

    with pytest.raises(BadInput, match="unsupported model_type 'gpt2'"):
        modelmod.info_from_config({"model_type": "gpt2"}, str(tmp_path))
