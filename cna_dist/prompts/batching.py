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


# What one more forward costs, in padded tokens: a forward has a fixed cost (kernel launches, per-layer Python)
# that a few dozen tokens of padding outweigh on a GPU; it keeps the planner from making many tiny batches.
BATCH_OVERHEAD_TOKENS = 32


def plan_batches(
    lengths: Sequence[int], token_budget: int, max_batch_size: int, *, overhead_tokens: int = BATCH_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Group prompt indices into batches of similar length whose padded size fits the budget, wasting little padding.

    Prompts sorted by length are cut into consecutive runs that minimise padded tokens plus `overhead_tokens`
    per batch (an exact dynamic programme over the cut points, O(n x max_batch_size)), under the row and token
    limits. A prompt longer than the budget gets a batch of its own rather than being cut.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    best = [0] + [0] * n  # best[k]: least cost of the first k sorted prompts
    cut = [0] * (n + 1)  # cut[k]: where the last batch of that best plan starts
    for end in range(1, n + 1):
        longest = sizes[end - 1]  # sorted: the batch's last prompt is its longest
        best[end], cut[end] = best[end - 1] + longest + overhead_tokens, end - 1
        for start in range(end - 2, max(-1, end - 1 - max_batch_size), -1):
            rows = end - start
            if rows * longest > token_budget:
                break
            cost = best[start] + rows * longest + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches: list[list[int]] = []
    end = n
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


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
