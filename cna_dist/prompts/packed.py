"""Token ids of many prompts in two arrays (all ids end to end, and where each prompt starts).

Why: a driver of a million prompts that keeps a dict of a million Python lists, and gathers each shard's rows from
it one lookup at a time, pays more per prompt as the dict outgrows the CPU caches. Packed, the ids take a few bytes
per token, a shard's rows are gathered with a few array operations (`take`), and they travel to a replica as two
arrays; the replica unpacks them into the lists its engine takes (`to_lists`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackedIds:
    """Prompt i's token ids are flat[offsets[i]:offsets[i + 1]]."""

    flat: np.ndarray  # int64, every prompt's ids end to end
    offsets: np.ndarray  # int64, len(prompts) + 1, starting at 0

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> PackedIds:
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, positions: np.ndarray) -> PackedIds:
        """The prompts at `positions`, in that order, packed: a shard's rows, without a Python object per row."""
        positions = np.asarray(positions, dtype=np.int64)
        starts = self.offsets[positions]
        lengths = self.offsets[positions + 1] - starts
        offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return PackedIds(self.flat[index], offsets)

    def to_lists(self) -> list[list[int]]:
        ids, bounds = self.flat.tolist(), self.offsets.tolist()
        return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
