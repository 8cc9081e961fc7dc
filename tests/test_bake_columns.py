"""The functional core of `bake`: neurons placed on tensor columns from names and shapes, the column arithmetic,
and safetensors headers re-laid for a dtype change."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cna_dist.bake import columns, header
from cna_dist.bake.columns import TensorInfo
from cna_dist.bake.scale import transformed
from cna_dist.errors import BadInput


def dense(n_layers: int = 2, width: int = 8, prefix: str = "model.") -> dict[str, TensorInfo]:
    out = {f"{prefix}layers.{layer}.mlp.down_proj.weight": TensorInfo("BF16", (4, width)) for layer in range(n_layers)}
    out.update(
        {f"{prefix}layers.{layer}.mlp.up_proj.weight": TensorInfo("BF16", (width, 4)) for layer in range(n_layers)}
    )
    out["model.embed_tokens.weight"] = TensorInfo("BF16", (10, 4))
    return out


def test_dense_columns() -> None:
    lay = columns.layout(dense(), "m")
    assert lay.n_layers == 2 and lay.max_width == 8
    edits = columns.place(lay, [(1, 7), (0, 0), (1, 2)], "m")
    assert edits == {
        "model.layers.0.mlp.down_proj.weight": [(None, 0)],
        "model.layers.1.mlp.down_proj.weight": [(None, 2), (None, 7)],
    }
    with pytest.raises(BadInput, match=r"neuron L1 N8: layer 1 has 8 neurons \(model.layers.1.mlp.down_proj.weight"):
        columns.place(lay, [(1, 8)], "m")
    with pytest.raises(BadInput, match="neuron L2 N0: the checkpoint has 2 layers"):
        columns.place(lay, [(2, 0)], "m")


def test_multimodal_prefix_is_one_stack() -> None:
    lay = columns.layout(dense(prefix="model.language_model."), "m")
    assert lay.n_layers == 2
    both = {**dense(prefix="model.language_model."), **dense(prefix="model.vision.")}
    with pytest.raises(BadInput, match="several decoder stacks"):
        columns.layout(both, "m")


def test_per_expert_mixtral_and_qwen_names() -> None:
    mixtral = {f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": TensorInfo("F32", (4, 6)) for e in range(3)}
    qwen = {f"model.layers.0.mlp.experts.{e}.down_proj.weight": TensorInfo("F32", (4, 6)) for e in range(3)}
    for tensors, name in (
        (mixtral, "model.layers.0.block_sparse_moe.experts.{}.w2.weight"),
        (qwen, "model.layers.0.mlp.experts.{}.down_proj.weight"),
    ):
        lay = columns.layout(tensors, "m")
        assert lay.max_width == 18
        edits = columns.place(lay, [(0, 0), (0, 6 + 5), (0, 12 + 1)], "m")
        assert edits == {name.format(0): [(None, 0)], name.format(1): [(None, 5)], name.format(2): [(None, 1)]}
    del qwen["model.layers.0.mlp.experts.1.down_proj.weight"]
    with pytest.raises(BadInput, match="layer 0: no down projection for expert 1"):
        columns.layout(qwen, "m")


def test_fused_experts() -> None:
    tensors = {f"model.layers.{layer}.mlp.experts.down_proj": TensorInfo("BF16", (4, 3, 6)) for layer in range(2)}
    lay = columns.layout(tensors, "m")
    assert lay.max_width == 24
    assert columns.place(lay, [(1, 6 * 3 + 2), (1, 0)], "m") == {
        "model.layers.1.mlp.experts.down_proj": [(0, 0), (3, 2)]
    }


@pytest.mark.parametrize(
    "name, info, message",
    [
        ("model.layers.1.mlp.down_proj.weight", TensorInfo("F8_E4M3", (4, 8)), "is F8_E4M3"),
        ("model.layers.1.mlp.down_proj.weight_scale_inv", TensorInfo("F32", (1,)), "quantized down projections"),
        ("model.layers.1.mlp.down_proj.qweight", TensorInfo("I32", (1, 8)), "quantized down projections"),
        ("model.layers.1.mlp.shared_expert.down_proj.weight", TensorInfo("F32", (4, 8)), "shared experts"),
        ("model.layers.1.mlp.down_proj.weight", TensorInfo("F32", (4, 8, 1)), "expected 2 dimensions"),
    ],
)
def test_refused(name: str, info: TensorInfo, message: str) -> None:
    tensors = dense()
    tensors[name] = info
    with pytest.raises(BadInput, match=message) as exc:
        columns.layout(tensors, "/models/x")
    assert str(exc.value).startswith("/models/x: ") and name in str(exc.value)


def test_missing_layer_and_no_projection() -> None:
    tensors = dense(3)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(BadInput, match="no down projection for layer 1"):
        columns.layout(tensors, "m")
    with pytest.raises(BadInput, match="no down projection found"):
        columns.layout({"model.embed_tokens.weight": TensorInfo("F32", (3, 3))}, "m")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_column_scaling_is_exact_for_powers_of_two(dtype: torch.dtype) -> None:
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    for m in (0.0, 0.5, 2.0):
        data = bytearray(w.view(torch.uint8).numpy().tobytes())
        out = torch.frombuffer(bytearray(transformed(data, name, (5, 7), [(None, 1), (None, 6)], m)), dtype=dtype)
        expected = w.clone()
        expected[:, [1, 6]] = expected[:, [1, 6]] * m
        assert torch.equal(out.view(5, 7), expected)
    data = bytearray(w.view(torch.uint8).numpy().tobytes())
    wider = transformed(data, name, (5, 7), [(None, 0)], 0.3, "F64")
    got = torch.frombuffer(bytearray(wider), dtype=torch.float64).view(5, 7)
    assert torch.equal(got[:, 0], w[:, 0].double() * 0.3) and torch.equal(got[:, 1:], w[:, 1:].double())


def test_fused_rows() -> None:
    w = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    data = bytearray(w.numpy().tobytes())
    out = torch.frombuffer(bytearray(transformed(data, "F32", (2, 3, 4), [(1, 2)], 0.0)), dtype=torch.float32)
    expected = w.clone()
    expected[1, :, 2] = 0
    assert torch.equal(out.view(2, 3, 4), expected)


def test_header_relaid_for_a_dtype_round_trips() -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.int64), "c": torch.randn(2)}
    blob = st_save(tensors, metadata={"format": "pt"})
    (length,) = struct.unpack("<Q", blob[:8])
    h = header.parse(blob[: 8 + length], len(blob), "x")
    assert sorted(e.name for e in h.entries) == ["a", "b", "c"] and h.metadata == {"format": "pt"}
    raw, spans = header.relaid(h, {"a": "BF16", "c": "BF16"})
    assert len(raw) % 8 == 0
    body = bytearray(max(b for _, b in spans.values()) - len(raw))
    for e in h.entries:
        a, b = spans[e.name]
        data = bytearray(blob[e.start : e.end])
        if e.name == "b":
            body[a - len(raw) : b - len(raw)] = data
        else:
            body[a - len(raw) : b - len(raw)] = transformed(data, "F32", e.shape, [], 1.0, "BF16")
    back = st_load(raw + bytes(body))
    assert torch.equal(back["a"], tensors["a"].bfloat16()) and torch.equal(back["b"], tensors["b"])
    with pytest.raises(BadInput, match="truncated or padded"):
        header.parse(blob[: 8 + length], len(blob) + 1, "x")
