"""`bake`: write a checkpoint with a circuit's neurons scaled by M in the weights (SPEC section 2, "Baked model").

Every check that can fail on input runs before the first byte is written: the circuit, the model (default: the
circuit's own), its fingerprint against the circuit's, the circuit's shape against the tensors found, every neuron
placed on a column, and the output folder (empty, or an unfinished run of this same bake, which is then finished).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from datetime import UTC, datetime
from typing import Any

from cna_dist import __version__
from cna_dist.bake import card, columns, writer
from cna_dist.bake import header as headermod
from cna_dist.bake.scale import NAMES
from cna_dist.circuit import file as circuitmod
from cna_dist.errors import BadInput
from cna_dist.model import checkpoint
from cna_dist.store import uri as urimod
from cna_dist.store.download import Settings

WEIGHT_SUFFIX = ".safetensors"
NOT_COPIED = {writer.CARD, writer.RECORD}  # replaced by the bake's own
UNBAKED_SUFFIXES = (".bin", ".pt", ".pth", ".gguf", ".ckpt")  # weights bake cannot rewrite: never copied unchanged


def run(
    circuit_uri: str,
    multiplier: float,
    out_uri: str,
    model_uri: str | None = None,
    dtype: str | None = None,
    settings: Settings | None = None,
) -> tuple[str, writer.Stats | None]:
    """Bake; returns (the output URI, what was written; None when the bake was already complete there)."""
    if not math.isfinite(multiplier):
        raise BadInput(f"expected a finite number, got {multiplier}", field="--multiplier")
    c = circuitmod.load(circuit_uri)
    field = "--model" if model_uri else f"{circuit_uri}: model.uri"
    model_uri = model_uri or c.model.uri
    config = checkpoint.read_config(model_uri, field=field)
    src = writer.Location(*urimod.filesystem(model_uri))
    files = _listing(src, model_uri)
    headers = {n: headermod.read(src.fs, src.join(n), size) for n, size in files.items() if n.endswith(WEIGHT_SUFFIX)}
    tensors = _tensors(headers, model_uri)
    lay = columns.layout({t: info for t, (info, _) in tensors.items()}, model_uri)
    _check_fits(c, lay, circuit_uri)
    fingerprint = checkpoint.fingerprint(model_uri)
    if fingerprint != c.model.fingerprint:
        raise BadInput(
            f"circuit {c.name} v{c.version} was mined on {c.model.uri} (fingerprint {c.model.fingerprint[:12]}), "
            f"not this model (fingerprint {fingerprint[:12]})",
            source=model_uri,
            field=field,
        )
    edits = columns.place(lay, c.pairs(), model_uri)
    out = writer.Location(*urimod.filesystem(out_uri))
    if urimod.resolve(out_uri, None) == urimod.resolve(model_uri, None):
        raise BadInput("the output folder is the source model's folder", field="--out")
    st = NAMES[dtype] if dtype else None
    key = _key(circuit_uri, multiplier, fingerprint, st)
    if _out_state(out, key, out_uri) == "done":
        return out_uri, None
    plan = _plan(src, out, key, multiplier, files, headers, tensors, edits, st, config)
    rec = card.record(
        key=key,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        circuit={
            "uri": circuit_uri,
            "name": c.name,
            "version": c.version,
            "sha256": _sha256(circuit_uri),
            "neurons": len(c.neurons),
            "model_fingerprint": c.model.fingerprint,
        },
        multiplier=multiplier,
        source={"uri": model_uri, "fingerprint": fingerprint, "architecture": c.model.architecture},
        dtype=dtype,
        tensors={t: len(cols) for t, cols in sorted(edits.items())},
        files={wf.name: wf.size_out() for wf in plan.weights},
        package_version=__version__,
    )

    def finals(output: writer.Output) -> None:
        output.put(writer.CARD, card.model_card(rec).encode())
        output.put(writer.RECORD, (json.dumps(rec, indent=1) + "\n").encode())

    stats = writer.execute(plan, settings or Settings.from_env(), finals)
    return out_uri, stats


def _listing(src: writer.Location, uri: str) -> dict[str, int]:
    """Top-level files to bake or copy, name -> size (sub-folders, e.g. a repository's original/ weights, are not
    part of the transformers checkpoint and are left out)."""
    src.fs.invalidate_cache(src.path)
    entries = [e for e in src.fs.ls(src.path, detail=True) if e.get("type") == "file"]
    files = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries}
    if not any(n.endswith(WEIGHT_SUFFIX) for n in files):
        raise BadInput("bake reads safetensors checkpoints only: no *.safetensors file", source=uri)
    return files


def _tensors(headers: dict[str, headermod.Header], uri: str) -> dict[str, tuple[columns.TensorInfo, str]]:
    out: dict[str, tuple[columns.TensorInfo, str]] = {}
    for name, h in sorted(headers.items()):
        for e in h.entries:
            if e.name in out:
                raise BadInput(f"tensor {e.name!r} is in both {out[e.name][1]} and {name}", source=uri)
            out[e.name] = (e.info, name)
    return out


def _check_fits(c: circuitmod.Circuit, lay: columns.Layout, circuit_uri: str) -> None:
    for fld, said, actual in (
        ("model.n_layers", c.model.n_layers, lay.n_layers),
        ("model.intermediate_size", c.model.intermediate_size, lay.max_width),
    ):
        if said != actual:
            raise BadInput(f"{said}, but the model's down projections give {actual}", source=circuit_uri, field=fld)


def _sha256(uri: str) -> str:
    fs, path = urimod.filesystem(uri)
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def _key(circuit_uri: str, multiplier: float, fingerprint: str, dtype: str | None) -> str:
    blob = {"circuit": _sha256(circuit_uri), "m": multiplier, "source": fingerprint, "dtype": dtype, "v": card.SCHEMA}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def _out_state(out: writer.Location, key: str, out_uri: str) -> str:
    """ "fresh", "resume" (an unfinished run of this bake) or "done"; anything else there is refused."""
    fs = out.fs
    fs.invalidate_cache(out.path)
    if not fs.exists(out.path):
        return "fresh"
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(out.path, detail=False)}
    if writer.RECORD in names:
        rec = json.loads(fs.cat_file(out.join(writer.RECORD)))
        if rec.get("key") == key:
            return "done"
        raise BadInput(
            f"holds another bake (circuit {rec.get('circuit', {}).get('uri')}, M = {rec.get('multiplier')}); "
            "choose another --out",
            source=out_uri,
            field="--out",
        )
    if writer.PARTIAL in names:
        keys = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(out.join(writer.PARTIAL), detail=False)}
        if key in keys:
            return "resume"
        raise BadInput("holds an unfinished bake of another circuit, M or model; choose another --out", source=out_uri)
    if names:
        raise BadInput(f"is not empty ({len(names)} entries, e.g. {sorted(names)[0]!r})", source=out_uri, field="--out")
    return "fresh"


def _plan(
    src: writer.Location,
    out: writer.Location,
    key: str,
    multiplier: float,
    files: dict[str, int],
    headers: dict[str, headermod.Header],
    tensors: dict[str, tuple[columns.TensorInfo, str]],
    edits: columns.Edits,
    dtype: str | None,
    config: dict[str, Any],
) -> writer.Plan:
    names = sorted(headers)
    changes = writer.dtype_changes([headers[n] for n in names], names, dtype)
    weights = [
        writer.WeightFile(
            n, headers[n], {t: cols for t, cols in edits.items() if tensors[t][1] == n}, changes.get(n, {})
        )
        for n in names
    ]
    skipped = sorted(n for n in files if n.endswith(UNBAKED_SUFFIXES))
    if skipped:
        print(f"not copied (weights bake does not rewrite): {', '.join(skipped)}", file=sys.stderr)
    others = {
        n: s
        for n, s in files.items()
        if n not in headers and n not in NOT_COPIED and not n.endswith(UNBAKED_SUFFIXES) and not n.startswith(".")
    }
    plan = writer.Plan(src, out, key, multiplier, weights, others)
    if dtype is not None:
        plan.rewritten_text["config.json"] = _config_with_dtype(config, dtype)
        for name in [n for n in others if n.endswith(writer.INDEX_SUFFIX)]:
            index = json.loads(src.fs.cat_file(src.join(name)))
            index.setdefault("metadata", {})["total_size"] = sum(_data_size(wf) for wf in weights)
            plan.rewritten_text[name] = (json.dumps(index, indent=2) + "\n").encode()
    return plan


def _data_size(wf: writer.WeightFile) -> int:
    _, spans = headermod.relaid(wf.header, wf.dtypes)
    return sum(b - a for a, b in spans.values())


def _config_with_dtype(config: dict[str, Any], dtype: str) -> bytes:
    name = {v: k for k, v in NAMES.items()}[dtype]
    new = dict(config)
    new["dtype"] = name
    if "torch_dtype" in new:
        new["torch_dtype"] = name
    return (json.dumps(new, indent=2, sort_keys=True) + "\n").encode()
