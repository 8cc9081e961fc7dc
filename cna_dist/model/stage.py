"""One pipeline stage: decoder layers [lo, hi) of a checkpoint, loaded straight from its safetensors.

A pipeline replica splits the decoder into stages, one per device, so no process ever holds the whole model: a
stage is built on the meta device, materialised on its own device, and filled with exactly its own tensors
(`model.layers.{i}.*`, plus `model.embed_tokens.weight` on the first stage). Its forward repeats what the full
decoder (`model.model`, as `Capturer._run` calls it) does for those layers, op for op, so chained stages give
bit-identical hidden states and neuron activations to single-device capture.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import safetensors
import torch

from cna_dist.errors import BadInput, RunFailure
from cna_dist.model.checkpoint import torch_dtype
from cna_dist.model.hf import mask_maker

# model_type -> (module, decoder-layer class, rotary-embedding class) of the installed transformers
_ARCHS = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer", "MistralRotaryEmbedding"),
}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _classes(model_type: str) -> tuple[type, type]:
    module, layer, rotary = _ARCHS[model_type]
    mod = importlib.import_module(module)
    return getattr(mod, layer), getattr(mod, rotary)


def _layer_kind(config: Any, idx: int) -> str:
    """The mask kind the architecture's own decoder forward gives layer `idx` when it builds masks itself."""
    if config.model_type == "qwen2":
        return config.layer_types[idx]
    if config.model_type == "mistral" and config.sliding_window is not None:
        return "sliding_attention"
    return "full_attention"


