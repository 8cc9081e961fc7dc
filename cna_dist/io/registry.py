"""Circuit registry: REGISTRY/<name>/<model-slug>/v<N>.json, immutable once written, plus a `latest` pointer.

A version is claimed by an exclusive create (`cna_dist.io.exclusive`: a hard link locally, If-None-Match on S3,
a claim protocol on S3 servers without it), so two publishers racing for the same N cannot both win: the loser
takes N+1, and no file is ever overwritten. Claim objects (v<N>.claims/) and probe objects (.cna-probe/) never
match v<N>.json, so `versions()` never sees them. Every new version records its parent's version and
`diff.parent_diff` against it.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cna_dist.circuit import Circuit, load
from cna_dist.core.diff import parent_diff
from cna_dist.errors import RunFailure
from cna_dist.io import uri as urimod
from cna_dist.io.exclusive import BACKOFF_BASE_S, BACKOFF_CAP_S, ClaimContended, VersionTaken, create_exclusive, is_s3

VERSION_FILE = re.compile(r"^v(\d+)\.json$")
MAX_ATTEMPTS = 100


@dataclass(frozen=True)
class Published:
    uri: str
    version: int
    status: str  # "published" or "unchanged"

    @property
    def message(self) -> str:
        return f"unchanged, v{self.version}" if self.status == "unchanged" else f"published v{self.version}"


def model_slug(model_uri: str) -> str:
    base = model_uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


def folder(registry: str, name: str, slug: str) -> str:
    return urimod.join(registry, name, slug)


def versions(registry: str, name: str, slug: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """Versions present; claim folders (v<N>.claims) and anything else not named v<N>.json are ignored."""
    fs, path = urimod.filesystem(folder(registry, name, slug), storage_options)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if is_s3(fs) else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = (VERSION_FILE.match(Path(e.rstrip("/")).name) for e in entries)
    return sorted(int(m.group(1)) for m in found if m)


def latest(registry: str, name: str, slug: str, storage_options: dict[str, Any] | None = None) -> int | None:
    """The newest version: the highest v<N>.json present (the pointer file only mirrors it)."""
    found = versions(registry, name, slug, storage_options)
    return found[-1] if found else None


def version_uri(registry: str, name: str, slug: str, version: int) -> str:
    return urimod.join(folder(registry, name, slug), f"v{version}.json")


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
    """Publish as the next version, unless its inputs equal the latest version's (then nothing is written).

    A new version records its parent's number and a `diff` against it (neurons added and removed, Jaccard).
    """
    slug = model_slug(circuit.model.uri)
    contended = 0
    for _ in range(MAX_ATTEMPTS):
        current = latest(registry, circuit.name, slug, storage_options)
        parent = None
        if current is not None:
            parent = load(version_uri(registry, circuit.name, slug, current), storage_options)
            if circuit.inputs_sha256 and parent.inputs_sha256 == circuit.inputs_sha256:
                return Published(version_uri(registry, circuit.name, slug, current), current, "unchanged")
        version = (current or 0) + 1
        staged = circuit.model_copy(
            update={
                "version": version,
                "parent": current,
                "diff": parent_diff(parent, circuit) if parent is not None else None,
            }
        )
        target = version_uri(registry, circuit.name, slug, version)
        try:
            create_exclusive(target, staged.to_json().encode(), storage_options, root=registry)
        except ClaimContended:
            time.sleep(random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**contended)))
            contended += 1
            continue
        except VersionTaken:
            continue
        _write_pointer(registry, circuit.name, slug, storage_options)
        return Published(target, version, "published")
    raise RunFailure(
        f"could not claim a version under {folder(registry, circuit.name, slug)} after "
        f"{MAX_ATTEMPTS} attempts: too many concurrent publishers"
    )
