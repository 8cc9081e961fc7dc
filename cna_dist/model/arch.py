"""The one place that knows each decoder architecture: which of transformers' own classes build it, and the few
facts its decoder forward needs beyond its layers.

Every engine runs the decoder through `cna_dist.capture.stage.Stage.forward`, which asks a `Family` only:
- which HF classes to build (decoder layer, rotary embedding, and the embedding when the family scales it inside
  its own class, as Gemma does with sqrt(hidden));
- what multiplies the embedding outside the embedding module (Granite's `embedding_multiplier`);
- the attention kind (mask) of each layer, exactly as the family's own `*Model.forward` picks it
  (`config.layer_types` where the model forward reads it, the config's `sliding_window` where it decides for all
  layers, full attention otherwise);
- whether rotary embeddings differ per layer kind (Gemma 3: a local and a global base);
- the attention implementation (SDPA, or eager where the config soft-caps attention logits: SDPA cannot);
- the neuron module of a layer (its input is the activation; `mlp.down_proj` for every dense family, including
  Phi-3's fused `gate_up_proj`) and the rows recorder that captures it. A mixture-of-experts family plugs in its
  own recorder factory and layer width here.

Everything else (norms, q/k norms, post-norms, residual and attention multipliers, layers without rotary, soft-
capping) lives inside HF's decoder-layer and attention classes, which compute it: nothing is re-implemented.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from cna_dist.errors import BadInput

FULL = "full_attention"
SLIDING = "sliding_attention"


class RowsRecorder(Protocol):
    """Writes each recorded layer's neuron values at the last position into buffer[:, k] during a forward."""

    def into(self, buffer: Any) -> AbstractContextManager[Any]: ...

    def close(self) -> None: ...


def _all_full(config: Any, idx: int) -> str:
    return FULL


def _from_layer_types(config: Any, idx: int) -> str:
    return config.layer_types[idx]


def _from_sliding_window(config: Any, idx: int) -> str:
    """Mistral and Phi-3: one mask function for all layers, sliding when the config has a window."""
    return SLIDING if getattr(config, "sliding_window", None) is not None else FULL


def _down_proj(layer: Any) -> Any:
    return layer.mlp.down_proj


def _dense_width(config: Any) -> int:
    return int(config.intermediate_size)


def _dense_rows(layers: Sequence[Any]) -> RowsRecorder:
    from cna_dist.model.rows import LastTokenRows

    return LastTokenRows([_down_proj(layer) for layer in layers])


def _layer_types(config: Any) -> str | None:
    types = getattr(config, "layer_types", None)
    if types is None:
        return None
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(types, list) or len(types) != n:
        count = len(types) if isinstance(types, list) else types
        return f"layer_types has {count!r} entries, not num_hidden_layers={n}"
    unknown = sorted({t for t in types if t not in (FULL, SLIDING)})
    if unknown:
        return f"layer_types has {unknown}; cna-dist knows {FULL!r} and {SLIDING!r}"
    return None


