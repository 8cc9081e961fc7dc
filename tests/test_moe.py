"""Mixture-of-experts neurons on tiny random Mixtral, Qwen3-MoE, OLMoE and Qwen2-MoE models (transformers' own).

Rows recorded over a batched, left-padded forward equal an independent oracle (one prompt, unpadded; each routed
expert's input recomputed from its weights and the router weight read from HF's router output); rows rebuild the
MoE block's output (the self-check); steering at m = 1 is bit-identical and at m = 0 / 2 equals editing the
down-projection columns of HF's unmodified modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from cna_dist.model import moe

VOCAB = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared CPU each op would wait for a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family: str) -> nn.Module:
    """A seeded random float32 model of one family: 4-8 experts, top-2, expert width 8-16, 2-3 layers."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    if family == "mixtral":
        config = transformers.MixtralConfig(num_hidden_layers=2, intermediate_size=8, num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    elif family == "olmoe":
        config = transformers.OlmoeConfig(num_hidden_layers=2, intermediate_size=12, num_experts=8, **common)
        cls = transformers.OlmoeForCausalLM
    elif family == "qwen3_moe":  # layer 0 dense (mlp_only_layers): a mixed model, widths 24 / 8 x 16 / 8 x 16
        config = transformers.Qwen3MoeConfig(
            num_hidden_layers=3,
            intermediate_size=24,
            moe_intermediate_size=16,
            num_experts=8,
            mlp_only_layers=[0],
            norm_topk_prob=True,
            **common,
        )
        cls = transformers.Qwen3MoeForCausalLM
    elif family == "qwen2_moe":  # a shared expert of width 12 with a sigmoid gate
        config = transformers.Qwen2MoeConfig(
            num_hidden_layers=2,
            intermediate_size=24,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=12,
            num_experts=4,
            **common,
        )
        cls = transformers.Qwen2MoeForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(len(family))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    assert model.config.hidden_act == "silu"
    return model


FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"]
PROMPTS = [[5, 9, 3, 22, 17, 8, 30], [4], [11, 12], [7, 33, 21, 6, 19, 25, 2, 14, 31, 10, 9], [26, 3, 3, 15]]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> nn.Module:
    return tiny(request.param)


def layers_of(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, position ids from the mask), as the capture path builds a batch."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def recorded(model: nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    """Rows [prompt, sum of layer widths] from the recorder over one left-padded batch of the decoder stack."""
    recorder = moe.MoeLastTokenRows(layers_of(model))
    ids, mask, positions = left_padded(prompts)
    shape = (len(prompts), len(recorder.widths), recorder.widths[0]) if recorder.uniform else (len(prompts), -1)
    buffer = torch.full((len(prompts), sum(recorder.widths)), float("nan")).view(shape)
    try:
        with torch.inference_mode(), recorder.into(buffer):
            model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    finally:
        recorder.close()
    return buffer.reshape(len(prompts), -1)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(gate @ x) * (up @ x)


def oracle_layer(layer: nn.Module, x: torch.Tensor, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One layer's neurons at one token from the weights: x is the MLP input, (scores, index) the router's top-k."""
    mlp = layer.mlp
    if not hasattr(mlp, "experts"):
        return swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight)
    experts = mlp.experts
    n_experts, width = experts.gate_up_proj.shape[0], experts.down_proj.shape[2]
    row = torch.zeros(n_experts, width)
    for score, e in zip(scores.tolist(), index.tolist(), strict=True):
        gate_up = experts.gate_up_proj[e]
        row[e] = swiglu(x, gate_up[:width], gate_up[width:]) * score
    row = row.reshape(-1)
    shared = getattr(mlp, "shared_expert", None)
    if shared is not None:
        value = swiglu(x, shared.gate_proj.weight, shared.up_proj.weight)
        row = torch.cat([row, value * torch.sigmoid(mlp.shared_expert_gate.weight @ x)])
    return row


