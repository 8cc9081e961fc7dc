"""Mixture-of-experts neurons: record them at the last token, check them against the block's output, steer them.

In transformers 5 the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE are one module with fused 3D
weights (`mlp.experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`), routed by `mlp.gate`; there is no
per-expert down_proj module to hook. Neuron `e * I + j` of such a layer is expert e's down-projection input j at
the last token times the router weight the model gives e for that token (0 when e is not routed); a shared expert
(Qwen2-MoE's `shared_expert`) follows at `E * I + j`, times its sigmoid gate. Dense layers of a mixed model
(Qwen3-MoE's `mlp_only_layers`, Qwen2-MoE's `decoder_sparse_step`) keep the dense neuron: the input of
`mlp.down_proj`.

Routing is always the model's own: the recorder reads `(hidden, top_k_index, top_k_weights)` from a forward
pre-hook on `mlp.experts`, exactly what the experts forward receives, and recomputes the routed experts' inputs
for the last token only. Steering leaves HF's experts forward in charge and intercepts one step of it, the gate
(`_apply_gate`, whose output is the down-projection input), see `steered`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

# model_type of the families whose layers this module knows (fused experts in transformers 5)
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# The experts implementations (config._experts_implementation) whose rows reach `_apply_gate` in a known order:
# batched_mm keeps the (token, k) order of top_k_index; grouped_mm sorts the rows by expert id first.
STEERABLE_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")


# --------------------------------------------------------------------------------------------- layer structure


def experts_of(layer: nn.Module) -> nn.Module | None:
    """The fused routed experts of a decoder layer, None for a dense layer; anything else is refused."""
    mlp = layer.mlp
    experts = getattr(mlp, "experts", None)
    if experts is None:
        if not isinstance(getattr(mlp, "down_proj", None), nn.Linear):
            raise ValueError(f"{type(mlp).__name__}: neither routed experts nor a down_proj linear layer")
        return None
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        raise ValueError(
            f"{type(experts).__name__}: expected fused 3D expert weights gate_up_proj and down_proj "
            "(transformers >= 5); per-expert modules are not supported"
        )
    refused = [flag for flag in ("has_bias", "has_post_expert_norm") if getattr(experts, flag, False)]
    if not getattr(experts, "has_gate", True):
        refused.append("no gate (up projection only)")
    if getattr(mlp, "shared_experts", None) is not None:
        refused.append("shared_experts")
    if refused:
        raise ValueError(f"{type(experts).__name__}: unsupported experts layout ({', '.join(refused)})")
    return experts


def expert_width(experts: nn.Module) -> int:
    """I, the width of one expert's down-projection input."""
    down = experts.down_proj
    return int(down.shape[1] if getattr(experts, "is_transposed", False) else down.shape[2])


