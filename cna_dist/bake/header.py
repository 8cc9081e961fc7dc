"""safetensors headers: read one from a file's first bytes, and lay out a new one when tensors change dtype.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets
relative to the data section; plus optional `__metadata__`) and the data. Reading the header needs two ranged reads
of a few KB, never the data, so a 72B checkpoint on object storage is planned without downloading it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from cna_dist.bake.columns import TensorInfo
from cna_dist.errors import BadInput

MAX_HEADER_BYTES = 100 << 20  # the format's own limit
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ITEMSIZE.update({"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1})


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its dtype and shape, and where its bytes are, absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.dtype, self.shape)


@dataclass(frozen=True)
class Header:
    raw: bytes  # the 8-byte length and the JSON, exactly as in the file
    entries: list[Entry]  # in data order
    metadata: dict[str, str] | None
    size: int  # the whole file's size

    @property
    def data_start(self) -> int:
        return len(self.raw)


def read(fs: Any, path: str, size: int) -> Header:
    """The header of the safetensors file `path` (of `size` bytes); a malformed one is bad input naming the file."""
    if size < 8:
        raise BadInput(f"{size} bytes: too short for a safetensors file", source=path)
    (length,) = struct.unpack("<Q", fs.cat_file(path, start=0, end=8))
    if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
        raise BadInput(f"header length {length} does not fit the file's {size} bytes", source=path)
    raw = struct.pack("<Q", length) + fs.cat_file(path, start=8, end=8 + length)
    return parse(raw, size, path)


def parse(raw: bytes, size: int, source: str) -> Header:
    try:
        doc = json.loads(raw[8:])
    except (ValueError, RecursionError):
        raise BadInput("safetensors header is not valid JSON", source=source) from None
    if not isinstance(doc, dict):
        raise BadInput("safetensors header is not a JSON object", source=source)
    metadata = doc.pop("__metadata__", None)
    entries = []
    try:
        for name, t in doc.items():
            lo, hi = (int(x) for x in t["data_offsets"])
            entries.append(
                Entry(name, str(t["dtype"]), tuple(int(d) for d in t["shape"]), len(raw) + lo, len(raw) + hi)
            )
    except (TypeError, KeyError, ValueError):
        raise BadInput("safetensors header entries lack dtype, shape or data_offsets", source=source) from None
    entries.sort(key=lambda e: e.start)
    end = entries[-1].end if entries else len(raw)
    if end != size:
        raise BadInput(f"{size} bytes, but its header says {end}: truncated or padded", source=source)
    for e in entries:
        count = 1
        for d in e.shape:
            count *= d
        if e.dtype in ITEMSIZE and count * ITEMSIZE[e.dtype] != e.end - e.start:
            raise BadInput(f"tensor {e.name!r}: {e.end - e.start} bytes for shape {list(e.shape)}", source=source)
    return Header(raw, entries, metadata, size)


def relaid(header: Header, dtypes: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A header for the same tensors with `dtypes[name]` where given: (its bytes, name -> new absolute (start, end)).

    Tensors keep their order; the JSON is padded with spaces to a multiple of 8 bytes, as safetensors writes it.
    """
    doc: dict[str, Any] = {}
    if header.metadata is not None:
        doc["__metadata__"] = header.metadata
    offset = 0
    spans: dict[str, tuple[int, int]] = {}
    for e in header.entries:
        dtype = dtypes.get(e.name, e.dtype)
        n = (e.end - e.start) // ITEMSIZE[e.dtype] * ITEMSIZE[dtype]
        doc[e.name] = {"dtype": dtype, "shape": list(e.shape), "data_offsets": [offset, offset + n]}
        spans[e.name] = (offset, offset + n)
        offset += n
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    raw = struct.pack("<Q", len(text)) + text
    return raw, {name: (len(raw) + a, len(raw) + b) for name, (a, b) in spans.items()}
