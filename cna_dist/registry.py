"""Circuit registry: REGISTRY/<name>/<model-slug>/v<N>.json, immutable once written, plus a `latest` pointer.

A version is claimed by an exclusive create (a hard link on local disk, If-None-Match on object stores),
so two publishers racing for the same N cannot both win: the loser takes N+1.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cna_dist import uri as urimod
from cna_dist.circuit import Circuit, load
from cna_dist.errors import RunFailure

VERSION_FILE = re.compile(r"^v(\d+)\.json$")
MAX_ATTEMPTS = 50


class VersionTaken(Exception):
    """Somebody else created this version first."""


@dataclass(frozen=True)
class Published:
    uri: str
    version: int
    status: str  # "published" or "unchanged"


def model_slug(model_uri: str) -> str:
    base = model_uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


def folder(registry: str, name: str, slug: str) -> str:
    return urimod.join(registry, name, slug)


def versions(registry: str, name: str, slug: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    fs, path = urimod.filesystem(folder(registry, name, slug), storage_options)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if _is_s3(fs) else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = (VERSION_FILE.match(Path(e).name) for e in entries)
    return sorted(int(m.group(1)) for m in found if m)


def _is_s3(fs: Any) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def latest(registry: str, name: str, slug: str, storage_options: dict[str, Any] | None = None) -> int | None:
    """The newest version: the highest v<N>.json present (the pointer file only mirrors it)."""
    found = versions(registry, name, slug, storage_options)
    return found[-1] if found else None


def version_uri(registry: str, name: str, slug: str, version: int) -> str:
    return urimod.join(folder(registry, name, slug), f"v{version}.json")


def create_exclusive(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write `data` at `uri` only if nothing is there; raise VersionTaken otherwise. Never a partial file."""
    if urimod.is_local(uri):
        path = Path(urimod.filesystem(uri)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise VersionTaken(uri) from None
        finally:
            tmp.unlink()
        return
    fs, path = urimod.filesystem(uri, storage_options)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        raise VersionTaken(uri) from None
    except OSError as exc:
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            raise VersionTaken(uri) from None
        raise


def _write_pointer(registry: str, name: str, slug: str, storage_options: dict[str, Any] | None) -> None:
    """Point `latest` at the highest version; re-check after writing so a slower publisher cannot move it back."""
    pointer = urimod.join(folder(registry, name, slug), "latest")
    fs, path = urimod.filesystem(pointer, storage_options)
    for _ in range(5):
        newest = latest(registry, name, slug, storage_options)
        fs.pipe_file(path, json.dumps({"version": newest, "file": f"v{newest}.json"}).encode())
        if latest(registry, name, slug, storage_options) == newest:
            return


def publish(circuit: Circuit, registry: str, storage_options: dict[str, Any] | None = None) -> Published:
    """Publish as the next version, unless its inputs equal the latest version's (then nothing is written)."""
    slug = model_slug(circuit.model.uri)
    for _ in range(MAX_ATTEMPTS):
        current = latest(registry, circuit.name, slug, storage_options)
        if current is not None:
            parent = load(version_uri(registry, circuit.name, slug, current), storage_options)
            if circuit.inputs_sha256 and parent.inputs_sha256 == circuit.inputs_sha256:
                return Published(version_uri(registry, circuit.name, slug, current), current, "unchanged")
        version = (current or 0) + 1
        staged = circuit.model_copy(update={"version": version, "parent": current})
        target = version_uri(registry, circuit.name, slug, version)
        try:
            create_exclusive(target, staged.to_json().encode(), storage_options)
        except VersionTaken:
            continue
        _write_pointer(registry, circuit.name, slug, storage_options)
        return Published(target, version, "published")
    raise RunFailure(f"could not claim a version under {folder(registry, circuit.name, slug)} after "
                     f"{MAX_ATTEMPTS} attempts: too many concurrent publishers")
