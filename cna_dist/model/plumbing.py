"""Engine plumbing every capture engine shares: devices, events, positions from the mask, the device-built SDPA
mask, the last-token rows recorder and the store-dtype conversion with its float16 overflow count.

Single-device capture, pipeline stages and the stream engine import these from here, and no engine imports another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
_TORCH_STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
FLOAT16_MAX = float(np.finfo(np.float16).max)


def made_by(backend: str, engine: str, **extra: str) -> dict[str, str]:
    """What a shard's commit marker records about how its rows were made: backend, library version, engine."""
    import transformers

    return {"backend": backend, "library": f"transformers {transformers.__version__}", "engine": engine, **extra}


def check_store_dtype(dtype: str) -> None:
    if dtype not in STORE_DTYPES:
        raise ValueError(f"capture dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")


def to_store(values: torch.Tensor, dtype: str, overflow: torch.Tensor) -> torch.Tensor:
    """The store dtype on the values' device; beyond float16's range saturates and is added to `overflow`."""
    values = values.float()
    if dtype == "float16":
        overflow += (values.abs() > FLOAT16_MAX).sum()
        values = values.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return values.to(_TORCH_STORE_DTYPES[dtype])


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a left-padding mask: each row sees the positions it would see alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def devices(n_stages: int, gpus: int) -> list[torch.device]:
    """One GPU per stage on a multi-GPU replica; every stage on the one GPU, or on the CPU, otherwise."""
    if gpus <= 0 or not torch.cuda.is_available():
        return [torch.device("cpu")] * n_stages
    if gpus == 1:
        return [torch.device("cuda", 0)] * n_stages
    return [torch.device("cuda", i) for i in range(n_stages)]


def event(stream: Any) -> Any:
    """A CUDA event recorded on `stream` now (None on the CPU, where everything has already happened)."""
    if stream is None:
        return None
    recorded = torch.cuda.Event()
    recorded.record(stream)
    return recorded


def mask_maker(config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from the 2D padding mask to the mask to pass the decoder, built on the device.

    transformers' own 2D-mask path reads the mask on the host to decide whether it may skip it, a sync per batch.
    For SDPA the 4D mask it would build is made here instead: causal and key-is-real; a padding query also sees
    itself so no row is fully masked (no NaN from any SDPA kernel), which changes nothing for real rows. Only
    while the batch fits a sliding window, where the window changes nothing either; otherwise the 2D mask goes
    through and transformers builds the right one (with its host read) for any attention and window.
    """
    sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and window > 0 else None

    def make(mask: torch.Tensor) -> torch.Tensor:
        width = mask.shape[1]
        if not sdpa or (window is not None and width > window):
            return mask
        causal = torch.ones((width, width), dtype=torch.bool, device=mask.device).tril_()
        eye = torch.eye(width, dtype=torch.bool, device=mask.device)
        return ((causal & mask.bool()[:, None, :]) | eye)[:, None]

    return make


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