def _mask_functions() -> dict[str, Any]:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    return {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


class Stage(torch.nn.Module):
    """Decoder layers [lo, hi) (and the embedding when lo == 0) on one device; inference only.

    Built with weights uninitialised: `load_stage` fills them. The rotary embedding is computed for real on the
    host, as `from_pretrained` computes it, and moved to the device: `inv_freq` is not in the checkpoint, and a
    meta-built module holds garbage after `to_empty`. It stays float32 whatever `dtype` is, as in the full model.
    """

    def __init__(self, config: Any, lo: int, hi: int, *, device: str | torch.device, dtype: torch.dtype):
        super().__init__()
        self.config, self.lo, self.hi = config, lo, hi
        self.device, self.dtype = torch.device(device), dtype
        self.first = lo == 0
        layer_cls, rotary_cls = _classes(config.model_type)
        with torch.device("meta"):
            embed = None
            if self.first:
                embed = torch.nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
            layers = torch.nn.ModuleList(layer_cls(config, i) for i in range(lo, hi))
        self.embed_tokens = None if embed is None else embed.to(dtype).to_empty(device=self.device)
        self.layers = layers.to(dtype).to_empty(device=self.device)
        with torch.device("cpu"):
            rotary = rotary_cls(config)
        self.rotary_emb = rotary.to(self.device)
        self._kinds = [_layer_kind(config, i) for i in range(lo, hi)]
        self._mask = mask_maker(config)
        self.requires_grad_(False)
        self.eval()

    def extra_repr(self) -> str:
        return f"layers [{self.lo}, {self.hi}), device={self.device}, dtype={self.dtype}"

    def down_projs(self) -> list[torch.nn.Module]:
        """This stage's layers' mlp.down_proj, in layer order; their input is the neuron activation."""
        return [layer.mlp.down_proj for layer in self.layers]

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after layer hi-1 (no final norm) from input ids (first stage) or the previous hidden states.

        `mask` is the 2D left-padding mask [batch, tokens] (1 = real token) on any device. Positions, rotary
        embeddings and the attention mask are recomputed here from it, exactly as the full decoder computes them,
        so a stage needs nothing from the previous one but its hidden states.
        """
        mask = mask.to(self.device, non_blocking=True)
        x = x.to(self.device, non_blocking=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.embed_tokens(x) if self.first else x
        position_embeddings = self.rotary_emb(hidden, positions)
        masks = self._attention_masks(hidden, mask, positions)
        for layer, kind in zip(self.layers, self._kinds, strict=True):
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings,
                position_ids=positions,
                past_key_values=None,
                use_cache=False,
            )
        return hidden

    def _attention_masks(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        """The mask per layer kind, as the full model gets it: `mask_maker`'s 4D device mask for every layer, or,
        where that passes the 2D mask through (a batch wider than a sliding window), transformers' own masks built
        the way the architecture's decoder forward builds them (same function, same arguments)."""
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
                position_ids=positions,
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
    this stage's tensors, straight onto `device`, converted to `dtype` (names as in `checkpoint.torch_dtype`). A
    tensor missing from the checkpoint or of the wrong shape is BadInput.
    """
    path = Path(path)
    config = config if config is not None else stage_config(path)
    n_layers = config.num_hidden_layers
    if not 0 <= lo < hi <= n_layers:
        raise ValueError(f"stage layers [{lo}, {hi}) are not a non-empty range inside [0, {n_layers})")
    stage = Stage(config, lo, hi, device=device, dtype=torch_dtype(dtype))
    targets = _targets(stage)
    for file, keys in _files(path, list(targets)).items():
        _load_file(file, keys, targets, stage.device)
    if stage.device.type == "cuda":
        # The copies above are queued on this thread's current stream; the stage is read on other streams (a
        # pipeline worker's, which does not wait for this one: PyTorch's streams are non-blocking). Wait for the
        # last copy here, on this stream only: the stream engine's loader thread waits, its compute does not.
        torch.cuda.current_stream(stage.device).synchronize()
    return stage


def stage_config(path: Path) -> Any:
    """The checkpoint's config with SDPA attention, as `hf.load` loads the full model."""
    from transformers import AutoConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise BadInput("not a checkpoint folder: no config.json", source=str(path))
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in _ARCHS:
        raise BadInput(
            f"unsupported model_type {config.model_type!r}; pipeline stages know {sorted(_ARCHS)}",
            source=str(config_file),
            field="model_type",
        )
    config._attn_implementation = "sdpa"
    return config


def _targets(stage: Stage) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the stage tensor it fills, for every parameter and persistent buffer.

    Any other non-persistent buffer besides the rotary embedding's would stay garbage after `to_empty`, and the
    checkpoint cannot fill it: refuse rather than compute with it.
    """
    state = stage.state_dict(keep_vars=True)
    unfilled = [n for n, _ in stage.named_buffers() if n not in state and not n.startswith("rotary_emb.")]
    if unfilled:
        raise RunFailure(f"{stage.config.model_type} stage has buffers no checkpoint holds: {unfilled}")
    targets = {}
    for name, tensor in state.items():
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            name = f"layers.{stage.lo + int(idx)}.{rest}"
        targets[f"model.{name}"] = tensor
    return targets


def _files(path: Path, keys: list[str]) -> dict[Path, list[str]]:
    """The safetensors files holding `keys`, each with the keys to read from it (sharded: per the weight_map)."""
    index = path / _INDEX
    if not index.is_file():
        if not (path / _SINGLE).is_file():
            raise BadInput(f"no {_SINGLE} or {_INDEX}: pipeline stages load safetensors only", source=str(path))
        return {path / _SINGLE: keys}
    weight_map = _weight_map(index)
    missing = [k for k in keys if k not in weight_map]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadInput(f"tensor {missing[0]!r}{more} is missing", source=str(index), field="weight_map")
    grouped: dict[Path, list[str]] = {}
    for key in keys:
        grouped.setdefault(path / weight_map[key], []).append(key)
    return grouped


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise BadInput(f"not a safetensors index ({exc})", source=str(index)) from None
    if not isinstance(weight_map, dict):
        raise BadInput("no weight_map object", source=str(index), field="weight_map")
    return weight_map


def _load_file(file: Path, keys: list[str], targets: dict[str, torch.Tensor], device: torch.device) -> None:
    """Read `keys` (only those) from one safetensors file straight onto `device`, into their stage tensors."""
    if not file.is_file():
        raise BadInput(f"weight file is missing (it should hold {keys[0]!r})", source=str(file))
    with safetensors.safe_open(str(file), framework="pt", device=str(device)) as handle:
        present = set(handle.keys())
        for key in keys:
            if key not in present:
                raise BadInput(f"tensor {key!r} is missing", source=str(file))
            tensor, target = handle.get_tensor(key), targets[key]
            if tensor.shape != target.shape:
                raise BadInput(
                    f"tensor {key!r} has shape {list(tensor.shape)}, the config needs {list(target.shape)}",
                    source=str(file),
                )
            with torch.no_grad():
                target.copy_(tensor)
