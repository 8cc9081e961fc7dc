"""Device rows to host arrays through a fixed set of pinned buffers, one asynchronous copy and event each.

Pinned host memory is slow to allocate, and PyTorch's pinned allocator keeps every block it ever handed out: a
fresh pinned buffer per micro-batch and stage grows to about twice a shard's rows per concurrent call and is
never given back. A ring of `slots` buffers, grown to the largest micro-batch, bounds it: before a slot is reused,
the copy it last received is waited for (its event) and filed into its target array. `flush` files every copy
still in flight (a call's end, or its failure: nothing it wrote may be freed while a copy into it is queued).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np
import torch


class PinnedRing:
    """`put(values, target, index)`: `target[index] = values` once the copy is done (on CUDA, asynchronously)."""

    def __init__(self, slots: int = 4):
        self.slots: list[torch.Tensor | None] = [None] * slots
        self.next = 0
        self.inflight: deque[tuple[np.ndarray, Any, torch.Tensor, Any]] = deque()
        self.lock = threading.Lock()  # the worker puts, the caller flushes

    def put(self, values: torch.Tensor, target: np.ndarray, index: Any) -> None:
        cuda = values.device.type == "cuda"
        with self.lock:
            if len(self.inflight) == len(self.slots):
                self._file_oldest()  # the copy into the slot about to be reused: queued `slots` puts ago
            k, self.next = self.next, (self.next + 1) % len(self.slots)
            nbytes = values.numel() * values.element_size()
            slot = self.slots[k]
            if slot is None or slot.numel() < nbytes:
                slot = self.slots[k] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
            host = slot[:nbytes].view(values.dtype).view(values.shape)
            host.copy_(values, non_blocking=cuda)
            event = None
            if cuda:  # on the CPU the copy has happened: the ring only bounds the buffers (how tests run it)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(values.device))
            self.inflight.append((target, index, host, event))

    def flush(self) -> None:
        with self.lock:
            while self.inflight:
                self._file_oldest()

    def _file_oldest(self) -> None:
        target, index, host, event = self.inflight.popleft()
        if event is not None:
            event.synchronize()
        target[index] = host.numpy()

    def nbytes(self) -> int:
        """Pinned bytes held: fixed once the largest micro-batch has been seen."""
        return sum(s.numel() for s in self.slots if s is not None)
