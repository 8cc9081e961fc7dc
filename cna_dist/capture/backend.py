"""The two seams between a replica and a loaded model: a capture engine, and a generator.

Every engine captures (`CaptureEngine`); only an engine that holds the whole model with its language-model head
can generate, compute CAA vectors and score log-likelihoods (`Generator`: today the transformers model on one
device or split by accelerate, `cna_dist.capture.hf.HFBackend`). The pipeline and stream engines implement the
capture seam only. `cna_dist.capture.registry` loads an engine and says whether it is also the generator, so
a replica never probes an engine for what it can do. This module defines the seams only and imports no
implementation.

`made_by` goes into every shard's commit marker: a run's rows say which engine made them, while the run id stays a
function of the values (model bytes, rendering, stored dtype) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cna_dist.prompts.batching import Limits

if TYPE_CHECKING:
    from cna_dist.model.loglik import Request

Prompts = Sequence[Sequence[int]]  # token ids, one list per prompt
CAAVectors = dict[int, list[float]]  # layer -> the contrastive MLP-output vector, as plain data
Part = tuple[int, int, np.ndarray]  # rows [prompt, layer, neuron] for the layers [lo, hi) of the model
Advice = dict[str, Any]  # a shard size: {"rows", "tokens", "reason"}


class CaptureEngine(Protocol):
    name: str  # the engine's own name (`single`, `device_map`, `pipeline`, `stream`), as made_by records it
    n_layers: int
    intermediate_size: int
    concurrent: bool  # whether calls may overlap (a pipeline interleaves them); else the replica serialises them

    def made_by(self) -> dict[str, str]:
        """backend (the library family, `hf`), library with its version, and this engine's name: recorded in every
        shard's commit marker."""
        ...

    def capture_parts(self, token_ids: Prompts, dtype: str, limits: Limits) -> tuple[list[Part], int]:
        """Every prompt's activations in prompt order and store dtype, as parts covering all layers in order (one
        per pipeline stage, or one for the whole model), and the float16 overflow count."""
        ...

    def advise(self, mean_tokens: float, limits: Limits) -> Advice | None:
        """The shard size this engine needs for prompts of `mean_tokens` tokens, measured on its device, with the
        reason; None when the store's default suits it."""
        ...

    def close(self) -> None:
        """Release hooks and workers (a replica in this process outlives its engine)."""
        ...


class Generator(Protocol):
    def generate(self, token_ids: Prompts, condition: dict[str, Any], max_new_tokens: int, limits: Limits) -> list[str]:
        """Greedy completions under a steering condition (plain data: see cna_dist.steer.hooks.condition)."""
        ...

    def caa_vectors(self, pos_ids: Prompts, neg_ids: Prompts, layers: Sequence[int], limits: Limits) -> CAAVectors:
        """CAA's mean_pos - mean_neg of each layer's MLP output at the last real token."""
        ...

    def loglikelihoods(
        self, requests: Sequence[Request], condition: dict[str, Any], limits: Limits
    ) -> list[tuple[float, bool]]:
        """(log-probability, is-greedy) of each (context, continuation) pair under a steering condition."""
        ...