@dataclass(frozen=True)
class Family:
    """One model_type: HF's classes for it (by name, in `transformers.models.<package>.modeling_<package>`) and the
    facts its decoder forward needs (see the module docstring)."""

    model_type: str
    package: str  # transformers.models.<package>
    prefix: str  # class-name prefix: <prefix>DecoderLayer, <prefix>RotaryEmbedding
    example: str  # a real checkpoint of the family (docs, manifests)
    layer_kind: Callable[[Any, int], str] = _all_full
    embedding: str | None = None  # HF's own scaled-embedding class, else torch.nn.Embedding
    embedding_multiplier: str | None = None  # config attribute the model forward multiplies the embedding by
    rotary_per_kind: bool = False  # rotary_emb(x, positions, layer_kind), one per layer kind
    neuron: Callable[[Any], Any] = _down_proj  # the module whose input is a layer's neurons
    rows: Callable[[Sequence[Any]], RowsRecorder] = _dense_rows  # recorder over a run of decoder layers
    width: Callable[[Any], int] = _dense_width  # neurons per layer
    steering: Callable[[Any, Sequence[tuple[int, int]], float], AbstractContextManager[None]] | None = None
    checks: tuple[Callable[[Any], str | None], ...] = field(default=(_layer_types,))

    def module(self) -> Any:
        return importlib.import_module(f"transformers.models.{self.package}.modeling_{self.package}")

    def layer_class(self) -> type:
        return getattr(self.module(), f"{self.prefix}DecoderLayer")

    def rotary_class(self) -> type:
        return getattr(self.module(), f"{self.prefix}RotaryEmbedding")

    def embedding_class(self) -> type | None:
        return None if self.embedding is None else getattr(self.module(), self.embedding)

    def kinds(self, config: Any, lo: int, hi: int) -> list[str]:
        return [self.layer_kind(config, i) for i in range(lo, hi)]

    def embed_scale(self, config: Any) -> float:
        """What the family's own embedding class multiplies by (Gemma: sqrt(hidden_size), a non-persistent buffer
        that no checkpoint holds), or 1."""
        return float(config.hidden_size) ** 0.5 if self.embedding is not None else 1.0

    def multiplier(self, config: Any) -> float | None:
        return None if self.embedding_multiplier is None else getattr(config, self.embedding_multiplier)

    def attention(self, config: Any) -> str:
        """SDPA, except where the config soft-caps attention logits (Gemma 2), which only eager attention does."""
        return "eager" if getattr(config, "attn_logit_softcapping", None) is not None else "sdpa"

    def problem(self, config: Any) -> str | None:
        """Why this config cannot be captured as the family's causal decoder, or None."""
        for check in self.checks:
            if (problem := check(config)) is not None:
                return problem
        return None


def _config_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def _moe_widths(config: Any) -> list[int]:
    from cna_dist.model import moe

    return moe.config_widths(_config_dict(config))


def _moe_width(config: Any) -> int:
    """E x I (+ the shared expert's width): every layer's, once `_one_width` has passed."""
    return _moe_widths(config)[0]


def _one_width(config: Any) -> str | None:
    """The store holds one row width per run: a model mixing dense and MoE layers is refused, naming why."""
    widths = sorted(set(_moe_widths(config)))
    if len(widths) > 1:
        return (
            f"layers of different widths {widths} (dense layers among the MoE ones: mlp_only_layers or "
            "decoder_sparse_step); cna-dist stores one row width per run"
        )
    return None


def _experts(layer: Any) -> Any:
    """A MoE layer's neuron module: its fused routed experts (their down_proj input, times the router weight)."""
    return layer.mlp.experts


def _moe_rows(layers: Sequence[Any]) -> RowsRecorder:
    from cna_dist.model.moe import MoeLastTokenRows

    return MoeLastTokenRows(layers)


def _moe_steering(model: Any, pairs: Sequence[tuple[int, int]], multiplier: float) -> AbstractContextManager[None]:
    from cna_dist.model import moe

    return moe.steered(decoder(model).layers, pairs, multiplier)


def _moe(model_type: str, prefix: str, example: str, layer_kind: Callable[[Any, int], str] = _all_full) -> Family:
    """A mixture-of-experts family: HF's own decoder layers and routing, rows and steering from `model/moe.py`."""
    return Family(
        model_type,
        model_type,
        prefix,
        example,
        layer_kind=layer_kind,
        neuron=_experts,
        rows=_moe_rows,
        width=_moe_width,
        steering=_moe_steering,
        checks=(_layer_types, _one_width),
    )


