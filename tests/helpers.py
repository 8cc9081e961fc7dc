"""Shortcuts the tests take through the package's real paths, kept here rather than in the package.

`capture`: single-device capture on hooks registered for one call (a replica keeps one `Capturer` for its life).
`write_shard`: one writer for a whole shard, all its layers and then its commit marker (a replica writes its
parts with `Run.write_rows` and commits them the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cna_dist.capture.single import Capturer, capture_with
from cna_dist.store.activations import Run, ShardPlan


def capture(
    model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, **kwargs: Any
) -> tuple[np.ndarray, int]:
    """All prompts' activations [prompt, layer, neuron] and the float16 overflow count, as a replica captures."""
    with Capturer(model) as capturer:
        return capture_with(capturer, token_ids, pad_id, **kwargs)


def write_shard(run: Run, plan: ShardPlan, acts: np.ndarray, writer: str = "") -> None:
    """Every layer of a shard's rows [prompt, layer, neuron] written, then the shard committed."""
    run.commit(plan, [run.write_rows(plan, acts, slice(0, run.meta.n_layers))], writer)
