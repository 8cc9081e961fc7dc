"""Engine plumbing every capture engine shares: devices, events, positions from the mask, the device-built SDPA
mask and the store-dtype conversion with its float16 overflow count.

Single-device capture, pipeline stages and the stream engine import these from here, and no engine imports another.
"""

from __future__ import annotations

from collections.abc import Callable
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
