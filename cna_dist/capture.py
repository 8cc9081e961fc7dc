"""Capture: the input of every mlp.down_proj at the last real token, batched by length under a token budget.

Rows are left-padded, so the last real token of every row sits at position -1 and the hook gathers
`x[:, -1]` on the device. Position ids come from the attention mask so a padded row sees exactly the
positions it would see alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cna_dist.model import decoder, down_projs


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Group prompt indices into batches of similar length whose padded size fits the budget.

    A prompt longer than the budget gets a batch of its own rather than being cut.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and (len(current) >= max_batch_size or (len(current) + 1) * longest_if_added > token_budget):
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


@dataclass
class Batch:
    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(token_ids: Sequence[Sequence[int]], indices: list[int], pad_id: int) -> Batch:
    width = max(len(token_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        seq = token_ids[i]
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return Batch(indices, ids, mask)


def batches(token_ids: Sequence[Sequence[int]], pad_id: int, token_budget: int,
            max_batch_size: int) -> Iterator[Batch]:
    for indices in plan_batches([len(t) for t in token_ids], token_budget, max_batch_size):
        yield collate(token_ids, indices, pad_id)


class Capturer:
    """Hooks registered once on every down_proj; each forward fills one device buffer [batch, layer, neuron]."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.decoder = decoder(model)
        self.projs = down_projs(model)
        self.n_layers = len(self.projs)
        self.intermediate_size = self.projs[0].in_features
        self.device = self.decoder.embed_tokens.weight.device
        self._buffer: torch.Tensor | None = None
        self._handles = [p.register_forward_pre_hook(self._hook(layer)) for layer, p in enumerate(self.projs)]

    def _hook(self, layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if self._buffer is not None:
                self._buffer[:, layer].copy_(args[0][:, -1], non_blocking=True)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Capturer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Activations [rows, layers, neurons] on the host, in the model's dtype; one copy per batch."""
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        dtype = self.projs[0].weight.dtype
        self._buffer = torch.empty((ids.shape[0], self.n_layers, self.intermediate_size), dtype=dtype,
                                   device=self.device)
        try:
            self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            out = self._buffer
        finally:
            self._buffer = None
        return out.to("cpu")


STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


def to_store_dtype(acts: torch.Tensor, dtype: str) -> tuple[np.ndarray, int]:
    """Convert to the stored dtype; values beyond float16's range saturate and are counted, never inf."""
    values = acts.float().numpy()
    overflow = 0
    if dtype == "float16":
        limit = float(np.finfo(np.float16).max)
        over = np.abs(values) > limit
        overflow = int(over.sum())
        if overflow:
            values = np.clip(values, -limit, limit)
    return values.astype(STORE_DTYPES[dtype]), overflow


def capture_with(capturer: Capturer, token_ids: Sequence[Sequence[int]], pad_id: int, *, dtype: str = "float32",
                 token_budget: int = 8192, max_batch_size: int = 64,
                 on_batch: Callable[[Batch], None] | None = None) -> tuple[np.ndarray, int]:
    """All prompts' activations [prompt, layer, neuron] in prompt order, plus the float16 overflow count."""
    out = np.empty((len(token_ids), capturer.n_layers, capturer.intermediate_size), dtype=STORE_DTYPES[dtype])
    overflow = 0
    for batch in batches(token_ids, pad_id, token_budget, max_batch_size):
        values, n_over = to_store_dtype(capturer.forward(batch), dtype)
        out[batch.indices] = values
        overflow += n_over
        if on_batch is not None:
            on_batch(batch)
    return out, overflow


def capture(model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, **kwargs: Any) -> tuple[
        np.ndarray, int]:
    """capture_with on hooks registered for this call only; replicas keep one Capturer for their lifetime."""
    with Capturer(model) as capturer:
        return capture_with(capturer, token_ids, pad_id, **kwargs)
