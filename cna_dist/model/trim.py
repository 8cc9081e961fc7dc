"""Compute only what a capture row needs from the last decoder layer, and nothing after it.

A row is every layer's down_proj input at the last position. Past the last layer's down_proj input nothing
is read: not its down projection, not the residual add, not the final norm (the lm_head is never run). And
in the last layer's MLP only the last position is read, so its gate/up/activation run on that one position.

`LastLayerTrim` does both with two hooks on the last layer, live only inside `active()`: a forward pre-hook on
its MLP keeps the last position of the MLP input, and a forward pre-hook on its down_proj, registered after
the row-recording hook, ends the forward by raising `StopForward`, which `active()` swallows. Outside
`active()` the hooks do nothing, so generation and steering through the same model are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the last down_proj's pre-hook once its input is recorded: the rest of the forward is unused."""


class LastLayerTrim:
    """Hooks on the last decoder layer that cut its MLP to the last position and stop at its down_proj."""

    def __init__(self, mlp: torch.nn.Module, down_proj: torch.nn.Module):
        self._on = False
        self._handles = [
            mlp.register_forward_pre_hook(self._last_position),
            down_proj.register_forward_pre_hook(self._stop),
        ]

    def _last_position(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not self._on or not args or args[0].dim() != 3:
            return None
        return (args[0][:, -1:], *args[1:])

    def _stop(self, module: torch.nn.Module, args: tuple) -> None:
        if self._on:
            raise StopForward

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within this block a forward through the model ends at the last down_proj's input, without error."""
        self._on = True
        try:
            yield
        except StopForward:
            pass
        finally:
            self._on = False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
