"""What a baked checkpoint says about itself: the provenance record (`cna-bake.json`) and the model card.

The record is the machine-readable half (schema `cna-bake/1`): which circuit (URI, name, version, file hash), which
multiplier, which source model (URI, fingerprint), which tensors were changed, every file's size. Written last, it
doubles as the completion marker. The card (README.md with the Hub's YAML front matter) says the same for people.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA = "cna-bake/1"


def hub_id(uri: str) -> str | None:
    """ORG/NAME of an `hf://ORG/NAME[@REV]` URI, else None."""
    if not uri.startswith("hf://"):
        return None
    return uri[len("hf://") :].split("@", 1)[0].strip("/") or None


def record(
    *,
    key: str,
    created_at: str,
    circuit: dict[str, Any],
    multiplier: float,
    source: dict[str, Any],
    dtype: str | None,
    tensors: dict[str, int],
    files: dict[str, int],
    package_version: str,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "key": key,
        "created_at": created_at,
        "circuit": circuit,
        "multiplier": multiplier,
        "source": source,
        "format": "safetensors",
        "dtype": dtype,
        "changed_tensors": tensors,
        "files": files,
        "package_version": package_version,
    }


def model_card(rec: dict[str, Any]) -> str:
    c, s = rec["circuit"], rec["source"]
    base = hub_id(s["uri"]) or s["uri"]
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        "library_name: transformers",
        "tags:",
        "- cna-dist",
        "- steering",
        "- contrastive-neuron-attribution",
        "---",
        "",
        f"# {c['name']} v{c['version']} baked at M = {rec['multiplier']:g}",
        "",
        f"This checkpoint is `{s['uri']}` (fingerprint `{s['fingerprint']}`) with the {c['neurons']} neurons of the "
        f"CNA circuit `{c['uri']}` ({c['name']}, version {c['version']}, sha256 `{c['sha256']}`) multiplied by "
        f"**{rec['multiplier']:g}**: each neuron's column of its layer's MLP down projection is scaled, every other "
        "tensor is byte-identical to the source" + (f" (converted to {rec['dtype']})" if rec["dtype"] else "") + ".",
        "",
        "It loads and runs like the source model in any engine, with no steering code: it generates what "
        f"`cna-dist steer --multiplier {rec['multiplier']:g}` generates on the source.",
        "",
        f"Changed tensors: {len(rec['changed_tensors'])}; the full record is `cna-bake.json` "
        f"(schema {rec['schema']}, made by cna-dist {rec['package_version']} at {rec['created_at']}).",
        "",
    ]
    return "\n".join(lines)


def summary(rec: dict[str, Any], uri: str) -> str:
    """What `cna-dist inspect` prints for a baked checkpoint."""
    c, s = rec["circuit"], rec["source"]
    cols = sum(rec["changed_tensors"].values())
    return "\n".join(
        [
            f"baked checkpoint {uri}: circuit {c['name']} v{c['version']} ({c['uri']}) at M = {rec['multiplier']:g}",
            f"source: {s['uri']} (fingerprint {s['fingerprint'][:16]})"
            + (f", as {rec['dtype']}" if rec["dtype"] else ""),
            f"{c['neurons']} neurons = {cols} columns in {len(rec['changed_tensors'])} tensors; "
            f"{len(rec['files'])} files; made {rec['created_at']} by cna-dist {rec['package_version']}",
        ]
    )


def read_record(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The `cna-bake.json` of the checkpoint folder at `uri`, None when it has none (not a finished bake)."""
    from cna_dist.store import uri as urimod

    fs, path = urimod.filesystem(uri, storage_options)
    try:
        rec = json.loads(fs.cat_file(path.rstrip("/") + "/cna-bake.json"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("schema") == SCHEMA else None


def bake_of(rec: dict[str, Any] | None, name: str, version: int, source_fingerprint: str) -> bool:
    """Whether a bake record says its checkpoint is circuit `name` v`version` baked into the model it was mined on."""
    if rec is None:
        return False
    c, s = rec.get("circuit") or {}, rec.get("source") or {}
    return (c.get("name"), c.get("version"), s.get("fingerprint")) == (name, version, source_fingerprint)
