"""The one decoder forward every engine runs: decoder layers [lo, hi) of a model, from input ids or hidden states.

A `Stage` either wraps a loaded model's own modules (`Stage.of_model`: single-device and device_map capture are a
one-stage run of it) or is built for layers [lo, hi) alone and filled straight from the checkpoint's safetensors
(`load_stage`: pipeline stages and the stream engine's layers), so no process of those engines ever holds the
whole model: built on the meta device, materialised on its own device, filled with exactly its own tensors
(`model.layers.{i}.*`, plus `model.embed_tokens.weight` on the first stage; a mixture-of-experts layer's fused
expert parameters from the checkpoint's per-expert tensors, as transformers' own loader fuses them, see
`moe.saved_pieces`). Its forward repeats what the family's
own `*Model.forward` does for those layers, op for op, with the family's facts from `cna_dist.model.arch` and HF's
own classes doing the math, so chained stages give bit-identical hidden states and neuron rows to one stage.
"""

from __future__ import annotations

import json
from collections.abc import Container
from pathlib import Path
from typing import Any

import safetensors
import torch

from cna_dist.capture.plumbing import mask_maker, positions
from cna_dist.errors import BadInput, RunFailure
from cna_dist.model import arch, moe
from cna_dist.model.checkpoint import torch_dtype

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _mask_functions() -> dict[str, Any]:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    return {arch.FULL: create_causal_mask, arch.SLIDING: create_sliding_window_causal_mask}


