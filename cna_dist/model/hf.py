"""Everything that knows a transformers model's insides: loading, attribute paths, the SDPA mask, the backend.

Llama, Qwen2 and Mistral keep their decoder at `model.model`, its layers at `.layers[i]`, the MLP at `.mlp` and
the neuron activation as the input of `.mlp.down_proj`. Capture, steering and CAA reach the model only through
the functions here, and a replica reaches all of them only through `HFBackend` (a `CaptureBackend`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cna_dist.errors import BadInput
from cna_dist.model import weights
from cna_dist.model.backend import CAAVectors, Part, Prompts
from cna_dist.model.batching import Limits
from cna_dist.model.checkpoint import SUPPORTED, load_tokenizer, torch_dtype


def load(
    path: Path,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device_map: Any = None,
    max_memory: dict | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local checkpoint folder, in eval mode, SDPA attention."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    # transformers fills a missing tensor with random values and only warns: every tensor must be there, whole
    weights.check(str(path), json.loads((path / "config.json").read_text()))
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype),
        "trust_remote_code": trust_remote_code,
        "attn_implementation": "sdpa",
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model, tokenizer


def decoder(model: Any) -> Any:
    """The decoder stack without the lm_head: capture needs only the MLP inputs."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise BadInput(f"{type(model).__name__}: no model.layers; cna-dist supports {sorted(SUPPORTED)}")
    return inner


def down_projs(model: Any) -> list[Any]:
    """Every decoder layer's mlp.down_proj, in layer order; its input is the neuron activation."""
    layers = decoder(model).layers
    try:
        return [layer.mlp.down_proj for layer in layers]
    except AttributeError:
        raise BadInput(f"{type(model).__name__}: decoder layers have no mlp.down_proj") from None


def mlps(model: Any) -> list[Any]:
    """Every decoder layer's MLP block, in layer order; CAA reads and shifts its output (hidden_size wide)."""
    return [layer.mlp for layer in decoder(model).layers]


def device_mask_maker(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """`mask_maker` for a loaded model's config."""
    return mask_maker(getattr(model, "config", None))


def mask_maker(config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from the 2D padding mask to the mask to pass the decoder, built on the device.

    transformers' own 2D-mask path reads the mask on the host to decide whether it may skip it, a sync per batch.
    For SDPA the 4D mask it would build is made here instead: causal and key-is-real; a padding query also sees
    itself so no row is fully masked (no NaN from any SDPA kernel), which changes nothing for real rows. Only
    while the batch fits a sliding window, where the window changes nothing either; otherwise the 2D mask goes
    through and transformers builds the right one (with its host read) for any attention and window.
    """
    sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and window > 0 else None

    def make(mask: torch.Tensor) -> torch.Tensor:
        width = mask.shape[1]
        if not sdpa or (window is not None and width > window):
            return mask
        causal = torch.ones((width, width), dtype=torch.bool, device=mask.device).tril_()
        eye = torch.eye(width, dtype=torch.bool, device=mask.device)
        return ((causal & mask.bool()[:, None, :]) | eye)[:, None]

    return make


def placement(gpus: int, max_memory_per_gpu: str | None) -> tuple[Any, dict | None, str]:
    """(device_map, max_memory, engine name) for a replica of `gpus` GPUs (none visible: the CPU)."""
    if gpus <= 0 or not torch.cuda.is_available():
        return None, None, "single"
    max_memory = None
    if max_memory_per_gpu:
        max_memory = {i: max_memory_per_gpu for i in range(torch.cuda.device_count())}
    if gpus > 1:
        return "auto", max_memory, "device_map"
    return {"": 0}, max_memory, "single"


class HFBackend:
    """A transformers model behind the `CaptureBackend` interface: capture, steered generation, CAA vectors."""

    name = "hf"
    concurrent = False  # one forward at a time on the model's devices

    def __init__(self, model: Any, tokenizer: Any, engine: str = "single", capturer: Any = None):
        from cna_dist.model.capture import Capturer

        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.capturer = capturer or Capturer(model)  # hooks on every down_proj, registered once
        self.n_layers = self.capturer.n_layers
        self.intermediate_size = self.capturer.intermediate_size

    @classmethod
    def load(
        cls, path: Path, *, dtype: str, trust_remote_code: bool, gpus: int = 0, max_memory_per_gpu: str | None = None
    ) -> HFBackend:
        device_map, max_memory, engine = placement(gpus, max_memory_per_gpu)
        model, tokenizer = load(
            path, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory
        )
        return cls(model, tokenizer, engine)

    def made_by(self) -> dict[str, str]:
        import transformers

        return {"backend": self.name, "library": f"transformers {transformers.__version__}", "engine": self.engine}

    def capture_parts(self, token_ids: Prompts, dtype: str, limits: Limits) -> tuple[list[Part], int]:
        from cna_dist.model.capture import capture_with

        pad = self.tokenizer.pad_token_id
        acts, overflow = capture_with(self.capturer, token_ids, pad, dtype=dtype, **asdict(limits))
        return [(0, self.n_layers, acts)], overflow

    def generate(self, token_ids: Prompts, condition: dict[str, Any], max_new_tokens: int, limits: Limits) -> list[str]:
        from cna_dist.model import steer
        from cna_dist.model.generate import generate

        with steer.condition(self.model, condition):
            return generate(self.model, self.tokenizer, token_ids, max_new_tokens=max_new_tokens, **asdict(limits))

    def caa_vectors(self, pos_ids: Prompts, neg_ids: Prompts, layers: Sequence[int], limits: Limits) -> CAAVectors:
        from cna_dist.model import steer

        pad = self.tokenizer.pad_token_id
        vectors = steer.caa_vectors(self.model, pos_ids, neg_ids, pad, layers, **asdict(limits))
        return {layer: v.tolist() for layer, v in vectors.items()}

    def close(self) -> None:
        self.capturer.close()
