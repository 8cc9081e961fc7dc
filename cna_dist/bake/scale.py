"""The arithmetic of a bake on one tensor's bytes: columns multiplied by M, then (optionally) a dtype change.

Multiplying column j of a down projection by m equals multiplying its input j by m before the product: for m = 0
and powers of two the two are bit-identical in any float dtype (they commute with rounding); otherwise they agree
within the dtype's rounding. The scaling is done in the wider of the source and target dtypes.
"""

from __future__ import annotations

import torch

TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def transformed(
    data: bytearray,
    dtype: str,
    shape: tuple[int, ...],
    columns: list[tuple[int | None, int]],
    multiplier: float,
    out_dtype: str | None = None,
) -> memoryview:
    """The tensor stored in `data` (little-endian `dtype`, `shape`) with `columns` scaled, as `out_dtype` bytes.

    `columns`: (expert row of a [E, H, I] tensor or None for [H, I], column). `data` is modified in place when
    the dtype stays.
    """
    t = torch.frombuffer(data, dtype=TORCH[dtype]).view(shape) if len(data) else torch.empty(shape, dtype=TORCH[dtype])
    target = TORCH[out_dtype or dtype]
    if columns and target.itemsize > t.dtype.itemsize:
        t = t.to(target)  # widen first: the scaling then rounds once, in the wider dtype
    for row, col in columns:
        view = t[:, col] if row is None else t[row, :, col]
        view.mul_(multiplier)
    t = t.to(target).contiguous()
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