def oracle(model: nn.Module, prompt: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(neurons [sum of widths], MLP block outputs at the last token) of one prompt, alone and unpadded."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for k, layer in enumerate(layers_of(model)):

        def mlp_in(module: nn.Module, args: tuple, k: int = k) -> None:
            seen[k, "x"] = args[0].reshape(-1, args[0].shape[-1])[-1]

        def mlp_out(module: nn.Module, args: tuple, output: torch.Tensor, k: int = k) -> None:
            seen[k, "out"] = output.reshape(-1, output.shape[-1])[-1]

        def router(module: nn.Module, args: tuple, output: tuple, k: int = k) -> None:
            _, scores, index = output  # HF's router output: (logits, top-k weights, top-k expert ids)
            seen[k, "scores"], seen[k, "index"] = scores[-1], index[-1]

        handles += [layer.mlp.register_forward_pre_hook(mlp_in), layer.mlp.register_forward_hook(mlp_out)]
        if hasattr(layer.mlp, "gate") and isinstance(getattr(layer.mlp, "experts", None), nn.Module):
            handles.append(layer.mlp.gate.register_forward_hook(router))
    try:
        with torch.no_grad():
            model(torch.tensor([prompt]))
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        rows = [
            oracle_layer(layer, seen[k, "x"], seen.get((k, "scores")), seen.get((k, "index")))
            for k, layer in enumerate(layers_of(model))
        ]
    return torch.cat(rows), [seen[k, "out"] for k in range(len(rows))]


def per_layer_close(got: torch.Tensor, expected: torch.Tensor, widths: list[int]) -> None:
    """Equal to 1e-5 relative to each layer's largest value (as tests/test_capture.py measures rows)."""
    start = 0
    for k, width in enumerate(widths):
        a, b = got[start : start + width], expected[start : start + width]
        scale = b.abs().max()
        assert scale > 0, f"layer {k} is all zeros"
        err = ((a - b).abs().max() / scale).item()
        assert err < 1e-5, (k, err)
        start += width


def test_widths_and_layout() -> None:
    widths = {f: moe.MoeLastTokenRows(layers_of(tiny(f))).widths for f in FAMILIES}
    assert widths == {
        "mixtral": [4 * 8] * 2,
        "qwen3_moe": [24, 8 * 16, 8 * 16],
        "olmoe": [8 * 12] * 2,
        "qwen2_moe": [4 * 8 + 12] * 2,
    }
    recorder = moe.MoeLastTokenRows(layers_of(tiny("qwen3_moe")))
    assert recorder.offsets == [0, 24, 152] and not recorder.uniform
    with pytest.raises(ValueError, match=r"need \[batch, 280\]"):
        with recorder.into(torch.zeros(2, 3, 128)):
            pass
    recorder.close()


def test_rows_equal_the_oracle_batched_and_padded(model: nn.Module) -> None:
    got = recorded(model, PROMPTS)
    widths = moe.MoeLastTokenRows(layers_of(model)).widths
    for i, prompt in enumerate(PROMPTS):
        expected, _ = oracle(model, prompt)
        per_layer_close(got[i], expected, widths)
    # exactly top-k experts per MoE layer and token are non-zero: routed neurons of other experts are exactly 0
    for k, layer in enumerate(layers_of(model)):
        experts = moe.experts_of(layer)
        if experts is None:
            continue
        start = sum(widths[:k])
        routed = got[:, start : start + experts.num_experts * moe.expert_width(experts)]
        live = routed.view(len(PROMPTS), experts.num_experts, -1).abs().sum(-1) > 0
        assert (live.sum(-1) == model.config.num_experts_per_tok).all()


def test_self_check_rows_rebuild_the_block_output(model: nn.Module) -> None:
    got = recorded(model, PROMPTS)
    widths = moe.MoeLastTokenRows(layers_of(model)).widths
    for i, prompt in enumerate(PROMPTS):
        _, outputs = oracle(model, prompt)
        start = 0
        for k, layer in enumerate(layers_of(model)):
            with torch.no_grad():
                rebuilt = moe.reconstruct(layer, got[i, start : start + widths[k]])
            scale = outputs[k].abs().max()
            assert ((rebuilt - outputs[k]).abs().max() / scale).item() < 1e-5, (i, k)
            start += widths[k]


def circuit(model: nn.Module) -> list[tuple[int, int]]:
    """Neurons in every layer: several of two experts, the last expert's last neuron, shared and dense ones."""
    pairs = []
    for k, layer in enumerate(layers_of(model)):
        experts = moe.experts_of(layer)
        if experts is None:
            pairs += [(k, 0), (k, 5)]
            continue
        width, n_experts = moe.expert_width(experts), experts.num_experts
        pairs += [(k, 0), (k, 3), (k, width + 1), (k, n_experts * width - 1)]
        if moe.shared_expert(layer)[0] is not None:
            pairs += [(k, n_experts * width), (k, n_experts * width + 7)]
    return pairs


def logits(model: nn.Module) -> torch.Tensor:
    ids, mask, positions = left_padded(PROMPTS)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def column_scaled(model: nn.Module, pairs: list[tuple[int, int]], m: float) -> Callable[[], None]:
    """The oracle: multiply the down-projection columns of the steered neurons in place (HF's modules run
    unmodified); m = 0 and m = 2 scale exactly, as scaling the input would. Returns the undo."""
    saved = []
    with torch.no_grad():
        for k, neuron in pairs:
            mlp = layers_of(model)[k].mlp
            experts = getattr(mlp, "experts", None)
            if experts is None:
                column = mlp.down_proj.weight[:, neuron]
            else:
                n_experts, width = experts.down_proj.shape[0], experts.down_proj.shape[2]
                if neuron < n_experts * width:
                    column = experts.down_proj[neuron // width, :, neuron % width]
                else:
                    column = mlp.shared_expert.down_proj.weight[:, neuron - n_experts * width]
            saved.append((column, column.clone()))
            column.mul_(m)

    def undo() -> None:
        with torch.no_grad():
            for column, original in saved:
                column.copy_(original)

    return undo


@pytest.mark.parametrize("impl", moe.STEERABLE_IMPLEMENTATIONS)
def test_steering(model: nn.Module, impl: str) -> None:
    model.set_experts_implementation(impl)
    try:
        base = logits(model)
        pairs = circuit(model)
        with moe.steered(layers_of(model), pairs, 1.0):
            assert all("_apply_gate" not in layer.mlp.experts.__dict__ for layer in layers_of(model)[-1:])
            same = logits(model)
        assert torch.equal(same, base)  # m = 1: nothing installed, bit-identical
        for m in (0.0, 2.0):
            with moe.steered(layers_of(model), pairs, m):
                got = logits(model)
            undo = column_scaled(model, pairs, m)
            try:
                expected = logits(model)
            finally:
                undo()
            assert not torch.allclose(expected, base, atol=1e-3)  # the circuit does change the output
            assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5, m
        assert torch.equal(logits(model), base)  # everything removed on exit
    finally:
        model.set_experts_implementation("grouped_mm")


def test_steering_one_expert_neuron_changes_only_tokens_routed_to_it() -> None:
    model = tiny("mixtral")
    layer = layers_of(model)[1]
    seen: dict[str, torch.Tensor] = {}
    handles = [
        layer.mlp.gate.register_forward_hook(lambda mod, args, out: seen.__setitem__("index", out[2])),
        layer.mlp.register_forward_hook(lambda mod, args, out: seen.__setitem__("out", out)),
    ]
    try:
        logits(model)
        base_index, base_out = seen["index"].clone(), seen["out"].clone()
        with moe.steered(layers_of(model), [(1, 2 * 8 + 5)], 0.0):  # expert 2, neuron 5 of layer 1
            logits(model)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(seen["index"], base_index)
    routed = (base_index == 2).any(-1).reshape(base_out.shape[:2])
    changed = (seen["out"] != base_out).any(-1)
    assert routed.any() and (~routed).any()
    assert torch.equal(changed, routed)


def test_steering_refuses_what_it_cannot_attribute() -> None:
    model = tiny("olmoe")
    model.set_experts_implementation("eager")  # HF's eager loop does not call _apply_gate
    with pytest.raises(ValueError, match="experts_implementation"):
        with moe.steered(layers_of(model), [(0, 3)], 0.0):
            pass
    with pytest.raises(ValueError, match=r"L0 N96 is outside the model \(2 layers, width 96\)"):
        with moe.steered(layers_of(model), [(0, 96)], 0.0):
            pass
    assert "_apply_gate" not in layers_of(model)[0].mlp.experts.__dict__


def test_the_moe_scale_builder_loads_through_the_checkpoint_path(tmp_path: Path) -> None:
    """The builder of the Qwen3-235B-A22B row shape, at a small size: a complete checkpoint that hf.load accepts
    (every tensor present, float16 on disk), whose rows have the builder's E x I width per layer."""
    from safetensors import safe_open

    from cna_dist.capture import hf
    from cna_dist.demo.scale import MOE_SHAPES, save_moe_scale_model

    assert MOE_SHAPES["qwen3_moe"] == (94, 128, 1536, 8)
    path = save_moe_scale_model(tmp_path / "moe", n_layers=3, n_experts=16, expert_width=12, top_k=4)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F16"}
    loaded, tokenizer = hf.load(path, dtype="float32")
    recorder = moe.MoeLastTokenRows(layers_of(loaded))
    assert recorder.widths == [16 * 12] * 3
    ids = tokenizer("how do i bake a cake")["input_ids"]
    rows = recorded(loaded, [ids, ids[:3]])
    recorder.close()
    per_layer_close(rows[0], oracle(loaded, ids)[0], recorder.widths)
    live = rows.view(2, 3, 16, 12).abs().sum(-1) > 0
    assert (live.sum(-1) == 4).all()  # top-4 of 16 experts in every layer of both prompts


def test_grouped_and_looped_expert_inputs_agree() -> None:
    """The CUDA path (one grouped matmul) and the CPU path (a loop over the experts present) of expert_inputs."""
    experts = layers_of(tiny("olmoe"))[0].mlp.experts
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(40, 16, generator=gen)
    ids, _ = torch.sort(torch.randint(0, 8, (40,), generator=gen))
    ids[ids == 5] = 6  # an expert without rows
    with torch.no_grad():
        looped = moe._looped_gate_up(experts, rows, ids)
        grouped = moe._grouped_gate_up(experts, rows, ids)
        direct = torch.stack([experts.gate_up_proj[e] @ r for r, e in zip(rows, ids.tolist(), strict=True)])
    torch.testing.assert_close(looped, direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped, direct, rtol=1e-6, atol=1e-6)


def test_config_widths_match_the_built_layers() -> None:
    """The driver's widths (config.json only) equal what the recorder finds in the built model, dense layers too."""
    for family in FAMILIES:
        model = tiny(family)
        config = model.config.to_dict()
        assert moe.config_widths(config) == moe.MoeLastTokenRows(layers_of(model)).widths, family
    sparse_step = tiny("qwen2_moe").config.to_dict() | {"decoder_sparse_step": 2, "num_hidden_layers": 4}
    sparse_step.pop("layer_types", None)
    assert moe.config_widths(sparse_step) == [24, 4 * 8 + 12, 24, 4 * 8 + 12]
    released = {"model_type": "qwen3_moe", "num_hidden_layers": 94, "num_experts": 128, "moe_intermediate_size": 1536}
    assert moe.config_widths(released) == [128 * 1536] * 94
    with pytest.raises(ValueError, match="'llama' is not a mixture-of-experts family"):
        moe.config_widths({"model_type": "llama"})


def test_a_mixed_model_splits_into_one_array_per_width() -> None:
    model = tiny("qwen3_moe")  # layer 0 dense (24), layers 1-2 MoE (8 x 16)
    rows = recorded(model, PROMPTS[:3])
    widths = moe.MoeLastTokenRows(layers_of(model)).widths
    assert moe.width_groups(widths) == {24: [0], 128: [1, 2]}
    arrays = moe.split_rows(rows, widths)
    assert {w: tuple(a.shape) for w, a in arrays.items()} == {24: (3, 1, 24), 128: (3, 2, 128)}
    assert torch.equal(arrays[24][:, 0], rows[:, :24])
    assert torch.equal(arrays[128][:, 1], rows[:, 24 + 128 :])
