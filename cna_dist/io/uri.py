"""fsspec URIs: resolve relative paths against the manifest's folder and open any protocol the same way."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol

from cna_dist.errors import BadInput


def protocol_of(uri: str) -> str:
    protocol, _ = split_protocol(uri)
    return protocol or "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def resolve(uri: str, base: Path | None) -> str:
    """Make a relative local path absolute against `base`; leave URLs with a protocol untouched."""
    protocol, path = split_protocol(uri)
    if protocol and protocol not in ("file", "local"):
        return uri
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return os.path.normpath(os.path.abspath(p))  # not resolve(): a symlinked folder keeps the name it was given


def check_protocol(uri: str, *, source: str | None = None, field: str | None = None) -> None:
    protocol = protocol_of(uri)
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise BadInput(
            f"unknown storage protocol {protocol!r} in {uri!r} ({exc})", source=source, field=field
        ) from None


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a URI; local writes create their parent folders as object stores do."""
    options = dict(storage_options or {})
    if is_local(uri):
        options.setdefault("auto_mkdir", True)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def join(uri: str, *parts: str) -> str:
    protocol, path = split_protocol(uri)
    joined = posixpath.join(path.rstrip("/"), *parts) if protocol else str(Path(path).joinpath(*parts))
    return f"{protocol}://{joined}" if protocol else joined
