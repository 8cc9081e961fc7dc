"""Circuit registry: REGISTRY/<name>/<model-slug>/v<N>.json, immutable once written, plus a `latest` pointer.

A version is claimed by `create_if_absent` on the registry's objects (`cna_dist.store.objects`: a hard link locally,
If-None-Match on S3, a claim protocol on S3 servers without it), so two publishers racing for the same N cannot
both win: the loser takes N+1, and no file is ever overwritten. Claim objects (v<N>.claims/) and probe objects
(.cna-probe/) never match v<N>.json, so `versions()` never sees them. Every new version records its parent's
version and `diff.parent_diff` against it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from cna_dist.circuit.diff import parent_diff
from cna_dist.circuit.file import Circuit, load
from cna_dist.errors import BadInput, RunFailure
from cna_dist.store import uri as urimod
from cna_dist.store.objects import AlreadyExists, ClaimContended, Objects, open_objects

VERSION_FILE = re.compile(r"^v(\d+)\.json$")
MAX_ATTEMPTS = 100
BACKOFF_BASE_S = 0.02  # a contended claim backs off with jitter, doubling up to the cap
BACKOFF_CAP_S = 1.0


@dataclass(frozen=True)
class Published:
    uri: str
    version: int
    status: str  # "published" or "unchanged"

    @property
    def message(self) -> str:
        return f"unchanged, v{self.version}" if self.status == "unchanged" else f"published v{self.version}"


def model_slug(model_uri: str) -> str:
    """The checkpoint folder's name as one path segment; never '.' or '..' (leading dots go), which would climb.

    A Hub model's revision is not part of it (`hf://ORG/NAME@<sha>` is NAME): every commit's circuits are versions
    of one name, and each circuit records its commit in `model.revision`.
    """
    if model_uri.startswith("hf://"):
        model_uri = model_uri.split("@", 1)[0]
    base = model_uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip(".").strip("-") or "model"


def folder(registry: str, name: str, slug: str) -> str:
    return urimod.join(registry, name, slug)


def versions(registry: str, name: str, slug: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """Versions present; claim folders (v<N>.claims) and anything else not named v<N>.json are ignored."""
    return _versions(open_objects(registry, storage_options), name, slug)


def latest(registry: str, name: str, slug: str, storage_options: dict[str, Any] | None = None) -> int | None:
    """The newest version: the highest v<N>.json present (the pointer file only mirrors it)."""
    found = versions(registry, name, slug, storage_options)
    return found[-1] if found else None


def version_uri(registry: str, name: str, slug: str, version: int) -> str:
    return urimod.join(folder(registry, name, slug), f"v{version}.json")


def _versions(objects: Objects, name: str, slug: str) -> list[int]:
    found = (VERSION_FILE.match(entry) for entry in objects.list(f"{name}/{slug}"))
    return sorted(int(m.group(1)) for m in found if m)


def _latest(objects: Objects, name: str, slug: str) -> int | None:
    found = _versions(objects, name, slug)
    return found[-1] if found else None


def _write_pointer(objects: Objects, name: str, slug: str) -> None:
    """Point `latest` at the highest version; re-check after writing so a slower publisher cannot move it back."""
    for _ in range(5):
        newest = _latest(objects, name, slug)
        objects.put_json(f"{name}/{slug}/latest", {"version": newest, "file": f"v{newest}.json"})
        if _latest(objects, name, slug) == newest:
            return


def _staged(circuit: Circuit, version: int, parent_version: int | None, parent: Circuit | None) -> bytes:
    """The circuit as version `version`: its parent's number and its diff against it."""
    staged = circuit.model_copy(
        update={
            "version": version,
            "parent": parent_version,
            "diff": parent_diff(parent, circuit) if parent is not None else None,
        }
    )
    return staged.to_json().encode()


def _parent(uri: str, storage_options: dict[str, Any] | None) -> Circuit:
    """The latest version, read back: damage at rest in the registry is a run-time failure naming the file."""
    try:
        return load(uri, storage_options)
    except BadInput as exc:
        raise RunFailure(
            f"registry version {uri} is damaged ({exc}); versions are immutable: restore it, or move it aside "
            "to publish this circuit in its place"
        ) from None


def publish(circuit: Circuit, registry: str, storage_options: dict[str, Any] | None = None) -> Published:
    """Publish as the next version, unless its inputs equal the latest version's (then nothing is written).

    A new version records its parent's number and a `diff` against it (neurons added and removed, Jaccard).
    """
    name, slug = circuit.name, model_slug(circuit.model.uri)
    objects = open_objects(registry, storage_options)
    contended = 0
    for _ in range(MAX_ATTEMPTS):
        current = _latest(objects, name, slug)
        parent = _parent(version_uri(registry, name, slug, current), storage_options) if current is not None else None
        if parent is not None and circuit.inputs_sha256 and parent.inputs_sha256 == circuit.inputs_sha256:
            return Published(version_uri(registry, name, slug, current), current, "unchanged")
        version = (current or 0) + 1
        try:
            objects.create_if_absent(f"{name}/{slug}/v{version}.json", _staged(circuit, version, current, parent))
        except ClaimContended:  # nobody owns this version yet: back off, then try the same one again
            objects.clock.sleep(random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**contended)))
            contended += 1
            continue
        except AlreadyExists:  # another publisher took it: the next attempt takes the next one
            continue
        _write_pointer(objects, name, slug)
        return Published(version_uri(registry, name, slug, version), version, "published")
    raise RunFailure(
        f"could not claim a version under {folder(registry, name, slug)} after "
        f"{MAX_ATTEMPTS} attempts: too many concurrent publishers"
    )
