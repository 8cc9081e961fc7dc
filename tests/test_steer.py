"""CAA baseline: contrastive MLP-output vectors (padding-proof), exact addition, alpha = 0 exactness, layer choice.

Neuron scaling (`steer.steered`) is covered in test_circuit.py and test_generate.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cna_dist.capture import hf
from cna_dist.demo.words import demo_prompts
from cna_dist.model import generate as gen
from cna_dist.prompts import sets as promptsmod
from cna_dist.steer import hooks as steer


@pytest.fixture(scope="module")
def llama(tiny_llama: Path):
    return hf.load(tiny_llama, dtype="float32")


@pytest.fixture(scope="module")
def prompt_ids(llama) -> tuple[list[list[int]], list[list[int]]]:
    _, tokenizer = llama
    sets = demo_prompts()

    def enc(texts: list[str]) -> list[list[int]]:
        return [promptsmod.encode(tokenizer, promptsmod.render(tokenizer, t, True), True) for t in texts]

    # Mixed lengths on both sides, so batches really are padded.
    return enc(sets["positive"][:7] + ["bomb"]), enc(sets["negative"][:5] + ["cake", sets["diverse"][0]])


def reference_vectors(model, pos: list[list[int]], neg: list[list[int]], layers: list[int]) -> dict[int, torch.Tensor]:
    """One prompt at a time, unpadded, full model: the definition, not the batched path."""

    def mean(prompts: list[list[int]]) -> dict[int, torch.Tensor]:
        sums = {layer: torch.zeros(model.config.hidden_size, dtype=torch.float64) for layer in layers}
        for ids in prompts:
            seen: dict[int, torch.Tensor] = {}

            def hook(module, args, out, layer: int, seen: dict = seen) -> None:
                seen[layer] = out[0, -1].double()

            handles = [
                model.model.layers[layer].mlp.register_forward_hook(
                    lambda m, a, out, layer=layer: hook(m, a, out, layer)
                )
                for layer in layers
            ]
            try:
                with torch.no_grad():
                    model(torch.tensor([ids]))
            finally:
                for h in handles:
                    h.remove()
            for layer in layers:
                sums[layer] += seen[layer]
        return {layer: s / len(prompts) for layer, s in sums.items()}

    p, n = mean(pos), mean(neg)
    return {layer: p[layer] - n[layer] for layer in layers}


def no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_vectors_shape_dtype_and_match_unpadded_reference(llama, prompt_ids) -> None:
    model, tokenizer = llama
    pos, neg = prompt_ids
    layers = [2, 0, 3]
    expected = reference_vectors(model, pos, neg, sorted(layers))
    for batch_size, budget in [(64, 8192), (3, 8192), (4, 40), (1, 8192)]:
        got = steer.caa_vectors(
            model, pos, neg, tokenizer.pad_token_id, layers, token_budget=budget, max_batch_size=batch_size
        )
        assert list(got) == [0, 2, 3]
        for layer, vec in got.items():
            assert vec.shape == (model.config.hidden_size,) and vec.dtype == torch.float32
            ref = expected[layer]
            err = float((vec.double() - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, (batch_size, layer, err)
    assert no_hooks_left(model)


def test_vectors_of_the_top_layer_skip_nothing_and_errors(llama, prompt_ids) -> None:
    model, tokenizer = llama
    pos, neg = prompt_ids
    top = model.config.num_hidden_layers - 1
    got = steer.caa_vectors(model, pos[:2], neg[:2], tokenizer.pad_token_id, [top])
    ref = reference_vectors(model, pos[:2], neg[:2], [top])[top]
    assert float((got[top].double() - ref).abs().max() / ref.abs().max()) < 1e-5
    with pytest.raises(ValueError, match="layer 9"):
        steer.caa_vectors(model, pos, neg, tokenizer.pad_token_id, [1, 9])
    with pytest.raises(ValueError, match="no layers"):
        steer.caa_vectors(model, pos, neg, tokenizer.pad_token_id, [])
    with pytest.raises(ValueError, match="no prompts"):
        steer.caa_vectors(model, [], neg, tokenizer.pad_token_id, [1])
    assert no_hooks_left(model)


def test_alpha_zero_is_bit_identical_and_alpha_changes_logits(llama, prompt_ids) -> None:
    model, tokenizer = llama
    pos, neg = prompt_ids
    vectors = steer.caa_vectors(model, pos, neg, tokenizer.pad_token_id, [1, 2])
    vectors[1][0] = float("inf")  # x + 0 * v would turn this into NaN; alpha = 0 must not add anything
    ids = torch.tensor([pos[0]])
    with torch.no_grad():
        base = model(ids).logits
        with steer.added(model, vectors, 0.0):
            assert no_hooks_left(model)
            same = model(ids).logits
        with steer.added(model, vectors, 4.0):
            moved = model(ids).logits
    assert torch.equal(base, same)
    assert not torch.allclose(base, moved)
    assert no_hooks_left(model)


def test_added_shifts_that_mlp_output_by_exactly_alpha_v(llama, prompt_ids) -> None:
    model, _ = llama
    layer, alpha = 2, -3.5
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([prompt_ids[0][1]])
    mlp = model.model.layers[layer].mlp
    seen = {}
    with torch.no_grad():
        handle = mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("plain", out.clone()))
        model(ids)
        handle.remove()
        with steer.added(model, {layer: vec}, alpha):
            # Registered after the CAA hook, so it sees what the residual stream receives.
            handle = mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("added", out.clone()))
            model(ids)
            handle.remove()
    assert seen["added"].shape[1] == ids.shape[1] > 1
    assert torch.equal(seen["added"], seen["plain"] + alpha * vec)  # every position, exactly
    assert no_hooks_left(model)


def test_added_acts_on_generated_tokens_and_cleans_up_on_error(llama, prompt_ids) -> None:
    model, tokenizer = llama
    pos, neg = prompt_ids
    vectors = steer.caa_vectors(model, pos, neg, tokenizer.pad_token_id, [1])
    calls: list[int] = []
    mlp = model.model.layers[1].mlp
    with steer.added(model, vectors, 8.0):
        handle = mlp.register_forward_hook(lambda m, a, out: calls.append(out.shape[1]))
        steered_text = gen.generate(model, tokenizer, pos[:1], max_new_tokens=5)
        handle.remove()
    assert calls[0] == len(pos[0]) and calls[1:] == [1] * (len(calls) - 1) and len(calls) >= 2
    assert steered_text != gen.generate(model, tokenizer, pos[:1], max_new_tokens=5)
    with pytest.raises(RuntimeError, match="boom"):
        with steer.added(model, vectors, 1.0):
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    with pytest.raises(ValueError, match="shape"):
        with steer.added(model, {1: torch.zeros(3)}, 1.0):
            pass
    with pytest.raises(ValueError, match="outside"):
        with steer.added(model, {7: vectors[1]}, 1.0):
            pass
    assert no_hooks_left(model)


def test_caa_layer_picks_the_busiest_layer_ties_to_the_shallower() -> None:
    assert steer.caa_layer([(5, 1), (6, 2), (6, 3), (7, 4)]) == 6
    assert steer.caa_layer([(7, 1), (7, 2), (3, 1), (3, 9), (9, 0)]) == 3
    assert steer.caa_layer(np.array([[4, 0]])) == 4
    with pytest.raises(ValueError, match="empty"):
        steer.caa_layer([])
