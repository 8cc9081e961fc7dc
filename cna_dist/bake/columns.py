"""Which tensor and which column each circuit neuron scales, from checkpoint tensor names and shapes alone.

Scaling neuron j's down-projection input by m is scaling column j of that projection's weight by m (the bias, added
after the product, is untouched). The projections are found by name, the way checkpoints store them:

- dense MLPs (Llama, Qwen2/3, Mistral, Gemma 3, Phi-3's fused gate_up_proj too, OLMo 2, Granite):
  `...layers.{l}.mlp.down_proj.weight` [H, I]; neuron j is column j;
- fused experts (transformers 5 layout): `...layers.{l}.mlp.experts.down_proj` [E, H, I]; neuron e*I + j is
  `down_proj[e, :, j]`;
- one tensor per expert (the layout Mixtral, Qwen-MoE and OLMoE checkpoints are published in, and what
  transformers 5 writes back when it saves them): `...layers.{l}.mlp.experts.{e}.down_proj.weight` or Mixtral's
  `...layers.{l}.block_sparse_moe.experts.{e}.w2.weight` [H, I]; neuron e*I + j is column j of expert e's tensor.

Anything that cannot be placed exactly (quantized or fp8 projections, shared experts, a neuron past its layer's
width, two decoder stacks) is refused as bad input naming the tensor and the neuron.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cna_dist.errors import BadInput

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_LAYER = r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\."
DENSE = re.compile(_LAYER + r"mlp\.down_proj\.weight$")
FUSED = re.compile(_LAYER + r"(?:mlp|block_sparse_moe)\.experts\.down_proj$")
PER_EXPERT = re.compile(_LAYER + r"(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.(?:down_proj|w2)\.weight$")
SHARED = re.compile(_LAYER + r"(?:mlp|block_sparse_moe)\.shared_experts?\.")
# Names beside a projection that mean its weight is not the plain matrix (quantization scales, packed blocks).
QUANTIZED = re.compile(r"(?:down_proj|w2)(?:\.|_)(?:qweight|qzeros|scales?|g_idx|weight_scale(?:_inv)?|blocks|absmax)")


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Projection:
    """One down-projection tensor and the neurons of its layer it holds: [first, first + experts * width)."""

    tensor: str
    layer: int
    first: int
    width: int  # I: columns per expert
    experts: int  # rows of a fused [E, H, I] tensor; 0 for a 2D [H, I] tensor

    @property
    def count(self) -> int:
        return self.width * max(self.experts, 1)


@dataclass
class Layout:
    """Every layer's down projections, in neuron order."""

    layers: dict[int, list[Projection]] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def width(self, layer: int) -> int:
        return sum(p.count for p in self.layers[layer])

    @property
    def max_width(self) -> int:
        return max((self.width(layer) for layer in self.layers), default=0)


# (expert row of a fused tensor or None, column) -> the edits of one tensor
Edits = dict[str, list[tuple[int | None, int]]]


def layout(tensors: dict[str, TensorInfo], source: str) -> Layout:
    """Find every layer's down projections among the checkpoint's tensors; refuse what cannot be scaled exactly."""
    found: dict[str, dict[int, dict[int, tuple[str, TensorInfo, bool]]]] = {}  # prefix -> layer -> expert -> entry
    for name, info in tensors.items():
        if SHARED.match(name):
            raise BadInput(f"tensor {name!r}: shared experts are not supported by bake", source=source)
        if QUANTIZED.search(name):
            raise BadInput(f"tensor {name!r}: quantized down projections cannot be scaled exactly", source=source)
        entry = _match(name, info, source)
        if entry is None:
            continue
        prefix, layer, expert, fused = entry
        experts = found.setdefault(prefix, {}).setdefault(layer, {})
        if expert in experts or (experts and (fused or any(e[2] for e in experts.values()))):
            raise BadInput(f"tensor {name!r}: layer {layer} has two down projections", source=source)
        experts[expert] = (name, info, fused)
    if not found:
        raise BadInput("no down projection found (no tensor named like layers.N.mlp.down_proj.weight)", source=source)
    if len(found) > 1:
        raise BadInput(f"down projections under several decoder stacks: {sorted(found)}", source=source)
    (per_layer,) = found.values()
    if sorted(per_layer) != list(range(len(per_layer))):
        missing = sorted(set(range(max(per_layer) + 1)) - set(per_layer))
        raise BadInput(f"no down projection for layer {missing[0]}", source=source)
    return Layout({layer: _projections(layer, per_layer[layer], source) for layer in sorted(per_layer)})


def _match(name: str, info: TensorInfo, source: str) -> tuple[str, int, int, bool] | None:
    """(prefix, layer, expert, fused) of a down-projection tensor, None for any other tensor."""
    for pattern, fused, rank in ((DENSE, False, 2), (PER_EXPERT, False, 2), (FUSED, True, 3)):
        m = pattern.match(name)
        if m is None:
            continue
        if info.dtype not in FLOAT_DTYPES:
            raise BadInput(
                f"tensor {name!r} is {info.dtype}; bake scales only {sorted(FLOAT_DTYPES)} weights exactly",
                source=source,
            )
        if len(info.shape) != rank:
            raise BadInput(f"tensor {name!r} has shape {list(info.shape)}, expected {rank} dimensions", source=source)
        expert = int(m.groupdict().get("expert") or 0)
        return m["prefix"], int(m["layer"]), expert, fused
    return None


def _projections(layer: int, experts: dict[int, tuple[str, TensorInfo, bool]], source: str) -> list[Projection]:
    if sorted(experts) != list(range(len(experts))):
        missing = sorted(set(range(max(experts) + 1)) - set(experts))
        raise BadInput(f"layer {layer}: no down projection for expert {missing[0]}", source=source)
    widths = {info.shape[-1] for _, info, _ in experts.values()}
    if len(widths) > 1:
        raise BadInput(f"layer {layer}: experts of different widths {sorted(widths)}", source=source)
    out: list[Projection] = []
    first = 0
    for e in sorted(experts):
        name, info, fused = experts[e]
        proj = Projection(name, layer, first, info.shape[-1], info.shape[0] if fused else 0)
        out.append(proj)
        first += proj.count
    return out


def place(lay: Layout, pairs: Iterable[tuple[int, int]], source: str) -> Edits:
    """tensor -> [(expert row or None, column)] for every circuit neuron (layer, neuron); refuse one that has no
    column, naming the neuron and the tensors of its layer."""
    edits: Edits = {}
    for layer, neuron in pairs:
        projs = lay.layers.get(layer)
        if projs is None:
            raise BadInput(f"neuron L{layer} N{neuron}: the checkpoint has {lay.n_layers} layers", source=source)
        for p in projs:
            if p.first <= neuron < p.first + p.count:
                offset = neuron - p.first
                row = offset // p.width if p.experts else None
                edits.setdefault(p.tensor, []).append((row, offset % p.width))
                break
        else:
            raise BadInput(
                f"neuron L{layer} N{neuron}: layer {layer} has {lay.width(layer)} neurons ({projs[0].tensor} ...)",
                source=source,
            )
    for cols in edits.values():
        cols.sort(key=lambda c: (-1 if c[0] is None else c[0], c[1]))
    return edits