class Stage(torch.nn.Module):
    """Decoder layers [lo, hi) (and the embedding when lo == 0) on one device; inference only.

    Built (no `modules`): weights uninitialised, `load_stage` fills them. The rotary embedding is computed for real
    on the host, as `from_pretrained` computes it, and moved to the device: `inv_freq` is not in the checkpoint, and
    a meta-built module holds garbage after `to_empty`. It stays float32 whatever `dtype` is, as in the full model.
    A family's scaled embedding gets its scale (a non-persistent buffer) set as HF's own initialisation sets it.
    With `modules` (embedding or None, layers, rotary embedding) the stage runs a loaded model's own modules.
    """

    def __init__(
        self,
        config: Any,
        lo: int,
        hi: int,
        *,
        device: str | torch.device,
        dtype: torch.dtype,
        modules: tuple[Any, Any, Any] | None = None,
    ):
        super().__init__()
        self.config, self.lo, self.hi = config, lo, hi
        self.device, self.dtype = torch.device(device), dtype
        self.first = lo == 0
        self.family = arch.of(config)
        built = modules is None
        self.embed_tokens, self.layers, self.rotary_emb = self._build() if built else modules
        self._kinds = self.family.kinds(config, lo, hi)
        self._multiplier = self.family.multiplier(config) if self.first else None
        self._mask = mask_maker(config)
        if built:
            self.requires_grad_(False)
            self.eval()

    @classmethod
    def of_model(cls, model: Any) -> Stage:
        """All layers of a loaded causal LM (its own modules, shared, on whatever devices they sit)."""
        inner = arch.decoder(model)
        device = inner.embed_tokens.weight.device
        dtype = inner.embed_tokens.weight.dtype
        modules = (inner.embed_tokens, inner.layers, inner.rotary_emb)
        return cls(model.config, 0, len(inner.layers), device=device, dtype=dtype, modules=modules)

    def _build(self) -> tuple[Any, Any, Any]:
        config, fam = self.config, self.family
        with torch.device("meta"):
            embed = None
            if self.first:
                embed = self._embedding()
            layers = torch.nn.ModuleList(fam.layer_class()(config, i) for i in range(self.lo, self.hi))
        if embed is not None:
            embed = embed.to(self.dtype).to_empty(device=self.device)
            if hasattr(embed, "embed_scale"):
                with torch.no_grad():
                    embed.embed_scale.fill_(fam.embed_scale(config))
        layers = layers.to(self.dtype).to_empty(device=self.device)
        with torch.device("cpu"):
            rotary = fam.rotary_class()(config)
        return embed, layers, rotary.to(self.device)

    def _embedding(self) -> torch.nn.Module:
        config, cls = self.config, self.family.embedding_class()
        pad = getattr(config, "pad_token_id", None)
        if cls is None:
            return torch.nn.Embedding(config.vocab_size, config.hidden_size, pad)
        return cls(config.vocab_size, config.hidden_size, pad, embed_scale=self.family.embed_scale(config))

    def extra_repr(self) -> str:
        return f"{self.family.model_type} layers [{self.lo}, {self.hi}), device={self.device}, dtype={self.dtype}"

    def neurons(self) -> list[torch.nn.Module]:
        """This stage's layers' neuron modules, in layer order; their input is the neuron activation."""
        return [self.family.neuron(layer) for layer in self.layers]

    down_projs = neurons  # every dense family's neuron module is mlp.down_proj

    @property
    def width(self) -> int:
        """Neurons per layer."""
        return self.family.width(self.config)

    def recorder(self) -> arch.RowsRecorder:
        """The family's rows recorder over this stage's layers: buffer[:, k] gets layer lo + k's last-token row."""
        return self.family.rows(list(self.layers))

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after layer hi-1 (no final norm) from input ids (first stage) or the previous hidden states.

        `mask` is the 2D left-padding mask [batch, tokens] (1 = real token) on any device. Positions, rotary
        embeddings and the attention mask are recomputed here from it, exactly as the full decoder computes them,
        so a stage needs nothing from the previous one but its hidden states.
        """
        mask = mask.to(self.device, non_blocking=True)
        x = x.to(self.device, non_blocking=True)
        pos = positions(mask)
        hidden = self.embed_tokens(x) if self.first else x
        if self._multiplier is not None:
            hidden = hidden * self._multiplier
        rotary = self._position_embeddings(hidden, pos)
        masks = self._attention_masks(hidden, mask, pos)
        for layer, kind in zip(self.layers, self._kinds, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_embeddings=rotary[kind],
                position_ids=pos,
                past_key_values=None,
            )
        return hidden

    def _position_embeddings(self, hidden: torch.Tensor, pos: torch.Tensor) -> dict[str, Any]:
        """Rotary (cos, sin) per layer kind: one for all layers, or one per kind where the family has two bases."""
        if self.family.rotary_per_kind:
            return {kind: self.rotary_emb(hidden, pos, kind) for kind in set(self._kinds)}
        return dict.fromkeys(self._kinds, self.rotary_emb(hidden, pos))

    def _attention_masks(self, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> dict[str, Any]:
        """The mask per layer kind, as the full model gets it: `mask_maker`'s 4D device mask for every layer, or,
        where that passes the 2D mask through (a batch wider than a sliding window, or eager attention),
        transformers' own masks built the way the family's decoder forward builds them (same function, same
        arguments)."""
        prepared = self._mask(mask)
        if prepared.dim() == 4:
            return dict.fromkeys(self._kinds, prepared)
        functions = _mask_functions()
        return {
            kind: functions[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=prepared,
                past_key_values=None,
                position_ids=pos,
            )
            for kind in set(self._kinds)
        }


def load_stage(
    path: Path,
    lo: int,
    hi: int,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    config: Any | None = None,
) -> Stage:
    """Layers [lo, hi) (and the embedding when lo == 0) of the checkpoint folder `path`.

    Reads config.json (unless a `stage_config(path)` is given: a loader of many stages parses it once) and only
    this stage's tensors, straight onto `device`, converted to `dtype` (names as in `checkpoint.torch_dtype`); fused
    experts come from per-expert tensors where the checkpoint holds those. A tensor missing from the checkpoint or of
    the wrong shape is BadInput.
    """
    path = Path(path)
    config = config if config is not None else stage_config(path)
    n_layers = config.num_hidden_layers
    if not 0 <= lo < hi <= n_layers:
        raise ValueError(f"stage layers [{lo}, {hi}) are not a non-empty range inside [0, {n_layers})")
    stage = Stage(config, lo, hi, device=device, dtype=torch_dtype(dtype))
    _fill(stage, path)
    if stage.device.type == "cuda":
        # The copies above are queued on this thread's current stream; the stage is read on other streams (a
        # pipeline worker's, which does not wait for this one: PyTorch's streams are non-blocking). Wait for the
        # last copy here, on this stream only: the stream engine's loader thread waits, its compute does not.
        torch.cuda.current_stream(stage.device).synchronize()
    return stage


def stage_config(path: Path) -> Any:
    """The checkpoint's config with the family's attention (and experts) implementation, as `hf.load` loads the full
    model."""
    from transformers import AutoConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise BadInput("not a checkpoint folder: no config.json", source=str(path))
    config = AutoConfig.from_pretrained(path)
    fam = arch.of(config, source=str(config_file))
    config._attn_implementation = fam.attention(config)
    if fam.model_type in arch.MOE:
        config._experts_implementation = _experts_implementation(fam, config)
    return config


def _experts_implementation(fam: arch.Family, config: Any) -> str:
    """The experts forward `from_pretrained` gives the full model (as `get_correct_experts_implementation` picks it):
    the config's own choice, else grouped_mm where the family's model class can switch implementations, else eager.
    A stage must run the same one as single-device capture: the implementations round differently, and a stage's
    layers, built without the model class, would otherwise fall back to the eager loop."""
    requested = config._experts_implementation
    if requested is not None:
        return requested
    model_class = getattr(fam.module(), f"{fam.prefix}ForCausalLM")
    return "grouped_mm" if model_class._can_set_experts_implementation() else "eager"


def _targets(stage: Stage) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the stage tensor it fills, for every parameter and persistent buffer.

    Any other non-persistent buffer besides the rotary embedding's would stay garbage after `to_empty`, and the
    checkpoint cannot fill it: refuse rather than compute with it.
    """
    state = stage.state_dict(keep_vars=True)
    computed = ("rotary_emb.", "embed_tokens.embed_scale")  # computed in Stage._build, as HF computes them
    unfilled = [n for n, _ in stage.named_buffers() if n not in state and not n.startswith(computed)]
    if unfilled:
        raise RunFailure(f"{stage.config.model_type} stage has buffers no checkpoint holds: {unfilled}")
    targets = {}
    for name, tensor in state.items():
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            name = f"layers.{stage.lo + int(idx)}.{rest}"
        targets[f"model.{name}"] = tensor
    return targets


