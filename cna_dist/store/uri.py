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


# How S3 requests ride out a flaky store (503 SlowDown, 500, resets, stalls), wherever the package opens S3: here,
# and in zarr's own filesystem (the store hands zarr `effective_options`). botocore retries every request on
# 500/502/503/504, throttling codes and connection errors, up to `total_max_attempts` in all, waiting
# rand * min(2**i, 20) s before attempt i + 1: 5 attempts wait at most 1 + 2 + 4 + 8 = 15 s. It cannot retry a body
# cut off after the headers arrived (it has handed the stream over): s3fs's own loop around each call and each GET
# does (5 tries; a class attribute, not an option), and it also retries errors that say SlowDown, so a persistent
# SlowDown fails after 25 attempts (41 s measured), a persistent 500 after 5 (8 s). `read_timeout` cuts a stalled
# read so that it is retried, `connect_timeout` an endpoint that does not answer. A user's `storage_options` win key
# by key inside `config_kwargs` (a `retries` given there replaces this one whole); AWS_MAX_ATTEMPTS /
# AWS_RETRY_MODE in the environment replace the retry default.
S3_RETRIES = {"mode": "standard", "total_max_attempts": 5}
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 20}
RETRY_ENVIRONMENT = ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
# GCS (gcsfs): gcsfs retries every request itself, 6 attempts in all (`GCSFileSystem.retries`, a class attribute, not
# an option), on 408/429/5xx and connection errors, waiting min(rand + 2**(n-1), 32) s between them; nothing here
# changes that. A create (`ifGenerationMatch=0`) whose answer was lost meets its own object on the retry (412):
# objects.ConditionalPutObjects reads it back and counts it done when it holds its bytes, as on S3.
# Azure (adlfs on azure-storage-blob): the SDK's own retry policy (exponential, 3 retries by default); the timeouts
# are set here as for S3: `connection_timeout` cuts an endpoint that does not answer, `read_timeout` a stalled read
# (then retried). The user's `storage_options` win key by key.
AZURE_TIMEOUTS = {"connection_timeout": 5, "read_timeout": 20}


def effective_options(uri: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options a filesystem for `uri` is opened with: the user's, over the package's defaults for the protocol."""
    merged = dict(options or {})
    if is_local(uri):
        merged.setdefault("auto_mkdir", True)  # local writes create their parent folders as object stores do
    elif protocol_of(uri) in ("s3", "s3a"):
        config = {**S3_CONFIG, **dict(merged.get("config_kwargs") or {})}
        if not any(name in os.environ for name in RETRY_ENVIRONMENT):
            config.setdefault("retries", dict(S3_RETRIES))
        merged["config_kwargs"] = config
    elif protocol_of(uri) in ("az", "abfs", "abfss"):
        for key, value in AZURE_TIMEOUTS.items():
            merged.setdefault(key, value)
    elif protocol_of(uri) == "hf":
        from cna_dist.store import hub

        if hub.endpoint():  # huggingface_hub read HF_ENDPOINT once, at import; the environment now wins
            merged.setdefault("endpoint", hub.endpoint())
    return merged


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a URI, opened with `effective_options`.

    A pinned `hf://ORG/NAME@<sha>` under HF_HUB_OFFLINE=1 is the local HF cache's snapshot folder of that commit.
    """
    if protocol_of(uri) == "hf":
        from cna_dist.store import hub

        folder = hub.offline_folder(uri)
        if folder is not None:
            return fsspec.core.url_to_fs(folder, auto_mkdir=True)
    return fsspec.core.url_to_fs(uri, **effective_options(uri, storage_options))


def join(uri: str, *parts: str) -> str:
    protocol, path = split_protocol(uri)
    joined = posixpath.join(path.rstrip("/"), *parts) if protocol else str(Path(path).joinpath(*parts))
    return f"{protocol}://{joined}" if protocol else joined
