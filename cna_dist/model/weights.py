"""A checkpoint's safetensors files checked against its config before anything loads them.

transformers fills a tensor the files lack with random values and only warns: a circuit mined on such a model is
wrong and nothing says so. Reading each file's header (8 bytes and a JSON index, never the data: two ranged reads,
so a remote checkpoint is checked without fetching its weights) shows every tensor's dtype, shape and byte range.
Every entry is checked the way the safetensors loader will check it, and more plainly named: a known dtype, a
shape whose size times the dtype's item size is its byte range, ranges that tile the data exactly (no overlap, no
gap, none past the end). The loader's own message names neither the file nor the tensor, and by the time a replica
loads the file the run has started; here a bad entry is bad input, by file and tensor, before anything is written.
`.bin` checkpoints are pickles whose index cannot be read without unpickling: they are left to transformers (which
loads them with weights_only).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from cna_dist.errors import BadInput
from cna_dist.store import uri as urimod

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
# The dtypes the safetensors loader turns into torch tensors, with their item size in bytes.
ITEM_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "C64": 8,
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys: a tensor named twice would hide the first entry."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"tensor {key!r} is listed twice")
        out[key] = value
    return out


def _read_index(fs: Any, path: str, size: int, source: str) -> tuple[int, dict[str, Any]]:
    """(header length, the JSON index) of one file, read as two byte ranges: nothing past the header."""
    if size < 8:
        raise BadInput(f"{size} bytes: too short for a safetensors file (truncated?)", source=source)
    (length,) = struct.unpack("<Q", fs.cat_file(path, start=0, end=8))
    if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
        raise BadInput(f"header length {length} does not fit the file's {size} bytes (truncated?)", source=source)
    raw = fs.cat_file(path, start=8, end=8 + length)
    try:
        index = json.loads(raw, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        if "listed twice" in str(exc):
            raise BadInput(f"safetensors header: {exc}", source=source) from None
        raise BadInput(
            "safetensors header is not valid JSON (truncated or not a safetensors file)", source=source
        ) from None
    except RecursionError:
        raise BadInput("safetensors header is nested too deeply (not a safetensors file)", source=source) from None
    if not isinstance(index, dict):
        raise BadInput("safetensors header is not a JSON object", source=source)
    index.pop("__metadata__", None)
    return length, index


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def entry(name: str, info: Any, source: str) -> tuple[tuple[int, ...], int, int]:
    """(shape, first byte, end byte) of one header entry, each field checked; the size must match the range."""
    field = f"tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise BadInput(f"{field}: the entry lacks dtype, shape or data_offsets", source=source)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise BadInput(f"{field}: unknown dtype {dtype!r} (known: {', '.join(ITEM_BYTES)})", source=source)
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise BadInput(f"{field}: shape {shape!r} is not a list of non-negative integers", source=source)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)):
        raise BadInput(f"{field}: data_offsets {offsets!r} is not two non-negative integers", source=source)
    begin, end = offsets
    nbytes = math.prod(shape) * ITEM_BYTES[dtype]
    if end < begin or end - begin != nbytes:
        raise BadInput(
            f"{field}: shape {shape} of {dtype} is {nbytes} bytes, but its data_offsets {offsets} hold {end - begin}",
            source=source,
        )
    return tuple(shape), begin, end


def _tiled(ranges: list[tuple[int, int, str]], data: int, source: str) -> None:
    """The byte ranges cover the data exactly once, in order (the safetensors loader requires it too)."""
    at, last = 0, None
    for begin, end, name in sorted(ranges):
        if begin < at:
            raise BadInput(
                f"tensors {last!r} and {name!r} overlap: bytes [{begin}, {at}) belong to both", source=source
            )
        if begin > at:
            raise BadInput(f"bytes [{at}, {begin}) of the data belong to no tensor (before {name!r})", source=source)
        if end > data:
            raise BadInput(
                f"tensor {name!r} ends at byte {end} of the data, past the file's {data} (truncated?)", source=source
            )
        at, last = end, name
    if at != data:
        raise BadInput(f"{data} bytes of data, but its header says {at}: truncated or padded", source=source)


def header(fs: Any, path: str, size: int, source: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one safetensors file, every entry checked; a bad file is bad input naming it."""
    length, index = _read_index(fs, path, size, source)
    shapes: dict[str, tuple[int, ...]] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in index.items():
        shape, begin, end = entry(name, info, source)
        shapes[name] = shape
        ranges.append((begin, end, name))
    _tiled(ranges, size - 8 - length, source)
    return shapes


def expected(config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(tensor name -> shape every checkpoint of this config must hold, names it may leave out as tied).

    Built on the meta device from the config alone: no memory, no weights, and exact for any architecture.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)  # a model_type transformers knows (validated before): no code from the hub
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if getattr(cfg, "tie_word_embeddings", 0) else set()
    return shapes, tied


def check(
    uri: str, config: dict[str, Any], storage_options: dict[str, Any] | None = None, field: str = "model.uri"
) -> int:
    """Every tensor the config needs is in the checkpoint's safetensors files, whole and of its shape.

    Returns the number of safetensors files read (0: a `.bin` checkpoint, left to transformers).
    """
    fs, path = urimod.filesystem(uri, storage_options)
    files = sorted(
        (e for e in fs.ls(path, detail=True) if str(e["name"]).endswith(".safetensors")), key=lambda e: e["name"]
    )
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for listed in files:
        source = uri.rstrip("/") + "/" + str(listed["name"]).rstrip("/").rsplit("/", 1)[-1]
        try:
            shapes = header(fs, str(listed["name"]), int(listed["size"]), source)
        except BadInput as exc:  # the same message, also naming the manifest field that points at the checkpoint
            raise BadInput(str(exc).removeprefix(f"{source}: "), source=source, field=field) from None
        for tensor, shape in shapes.items():
            if tensor in found:  # two files naming one tensor: which one transformers keeps is an accident
                raise BadInput(f"tensor {tensor!r} is also in {found[tensor][1]}", source=source, field=field)
            found[tensor] = (shape, source)
    if not files:
        return 0
    try:
        want, tied = expected(config)
    except Exception as exc:  # noqa: BLE001 - transformers refuses a config in many ways, each the config's fault
        raise BadInput(
            f"config.json describes no model transformers can build: {type(exc).__name__}: {exc}",
            source=uri,
            field=field,
        ) from None
    from cna_dist.model import moe  # torch, as `expected` needs it: only once a checkpoint has weight files

    want = moe.as_saved(str(config.get("model_type")), want, set(found))  # experts are saved one by one
    missing = [name for name in want if name not in found and name not in tied]
    if missing:
        raise BadInput(
            f"the checkpoint lacks {len(missing)} tensor{'s' if len(missing) > 1 else ''} its config needs, e.g. "
            f"{missing[0]!r} (transformers would fill them with random values)",
            source=uri,
            field=field,
        )
    for name, shape in want.items():
        if name in found and found[name][0] != shape:
            raise BadInput(
                f"tensor {name!r} has shape {list(found[name][0])}, the config needs {list(shape)}",
                source=found[name][1],
                field=field,
            )
    return len(files)
