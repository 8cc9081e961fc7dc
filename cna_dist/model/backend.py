"""The capture-backend seam: what a replica needs from a loaded model, and nothing else.

A replica (in process, on Ray, or a future pipeline or layer-streaming engine) holds one backend and calls only
these methods, so a second backend (another inference library, a stage of a pipeline) plugs in without editing the
store, the reduce or the runtime. `made_by` goes into every shard's commit marker: a run's rows say how they were
made, while the run id stays a function of the values (model bytes, rendering, stored dtype) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cna_dist.model.batching import Limits

Prompts = Sequence[Sequence[int]]  # token ids, one list per prompt
CAAVectors = dict[int, list[float]]  # layer -> the contrastive MLP-output vector, as plain data


class CaptureBackend(Protocol):
    name: str
    n_layers: int
    intermediate_size: int

    def made_by(self) -> dict[str, str]:
        """backend, library (with its version) and engine: recorded in every shard's commit marker."""
        ...

    def capture(self, token_ids: Prompts, dtype: str, limits: Limits) -> tuple[np.ndarray, int]:
        """Activations [prompt, layer, neuron] in prompt order in the store dtype, and the float16 overflow count."""
        ...

    def generate(self, token_ids: Prompts, condition: dict[str, Any], max_new_tokens: int, limits: Limits) -> list[str]:
        """Greedy completions under a steering condition (plain data: see cna_dist.model.steer.condition)."""
        ...

    def caa_vectors(self, pos_ids: Prompts, neg_ids: Prompts, layers: Sequence[int], limits: Limits) -> CAAVectors:
        """CAA's mean_pos - mean_neg of each layer's MLP output at the last real token."""
        ...


BACKENDS = ("hf",)


def load_backend(
    name: str, path: Path, *, dtype: str, trust_remote_code: bool, gpus: int, max_memory_per_gpu: str | None
) -> CaptureBackend:
    """The backend called `name`, loaded from a local checkpoint folder."""
    if name == "hf":
        from cna_dist.model.hf import HFBackend

        return HFBackend.load(
            path, dtype=dtype, trust_remote_code=trust_remote_code, gpus=gpus, max_memory_per_gpu=max_memory_per_gpu
        )
    raise ValueError(f"unknown capture backend {name!r}; known: {', '.join(BACKENDS)}")