def _causal_only(config: Any) -> str | None:
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention is set: an embedding model, not a causal decoder"
    return None


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "llama", "Llama", "meta-llama/Llama-3.1-70B-Instruct"),
        Family("qwen2", "qwen2", "Qwen2", "Qwen/Qwen2.5-72B-Instruct", layer_kind=_from_layer_types),
        Family("qwen3", "qwen3", "Qwen3", "Qwen/Qwen3-32B", layer_kind=_from_layer_types),
        Family(
            "mistral", "mistral", "Mistral", "mistralai/Mistral-Large-Instruct-2407", layer_kind=_from_sliding_window
        ),
        Family(
            "gemma2",
            "gemma2",
            "Gemma2",
            "google/gemma-2-27b-it",
            layer_kind=_from_layer_types,
            embedding="Gemma2TextScaledWordEmbedding",
        ),
        Family(
            "gemma3_text",
            "gemma3",
            "Gemma3",
            "google/gemma-3-27b-it (text decoder)",
            layer_kind=_from_layer_types,
            embedding="Gemma3TextScaledWordEmbedding",
            rotary_per_kind=True,
            checks=(_layer_types, _causal_only),
        ),
        Family("phi3", "phi3", "Phi3", "microsoft/phi-4", layer_kind=_from_sliding_window),
        Family("olmo2", "olmo2", "Olmo2", "allenai/OLMo-2-0325-32B-Instruct"),
        Family(
            "granite",
            "granite",
            "Granite",
            "ibm-granite/granite-3.3-8b-instruct",
            embedding_multiplier="embedding_multiplier",
        ),
        Family("smollm3", "smollm3", "SmolLM3", "HuggingFaceTB/SmolLM3-3B", layer_kind=_from_layer_types),
        _moe("mixtral", "Mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1", _from_sliding_window),
        _moe("qwen3_moe", "Qwen3Moe", "Qwen/Qwen3-235B-A22B-Instruct-2507", _from_sliding_window),
        _moe("olmoe", "Olmoe", "allenai/OLMoE-1B-7B-0125-Instruct"),
        _moe("qwen2_moe", "Qwen2Moe", "Qwen/Qwen1.5-MoE-A2.7B-Chat", _from_layer_types),
    )
}
MOE = frozenset(f.model_type for f in FAMILIES.values() if f.rows is _moe_rows)


def known() -> list[str]:
    return sorted(FAMILIES)


def family(model_type: str | None, *, source: str = "config.json") -> Family:
    """The Family of a model_type; anything else is BadInput naming it and the families known."""
    found = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if found is None:
        raise BadInput(
            f"unsupported model_type {model_type!r}; cna-dist knows {known()}", source=source, field="model_type"
        )
    return found


def of(config: Any, *, source: str = "config.json") -> Family:
    """The Family of a loaded config, refusing a config the family cannot capture (BadInput naming the reason)."""
    fam = family(getattr(config, "model_type", None), source=source)
    if (problem := fam.problem(config)) is not None:
        raise BadInput(f"{fam.model_type}: {problem}", source=source, field="model_type")
    return fam


def check_config(config: dict[str, Any], source: str) -> Family:
    """The architecture check of a raw config.json (validate, mine): a known family whose config it can capture."""
    from types import SimpleNamespace

    fam = family(config.get("model_type"), source=source)
    if (problem := fam.problem(SimpleNamespace(**config))) is not None:
        raise BadInput(f"{fam.model_type}: {problem}", source=source, field="model_type")
    return fam


def decoder(model: Any) -> Any:
    """The decoder stack (no lm_head) of a loaded causal LM: `model.model`, holding `.layers`."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise BadInput(f"{type(model).__name__}: no model.layers; cna-dist knows {known()}")
    return inner


def neurons(model: Any) -> list[Any]:
    """Every decoder layer's neuron module (its input is the activation), in layer order: the family's, from the
    model's config (an unknown family is BadInput); `mlp.down_proj` for a model that carries no config."""
    config = getattr(model, "config", None)
    neuron = _down_proj if config is None else of(config, source=type(model).__name__).neuron
    try:
        return [neuron(layer) for layer in decoder(model).layers]
    except AttributeError:
        raise BadInput(f"{type(model).__name__}: decoder layers have no mlp.down_proj") from None


def mlps(model: Any) -> list[Any]:
    """Every decoder layer's MLP block, in layer order; CAA reads and shifts its output (hidden_size wide)."""
    return [layer.mlp for layer in decoder(model).layers]