def _fill(stage: Stage, path: Path) -> None:
    """Copy the stage's tensors from the checkpoint's safetensors files (sharded: only the files the weight_map names
    for them), each file opened once. Names are resolved against what the checkpoint holds (`_pieces`)."""
    targets = _targets(stage)
    index = path / _INDEX
    if not index.is_file():
        single = path / _SINGLE
        if not single.is_file():
            raise BadInput(f"no {_SINGLE} or {_INDEX}: pipeline stages load safetensors only", source=str(path))
        with _open(single, stage.device) as handle:
            _copy(handle, single, _pieces(stage, targets, set(handle.keys())))
        return
    weight_map = _weight_map(index)
    pieces = _pieces(stage, targets, weight_map)
    missing = [key for key, _ in pieces if key not in weight_map]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadInput(f"tensor {missing[0]!r}{more} is missing", source=str(index), field="weight_map")
    grouped: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for key, target in pieces:
        grouped.setdefault(path / weight_map[key], []).append((key, target))
    for file, group in grouped.items():
        if not file.is_file():
            raise BadInput(f"weight file is missing (it should hold {group[0][0]!r})", source=str(file))
        with _open(file, stage.device) as handle:
            _copy(handle, file, group)


def _pieces(stage: Stage, targets: dict[str, torch.Tensor], found: Container[str]) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint tensor name, the stage tensor or view it fills) for every target: the target's own name, or for
    fused experts that the checkpoint holds per expert, one piece per expert and part (`moe.saved_pieces`)."""
    model_type = stage.config.model_type
    return [piece for name, target in targets.items() for piece in moe.saved_pieces(model_type, name, target, found)]


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise BadInput(f"not a safetensors index ({exc})", source=str(index)) from None
    if not isinstance(weight_map, dict):
        raise BadInput("no weight_map object", source=str(index), field="weight_map")
    return weight_map


def _open(file: Path, device: torch.device) -> Any:
    return safetensors.safe_open(str(file), framework="pt", device=str(device))


def _copy(handle: Any, file: Path, pieces: list[tuple[str, torch.Tensor]]) -> None:
    """Read the pieces' tensors (only those) from one open safetensors file straight onto the device, into their
    stage tensors or views."""
    present = set(handle.keys())
    for key, target in pieces:
        if key not in present:
            raise BadInput(f"tensor {key!r} is missing", source=str(file))
        tensor = handle.get_tensor(key)
        if tensor.shape != target.shape:
            raise BadInput(
                f"tensor {key!r} has shape {list(tensor.shape)}, the config needs {list(target.shape)}",
                source=str(file),
            )
        with torch.no_grad():
            target.copy_(tensor)
        del tensor  # one checkpoint tensor alive at a time besides the stage (an expert's, for fused experts)
