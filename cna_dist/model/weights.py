"""A checkpoint's safetensors files checked against its config before anything loads them.

transformers fills a tensor the files lack with random values and only warns: a circuit mined on such a model is
wrong and nothing says so. Reading each file's header (8 bytes and a JSON index, never the data) shows every
tensor's name and shape and where its bytes end, so a missing or wrongly shaped tensor and a truncated file are
named here, by file and tensor. `.bin` checkpoints are pickles whose index cannot be read without unpickling:
they are left to transformers (which loads them with weights_only).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from cna_dist.errors import BadInput
from cna_dist.io import uri as urimod

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit


def header(fs: Any, path: str, size: int, source: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one safetensors file; a truncated or malformed file is bad input naming it."""
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{size} bytes: too short for a safetensors file", source=source)
        (length,) = struct.unpack("<Q", head)
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise BadInput(f"header length {length} does not fit the file's {size} bytes (truncated?)", source=source)
        try:
            index = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise BadInput(
                "safetensors header is not valid JSON (truncated or not a safetensors file)", source=source
            ) from None
    if not isinstance(index, dict):
        raise BadInput("safetensors header is not a JSON object", source=source)
    index.pop("__metadata__", None)
    try:
        end = max((int(t["data_offsets"][1]) for t in index.values()), default=0)
        shapes = {name: tuple(int(d) for d in t["shape"]) for name, t in index.items()}
    except (TypeError, KeyError, IndexError, ValueError):
        raise BadInput("safetensors header entries lack shape or data_offsets", source=source) from None
    if 8 + length + end != size:
        raise BadInput(f"{size} bytes, but its header says {8 + length + end}: truncated or padded", source=source)
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
    for entry in files:
        name = str(entry["name"])
        for tensor, shape in header(fs, name, int(entry["size"]), name).items():
            found[tensor] = (shape, name)
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
