"""The rows recorder of dense families: each neuron module's input at the last position, written on the device.

Every engine's forward runs the same modules, so one recorder serves them all (`arch.Family.rows` builds it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch


class LastTokenRows:
    """Forward pre-hooks on neuron modules: inside `into(buffer)`, each forward writes module k's input at the last
    position (left padding puts every row's last real token there) into buffer[:, k], on the device.

    The rows recorder of every dense family (`cna_dist.model.arch`), whichever engine runs the forward.
    """

    def __init__(self, projs: Sequence[torch.nn.Module]):
        self.buffer: torch.Tensor | None = None
        self._handles = [p.register_forward_pre_hook(self._hook(k)) for k, p in enumerate(projs)]

    def _hook(self, k: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if self.buffer is not None:
                self.buffer[:, k].copy_(args[0][:, -1], non_blocking=True)

        return hook

    @contextmanager
    def into(self, buffer: torch.Tensor) -> Iterator[torch.Tensor]:
        self.buffer = buffer
        try:
            yield buffer
        finally:
            self.buffer = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
