"""What a store object must hold before a row is trusted: run.json's fields, the array's record, commit markers.

Everything here guards against damage at rest (a truncated write, a hand edit, a flipped byte): a value that could
make a row read as another prompt's row, or make the reader divide by zero, is refused with the object's path.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, fields
from typing import Any

from cna_dist.errors import RunFailure

HEX64 = re.compile(r"^[0-9a-f]{64}$")
DTYPES = ("float16", "float32")
ARRAY_ATTRIBUTE = "cna_run"  # the run.json a run was created with, kept in the array's own metadata
RECAPTURE = "delete it to capture the shard again"


def _bad(path: str, message: str) -> RunFailure:
    return RunFailure(f"corrupt run metadata {path}: {message}")


def _whole(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def run_meta_fields(data: Any, path: str, cls: type) -> dict[str, Any]:
    """run.json's fields, every one checked for type and range; `cls` is the RunMeta dataclass."""
    if not isinstance(data, dict):
        raise _bad(path, f"not a JSON object ({type(data).__name__})")
    names = {f.name for f in fields(cls)}
    unknown, missing = sorted(set(data) - names), sorted(n for n in names - set(data) if n in REQUIRED)
    if unknown or missing:
        raise _bad(path, f"unknown fields {unknown}" if unknown else f"missing fields {missing}")
    for name, ok in CHECKS.items():
        if name in data and not ok(data[name]):
            raise _bad(path, f"{name} = {data[name]!r}")
    if data.get("shard_rows", 0) % max(1, data.get("rows_per_chunk", 0)):
        raise _bad(path, f"shard_rows {data['shard_rows']} is not whole chunks of {data['rows_per_chunk']} rows")
    return data


REQUIRED = ("fingerprint", "model_uri", "n_layers", "intermediate_size", "dtype", "model_dtype", "chat_template")
CHECKS = {
    "fingerprint": lambda v: isinstance(v, str) and bool(v),
    "model_uri": lambda v: isinstance(v, str),
    "n_layers": lambda v: _whole(v, 1),
    "intermediate_size": lambda v: _whole(v, 1),
    "dtype": lambda v: v in DTYPES,
    "model_dtype": lambda v: isinstance(v, str),
    "chat_template": lambda v: isinstance(v, bool),
    "rows_per_chunk": lambda v: _whole(v, 1),
    "layers_per_chunk": lambda v: _whole(v, 1),
    "shard_rows": lambda v: _whole(v, 1),
}


def check_array(meta: Any, array: Any, path: str) -> None:
    """run.json agrees with the array it describes: shape, chunks, dtype, and the copy kept in its attributes.

    A store written before the copy existed has only the shape, chunk and dtype checks.
    """
    want_chunks = (meta.rows_per_chunk, meta.layers_per_chunk, meta.intermediate_size)
    found = {
        "n_layers, intermediate_size": (tuple(array.shape[1:]), (meta.n_layers, meta.intermediate_size)),
        "rows_per_chunk, layers_per_chunk": (tuple(array.chunks), want_chunks),
        "dtype": (str(array.dtype), meta.dtype),
    }
    for name, (actual, said) in found.items():
        if actual != said:
            raise _bad(path, f"{name} {said} disagree with the activation array's {actual}")
    recorded = dict(array.attrs).get(ARRAY_ATTRIBUTE)
    if recorded is not None:
        for name, value in asdict(meta).items():
            if recorded.get(name) != value:
                raise _bad(path, f"{name} = {value!r}, but the run was created with {recorded.get(name)!r}")


CHECKSUM = "checksum"  # a marker's own field: "sha256:" + the digest of the rest of it, in canonical JSON


def _digest(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != CHECKSUM}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """The marker with its checksum: an edit that keeps the schema (two row hashes swapped, a row hash replaced by
    another prompt's) would otherwise make rows read as other prompts' rows, silently."""
    return {**data, CHECKSUM: _digest(data)}


def marker(raw: bytes, name: str, shard_rows: int) -> dict[str, Any]:
    """A commit marker, checked: its checksum matches its content, its shard is its file's, its rows fit the shard
    and are sha256 hex digests. A marker written before checksums existed has every check but the first."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError(f"not a JSON object ({type(data).__name__})")
        shard, rows = data["shard"], data["rows"]
        if not isinstance(rows, list):
            raise TypeError(f"rows is {type(rows).__name__}, not a list")
        problem = _marker_problem(data, shard, rows, base, shard_rows)
        if problem:
            raise ValueError(problem)
    except Exception as exc:  # noqa: BLE001 - name the object and stop: never guess at a marker
        raise RunFailure(f"corrupt commit marker {name}: {type(exc).__name__}: {exc} ({RECAPTURE})") from exc
    return data


def _marker_problem(data: dict[str, Any], shard: Any, rows: list[Any], base: str, shard_rows: int) -> str | None:
    if not _whole(shard, 0) or f"{shard:08d}.json" != base:
        return f"shard number {shard!r} is not its file's"
    bad = next((r for r in rows if not (isinstance(r, str) and HEX64.match(r))), None)
    if bad is not None:
        return f"row hash {bad!r} is not a sha256 hex digest"
    if shard_rows and len(rows) > shard_rows:
        return f"{len(rows)} rows, over the run's {shard_rows} a shard"
    if "n_rows" in data and data["n_rows"] != len(rows):
        return f"n_rows {data['n_rows']!r} but {len(rows)} row hashes"
    if CHECKSUM in data and data[CHECKSUM] != _digest(data):  # last: a schema fault is named as such first
        return f"its checksum {data[CHECKSUM]!r} does not match its content (edited or damaged)"
    return None
