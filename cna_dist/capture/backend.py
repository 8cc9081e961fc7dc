"""The capture-backend seam: what a replica needs from a loaded model, and nothing else.

A replica (in process or on Ray) holds one backend, whichever engine it is (`cna_dist.capture.registry`
picks it), and calls only these methods, so another engine or inference library plugs in without editing the
store, the reduce or the runtime. This module defines the seam only and imports no implementation. `made_by`
goes into every shard's commit marker: a run's rows say how they were made, while the run id stays a function of
the values (model bytes, rendering, stored dtype) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from cna_dist.prompts.batching import Limits

Prompts = Sequence[Sequence[int]]  # token ids, one list per prompt
CAAVectors = dict[int, list[float]]  # layer -> the contrastive MLP-output vector, as plain data
Part = tuple[int, int, np.ndarray]  # rows [prompt, layer, neuron] for the layers [lo, hi) of the model


class CaptureBackend(Protocol):
    name: str
    n_layers: int
    intermediate_size: int
    concurrent: bool  # whether calls may overlap (a pipeline interleaves them); else the replica serialises them

    def made_by(self) -> dict[str, str]:
        """backend, library (with its version) and engine: recorded in every shard's commit marker."""
        ...

    def capture_parts(self, token_ids: Prompts, dtype: str, limits: Limits) -> tuple[list[Part], int]:
        """Every prompt's activations in prompt order and store dtype, as parts covering all layers in order (one
        per pipeline stage, or one for the whole model), and the float16 overflow count."""
        ...

    def generate(self, token_ids: Prompts, condition: dict[str, Any], max_new_tokens: int, limits: Limits) -> list[str]:
        """Greedy completions under a steering condition (plain data: see cna_dist.steer.hooks.condition)."""
        ...

    def caa_vectors(self, pos_ids: Prompts, neg_ids: Prompts, layers: Sequence[int], limits: Limits) -> CAAVectors:
        """CAA's mean_pos - mean_neg of each layer's MLP output at the last real token."""
        ...

    def close(self) -> None:
        """Release hooks and workers (a replica in this process outlives its backend)."""
        ...