def shared_expert(layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(shared expert MLP, its gate linear) of a MoE layer; (None, None) without one; gate None when ungated."""
    mlp = layer.mlp
    shared = getattr(mlp, "shared_expert", None)
    return shared, (getattr(mlp, "shared_expert_gate", None) if shared is not None else None)


def layer_width(layer: nn.Module) -> int:
    """Neurons of one decoder layer: E * I (+ the shared expert's width) for MoE, intermediate_size for dense."""
    experts = experts_of(layer)
    if experts is None:
        return int(layer.mlp.down_proj.in_features)
    shared, _ = shared_expert(layer)
    extra = int(shared.down_proj.in_features) if shared is not None else 0
    return int(experts.num_experts) * expert_width(experts) + extra


def config_widths(config: dict[str, Any]) -> list[int]:
    """Each layer's neuron width from config.json alone (the driver reads no weights), as the model will build it:
    E x I (+ the shared expert) for a MoE layer, intermediate_size for a dense layer of Qwen2/3-MoE."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a mixture-of-experts family this module knows {FAMILIES}")
    # transformers' own config class of a model_type checked above: no trust_remote_code, no code from the hub
    cfg = AutoConfig.for_model(**config)
    layers = range(cfg.num_hidden_layers)
    if model_type in ("mixtral", "olmoe"):
        return [cfg.num_local_experts * cfg.intermediate_size for _ in layers]
    shared = cfg.shared_expert_intermediate_size if model_type == "qwen2_moe" else 0
    sparse = [
        k not in cfg.mlp_only_layers and cfg.num_experts > 0 and (k + 1) % cfg.decoder_sparse_step == 0 for k in layers
    ]
    routed = cfg.num_experts * cfg.moe_intermediate_size + shared
    return [routed if is_sparse else cfg.intermediate_size for is_sparse in sparse]


def as_saved(model_type: str, want: dict[str, tuple[int, ...]], found: set[str]) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) a checkpoint of this family holds, given those the model builds (`want`).

    transformers 5 builds fused experts (`mlp.experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) and fuses a
    checkpoint's per-expert tensors while loading (its conversion mapping); released checkpoints, and its own
    `save_pretrained`, keep one tensor per expert (`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`; Mixtral:
    `block_sparse_moe.experts.{e}.w1/w3/w2.weight` and `block_sparse_moe.gate.weight`). A fused name the checkpoint
    holds stays as it is; any other is replaced by its per-expert names and shapes.
    """
    if model_type not in FAMILIES:
        return want
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in want.items():
        saved = None if name in found else _per_expert(model_type == "mixtral", name, shape)
        out.update(saved if saved is not None else {name: shape})
    return out


def saved_pieces(
    model_type: str, name: str, target: torch.Tensor, found: Container[str]
) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint tensors that fill the model tensor `name` (`target`), each with the view of `target` it fills.

    A name the checkpoint holds fills `target` whole: every dense tensor, and fused experts as transformers 5 writes
    them with `save_pretrained(save_original_format=False)`. Otherwise the pieces are `as_saved`'s per-expert
    tensors, placed as transformers' conversion mapping (`conversion_mapping.py`: `MergeModulelist(dim=0)` then
    `Concatenate(dim=1)`, experts in numeric order) places them: `gate_up_proj[e]` is expert e's gate rows then its up
    rows (Mixtral: w1 then w3), `down_proj[e]` is expert e's down projection (w2). Seen as `[2E, I, H]`, gate_up_proj's
    piece 2e + p is part p of expert e, which is `as_saved`'s order (experts outer, parts inner); copying each
    piece into its view builds no stacked copy, so loading a layer holds one expert's tensor at most besides it.
    """
    if model_type not in FAMILIES or name in found:
        return [(name, target)]
    saved = as_saved(model_type, {name: tuple(target.shape)}, set())
    shapes = set(saved.values())
    if len(shapes) != 1 or len(saved) * math.prod(next(iter(shapes))) != target.numel():
        raise ValueError(f"{name}: saved as {saved}, which does not tile its shape {list(target.shape)}")
    views = target.view(len(saved), *next(iter(shapes)))
    return list(zip(saved, views, strict=True))


def _per_expert(mixtral: bool, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]] | None:
    saved = name.replace(".mlp.", ".block_sparse_moe.") if mixtral else name
    if name.endswith(".mlp.experts.gate_up_proj"):
        n_experts, two_i, hidden = shape
        base, parts = saved.removesuffix("gate_up_proj"), ("w1", "w3") if mixtral else ("gate_proj", "up_proj")
        return {f"{base}{e}.{p}.weight": (two_i // 2, hidden) for e in range(n_experts) for p in parts}
    if name.endswith(".mlp.experts.down_proj"):
        n_experts, hidden, width = shape
        base, part = saved.removesuffix("down_proj"), "w2" if mixtral else "down_proj"
        return {f"{base}{e}.{part}.weight": (hidden, width) for e in range(n_experts)}
    return {saved: shape} if mixtral and ".mlp." in name else None


def routing_args(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) as the experts forward receives them."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs[name] for name in names[len(args[:3]) :]]
    return values[0], values[1], values[2]


# ------------------------------------------------------------------------------------------ expert inputs


def expert_inputs(experts: nn.Module, hidden: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Down-projection inputs [P, I] of expert `expert_ids[p]` on token `hidden[p]` ([P, H]).

    The steps of HF's experts forwards up to the down projection, on these rows only: the rows sorted by expert,
    each expert's gate_up projection, then the class's own gate (`_apply_gate`; the class's, not the instance's,
    so a steering interception never reaches recorded rows). On CUDA one grouped matmul (HF's, as its grouped_mm
    forward uses) does every expert without a host sync; elsewhere a loop over the experts present, since a CPU
    grouped matmul visits all E experts however few rows there are.
    """
    ids, perm = torch.sort(expert_ids)
    rows = hidden[perm]
    if hidden.device.type == "cuda":
        gate_up = _grouped_gate_up(experts, rows, ids)
    else:
        gate_up = _looped_gate_up(experts, rows, ids)
    sorted_inputs = type(experts)._apply_gate(experts, gate_up)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return sorted_inputs[inverse]


def _grouped_gate_up(experts: nn.Module, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """gate_up projections of rows sorted by expert id, in one grouped matmul (no host sync)."""
    from transformers.integrations.moe import _grouped_linear  # HF's grouped matmul with its fallbacks

    n_experts = int(experts.num_experts)
    counts_input = ids.int() if ids.device.type == "cuda" else ids.float()  # histc's supported dtypes per device
    counts = torch.histc(counts_input, bins=n_experts, min=0, max=n_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return _grouped_linear(rows, experts.gate_up_proj, offsets, is_transposed=getattr(experts, "is_transposed", False))


def _looped_gate_up(experts: nn.Module, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """gate_up projections of rows sorted by expert id, one matmul per expert present."""
    weight = experts.gate_up_proj
    transposed = getattr(experts, "is_transposed", False)
    out = rows.new_empty(rows.shape[0], weight.shape[2] if transposed else weight.shape[1])
    counts = torch.bincount(ids, minlength=int(experts.num_experts)).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count:
            chunk, w = rows[start : start + count], weight[expert]
            out[start : start + count] = chunk @ w if transposed else nn.functional.linear(chunk, w)
            start += count
    return out


def reconstruct(layer: nn.Module, row: torch.Tensor) -> torch.Tensor:
    """The MLP block's output [H] (float32) rebuilt from one recorded row: the self-check of the neuron definition.

    Each routed expert's slice (input times router weight) goes through that expert's down projection and the
    results add up, plus the shared expert's (input times its gate); a dense layer is its down_proj of the row.
    """
    experts = experts_of(layer)
    row = row.float()
    if experts is None:
        return nn.functional.linear(row, layer.mlp.down_proj.weight.float())
    n_experts, width = int(experts.num_experts), expert_width(experts)
    routed = row[: n_experts * width].view(n_experts, width)
    pattern = "eih,ei->h" if getattr(experts, "is_transposed", False) else "ehi,ei->h"
    out = torch.einsum(pattern, experts.down_proj.float(), routed)
    shared, _ = shared_expert(layer)
    if shared is not None:
        out = out + nn.functional.linear(row[n_experts * width :], shared.down_proj.weight.float())
    return out


# ------------------------------------------------------------------------------------------------- recording


class MoeLastTokenRows:
    """Forward hooks on every decoder layer's MLP parts: inside `into(buffer)`, each forward writes layer k's neurons
    at the last position (left padding puts every row's last real token there) into the buffer, on the device.

    The interface of rows.LastTokenRows, built from decoder layers instead of down_proj modules. The buffer is
    [batch, layers, width] when every layer has the same width, or [batch, sum(widths)] with layer k at
    `offsets[k]` (a model with dense and MoE layers); `widths` and `offsets` say which.
    """

    def __init__(self, layers: Sequence[nn.Module]):
        self.buffer: torch.Tensor | None = None
        self.widths = [layer_width(layer) for layer in layers]
        self.offsets = [sum(self.widths[:k]) for k in range(len(self.widths))]
        self._parts: dict[int, dict[str, torch.Tensor]] = {}
        self._handles: list[Any] = []
        for k, layer in enumerate(layers):
            self._register(k, layer)

    @property
    def uniform(self) -> bool:
        return len(set(self.widths)) <= 1

    def _register(self, k: int, layer: nn.Module) -> None:
        experts = experts_of(layer)
        if experts is None:
            self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._dense(k)))
            return
        self._handles.append(experts.register_forward_pre_hook(self._routed(k), with_kwargs=True))
        shared, gate = shared_expert(layer)
        if shared is not None:
            self._handles.append(shared.down_proj.register_forward_pre_hook(self._shared_input(k, gate is not None)))
        if gate is not None:
            self._handles.append(gate.register_forward_hook(self._shared_gate(k)))

    def _row(self, k: int) -> torch.Tensor:
        """Layer k's slice of the buffer, [batch, width_k] (a view: writes land in the buffer)."""
        assert self.buffer is not None
        flat = self.buffer.view(self.buffer.shape[0], -1)
        return flat[:, self.offsets[k] : self.offsets[k] + self.widths[k]]

    def _last(self, x: torch.Tensor) -> torch.Tensor:
        """The last position of each row of a [batch * seq, ...] or [batch, seq, ...] tensor."""
        assert self.buffer is not None
        return x.reshape(self.buffer.shape[0], -1, x.shape[-1])[:, -1]

    def _dense(self, k: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.buffer is not None:
                self._row(k).copy_(self._last(args[0]), non_blocking=True)

        return hook

    def _routed(self, k: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if self.buffer is None:
                return
            hidden, index, weights = routing_args(args, kwargs)
            last, index, weights = self._last(hidden), self._last(index), self._last(weights)
            batch, top_k = index.shape
            inputs = expert_inputs(module, last.repeat_interleave(top_k, dim=0), index.reshape(-1))
            values = inputs.float() * weights.reshape(-1, 1).float()
            n_experts, width = int(module.num_experts), expert_width(module)
            routed = self._row(k)[:, : n_experts * width].view(batch, n_experts, width)
            routed.zero_()
            tokens = torch.arange(batch, device=index.device).repeat_interleave(top_k)
            routed[tokens, index.reshape(-1)] = values.to(routed.dtype)

        return hook

    def _shared_input(self, k: int, gated: bool) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.buffer is None:
                return
            self._parts.setdefault(k, {})["input"] = self._last(args[0])
            self._write_shared(k, gated)

        return hook

    def _shared_gate(self, k: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.buffer is None:
                return
            self._parts.setdefault(k, {})["gate"] = torch.sigmoid(self._last(output).float())
            self._write_shared(k, True)

        return hook

    def _write_shared(self, k: int, gated: bool) -> None:
        """The shared expert's neurons once both its input and (if it has one) its gate value are known."""
        parts = self._parts.get(k, {})
        if "input" not in parts or (gated and "gate" not in parts):
            return
        values = parts["input"].float() * parts["gate"] if gated else parts["input"]
        row = self._row(k)
        row[:, row.shape[1] - values.shape[1] :].copy_(values.to(row.dtype), non_blocking=True)
        del self._parts[k]

    def _check(self, buffer: torch.Tensor) -> None:
        total = sum(self.widths)
        if self.uniform and buffer.dim() == 3 and tuple(buffer.shape[1:]) == (len(self.widths), self.widths[0]):
            return
        if buffer.dim() == 2 and buffer.shape[1] == total:
            return
        expected = f"[batch, {len(self.widths)}, {self.widths[0]}]" if self.uniform else f"[batch, {total}]"
        raise ValueError(f"row buffer of shape {tuple(buffer.shape)}; these layers need {expected}")

    @contextmanager
    def into(self, buffer: torch.Tensor) -> Iterator[torch.Tensor]:
        self._check(buffer)
        self.buffer = buffer
        self._parts.clear()
        try:
            yield buffer
        finally:
            self.buffer = None
            self._parts.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def width_groups(widths: Sequence[int]) -> dict[int, list[int]]:
    """The layers of each width, in layer order: the arrays of the one-array-per-width store layout (docs/moe.md)."""
    groups: dict[int, list[int]] = {}
    for layer, width in enumerate(widths):
        groups.setdefault(width, []).append(layer)
    return groups


def split_rows(flat: torch.Tensor, widths: Sequence[int]) -> dict[int, torch.Tensor]:
    """A flat recorder buffer [batch, sum(widths)] as one [batch, layers of that width, width] tensor per width."""
    offsets = [sum(widths[:k]) for k in range(len(widths))]
    return {
        width: torch.stack([flat[:, offsets[k] : offsets[k] + width] for k in layers], dim=1)
        for width, layers in width_groups(widths).items()
    }


# -------------------------------------------------------------------------------------------------- steering


def _group(pairs: Iterable[tuple[int, int]], widths: Sequence[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, neuron in pairs:
        if not (0 <= layer < len(widths) and 0 <= neuron < widths[layer]):
            width = widths[layer] if 0 <= layer < len(widths) else "?"
            raise ValueError(f"neuron L{layer} N{neuron} is outside the model ({len(widths)} layers, width {width})")
        out.setdefault(layer, []).append(neuron)
    return out


def _scale_input(module: nn.Module, vec: torch.Tensor) -> Any:
    """A pre-hook multiplying a linear layer's input by `vec` (the dense steering of steer.steered)."""

    def hook(mod: nn.Module, args: tuple) -> tuple:
        return (args[0] * vec.to(args[0].device, args[0].dtype), *args[1:])

    return module.register_forward_pre_hook(hook)


@contextmanager
def _routed_scale(experts: nn.Module, table: torch.Tensor) -> Iterator[None]:
    """Multiply the down-projection input of the experts by `table[e]` ([E + 1, I], last row ones) wherever e runs.

    HF's experts forward stays in charge: the interception is the instance's `_apply_gate`, which HF's grouped_mm
    and batched_mm forwards call once on all routed (token, expert) rows and whose output is the down-projection
    input. Which expert each row belongs to is the one thing the gate does not receive; a pre-hook on the experts
    derives it from top_k_index in the implementation's own row order (grouped_mm: sorted by expert id).
    """
    impl = experts.config._experts_implementation
    if impl not in STEERABLE_IMPLEMENTATIONS:
        raise ValueError(
            f"steering {type(experts).__name__} needs experts_implementation in {list(STEERABLE_IMPLEMENTATIONS)}, "
            f"the model runs {impl!r} (set it with model.set_experts_implementation('grouped_mm'))"
        )
    rows: list[torch.Tensor] = []
    n_experts = int(experts.num_experts)

    def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = routing_args(args, kwargs)[1].reshape(-1)
        now = module.config._experts_implementation
        if now not in STEERABLE_IMPLEMENTATIONS:
            raise RuntimeError(f"experts_implementation changed to {now!r} while steering")
        rows[:] = [torch.sort(ids).values if now == "grouped_mm" else ids]

    def gate(gate_up_out: torch.Tensor) -> torch.Tensor:
        out = type(experts)._apply_gate(experts, gate_up_out)
        if not rows or rows[0].shape[0] != out.shape[0]:
            raise RuntimeError(f"{type(experts).__name__}: the gate saw rows the steering hook cannot attribute")
        ids = rows.pop().clamp(max=n_experts)  # an expert-parallel sentinel id (>= E) gets the row of ones
        return out * table.to(out.device, out.dtype)[ids]

    handle = experts.register_forward_pre_hook(pre, with_kwargs=True)
    previous = experts.__dict__.get("_apply_gate")
    experts._apply_gate = gate
    try:
        yield
    finally:
        handle.remove()
        if previous is None:
            del experts._apply_gate
        else:
            experts._apply_gate = previous


def _steer_layer(stack: ExitStack, layer: nn.Module, neurons: list[int], multiplier: float) -> None:
    experts = experts_of(layer)
    if experts is None:
        proj = layer.mlp.down_proj
        vec = torch.ones(proj.in_features, dtype=proj.weight.dtype)
        vec[neurons] = multiplier
        stack.callback(_scale_input(proj, vec).remove)
        return
    n_experts, width = int(experts.num_experts), expert_width(experts)
    routed = [n for n in neurons if n < n_experts * width]
    shared = [n - n_experts * width for n in neurons if n >= n_experts * width]
    if routed:
        table = torch.ones(n_experts + 1, width, dtype=experts.down_proj.dtype)
        table.view(-1)[routed] = multiplier
        stack.enter_context(_routed_scale(experts, table))
    if shared:
        proj = shared_expert(layer)[0].down_proj
        vec = torch.ones(proj.in_features, dtype=proj.weight.dtype)
        vec[shared] = multiplier
        stack.callback(_scale_input(proj, vec).remove)


@contextmanager
def steered(layers: Sequence[nn.Module], pairs: Iterable[tuple[int, int]], multiplier: float) -> Iterator[None]:
    """Multiply neurons `(layer, e * I + j)` (routed), `(layer, E * I + j)` (shared) or `(layer, j)` (dense layer)
    by `multiplier` at every position where they run, while the context is open.

    m = 1 installs nothing, so the logits are bit-identical to no steering.
    """
    grouped = _group(pairs, [layer_width(layer) for layer in layers])
    if multiplier == 1:
        yield
        return
    with ExitStack() as stack:
        for k, neurons in sorted(grouped.items()):
            _steer_layer(stack, layers[k], neurons, multiplier)
        yield
