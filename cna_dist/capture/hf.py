"""A whole transformers model on one device or split by accelerate: loading it, and `HFBackend`, the `single` and
`device_map` engine, which captures and is also the generator (generation, CAA vectors, log-likelihoods).

Where a family keeps its decoder, layers, MLP and neurons is `cna_dist.model.arch`'s knowledge (re-exported here
as `decoder`, `down_projs`, `mlps` for callers that hold a loaded model).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cna_dist.capture.backend import Advice, CAAVectors, Part, Prompts
from cna_dist.capture.plumbing import made_by, mask_maker
from cna_dist.capture.single import Capturer, capture_with
from cna_dist.model import arch, loglik, weights
from cna_dist.model.checkpoint import load_tokenizer, torch_dtype
from cna_dist.model.generate import generate
from cna_dist.model.loglik import Request
from cna_dist.prompts.batching import Limits
from cna_dist.steer import hooks as steer

decoder = arch.decoder
down_projs = arch.neurons
mlps = arch.mlps
__all__ = ["HFBackend", "decoder", "down_projs", "load", "mask_maker", "mlps", "placement"]


def load(
    path: Path,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device_map: Any = None,
    max_memory: dict | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local checkpoint folder, in eval mode, with the family's attention (SDPA
    unless the config soft-caps attention logits). An unknown family is BadInput naming it and the known ones."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    arch.family(raw.get("model_type"), source=str(path / "config.json"))
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    # transformers fills a missing tensor with random values and only warns: every tensor must be there, whole
    weights.check(str(path), raw)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype),
        "trust_remote_code": trust_remote_code,
        "attn_implementation": arch.of(config, source=str(path / "config.json")).attention(config),
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model, tokenizer


def placement(engine: str, gpus: int, max_memory_per_gpu: str | None) -> tuple[Any, dict | None]:
    """(device_map, max_memory) for the `single` or `device_map` engine (`cna_dist.capture.engines.resolve` picks
    it) on a replica of `gpus` GPUs; none (or none visible): the CPU."""
    if gpus <= 0 or not torch.cuda.is_available():
        return None, None
    max_memory = None
    if max_memory_per_gpu:
        max_memory = {i: max_memory_per_gpu for i in range(torch.cuda.device_count())}
    return ("auto" if engine == "device_map" else {"": 0}), max_memory


class HFBackend:
    """A transformers model behind both seams (`cna_dist.capture.backend`): the `CaptureEngine` and the `Generator`.

    Its `name` is its engine: `single` (one device, or the CPU) or `device_map` (accelerate over the GPUs).
    """

    concurrent = False  # one forward at a time on the model's devices

    def __init__(self, model: Any, tokenizer: Any, engine: str = "single", capturer: Any = None):
        self.model, self.tokenizer, self.name = model, tokenizer, engine
        self.capturer = capturer or Capturer(model)  # hooks on every down_proj, registered once
        self.n_layers = self.capturer.n_layers
        self.intermediate_size = self.capturer.intermediate_size

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        dtype: str,
        trust_remote_code: bool,
        gpus: int = 0,
        engine: str = "single",
        max_memory_per_gpu: str | None = None,
    ) -> HFBackend:
        """`engine`: `single` (GPU 0, or the CPU) or `device_map` (accelerate over the replica's GPUs)."""
        device_map, max_memory = placement(engine, gpus, max_memory_per_gpu)
        engine = engine if device_map is not None else "single"
        model, tokenizer = load(
            path, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory
        )
        return cls(model, tokenizer, engine)

    def made_by(self) -> dict[str, str]:
        return made_by("hf", self.name)

    def capture_parts(self, token_ids: Prompts, dtype: str, limits: Limits) -> tuple[list[Part], int]:
        pad = self.tokenizer.pad_token_id
        acts, overflow = capture_with(self.capturer, token_ids, pad, dtype=dtype, **asdict(limits))
        return [(0, self.n_layers, acts)], overflow

    def advise(self, mean_tokens: float, limits: Limits) -> Advice | None:
        """No preference: the whole model stays loaded, so any shard size keeps its devices busy."""
        return None

    def generate(self, token_ids: Prompts, condition: dict[str, Any], max_new_tokens: int, limits: Limits) -> list[str]:
        with steer.condition(self.model, condition):
            return generate(self.model, self.tokenizer, token_ids, max_new_tokens=max_new_tokens, **asdict(limits))

    def caa_vectors(self, pos_ids: Prompts, neg_ids: Prompts, layers: Sequence[int], limits: Limits) -> CAAVectors:
        from cna_dist.steer import hooks as steer

        pad = self.tokenizer.pad_token_id
        vectors = steer.caa_vectors(self.model, pos_ids, neg_ids, pad, layers, **asdict(limits))
        return {layer: v.tolist() for layer, v in vectors.items()}

    def loglikelihoods(
        self, requests: Sequence[Request], condition: dict[str, Any], limits: Limits
    ) -> list[tuple[float, bool]]:
        with steer.condition(self.model, condition):
            return loglik.loglikelihoods(self.model, requests, self.tokenizer.pad_token_id, **asdict(limits))

    def close(self) -> None:
        self.capturer.close()
