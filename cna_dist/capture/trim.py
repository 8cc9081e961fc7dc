"""Compute nothing past the last value a capture row needs.

A row is every layer's down_proj input at the last position. Past the last layer's down_proj input nothing is
read: not its down projection, not the residual add, not the final norm (the lm_head is never run).

`LastLayerTrim` puts a forward pre-hook on the last layer's neuron module, registered after the row-recording
hook, that ends the forward by raising `StopForward` once the row is recorded; `active()` swallows it. Outside
`active()` the hook does nothing, so generation and steering through the same model are unchanged. Everything
up to that input is computed exactly as before, so rows stay bit-identical to the pipeline's and the stream
engine's (which run the same Stage forward without the stop).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the last neuron module's pre-hook once its input is recorded: the rest of the forward is unused."""


class LastLayerTrim:
    """A hook on the last decoder layer's neuron module that stops the forward there, only inside `active()`."""

    def __init__(self, neuron: torch.nn.Module):
        self._on = False
        self._handles = [neuron.register_forward_pre_hook(self._stop)]

    def _stop(self, module: torch.nn.Module, args: tuple) -> None:
        if self._on:
            raise StopForward

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within this block a forward through the model ends at the last neuron module's input, without error."""
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
