"""Prompts into batches: grouped by length under a token budget, left-padded so the last real token is at -1.

Capture, generation and CAA all batch this way, so a padded row always sees what it would see alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Limits:
    """How big a batch may get: padded tokens (rows x longest prompt) and rows. A longer prompt goes alone."""

    token_budget: int = 8192
    max_batch_size: int = 64


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
    lengths: list[int] | None = None

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens; from the host-side lengths, so reading it never touches a device."""
        if self.lengths is not None:
            return sum(self.lengths)
        return int(self.attention_mask.sum())


def collate(token_ids: Sequence[Sequence[int]], indices: list[int], pad_id: int, *, pin: bool = False) -> Batch:
    """Left-padded ids and mask on the host; `pin` puts them in page-locked memory for an async upload."""
    lengths = [len(token_ids[i]) for i in indices]
    width = max(lengths)
    ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(indices), width), dtype=np.int64)
    for row, i in enumerate(indices):
        ids[row, width - lengths[row] :] = token_ids[i]
        mask[row, width - lengths[row] :] = 1
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    if pin:
        ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
    return Batch(indices, ids_t, mask_t, lengths)


def batches(
    token_ids: Sequence[Sequence[int]], pad_id: int, token_budget: int, max_batch_size: int, *, pin: bool = False
) -> Iterator[Batch]:
    for indices in plan_batches([len(t) for t in token_ids], token_budget, max_batch_size):
        yield collate(token_ids, indices, pad_id, pin=pin)
