"""Create an object only if it does not exist yet, on local disk and on any S3, never overwriting.

- Local disk: the file is written under a temporary name and hard-linked into place (link fails if it exists).
- S3 that honours conditional writes: PUT with `If-None-Match: *` (412 PreconditionFailed when the key exists).
- S3-compatible servers that ignore that header (older MinIO/Ceph, some gateways silently overwrite) or reject it
  (501 NotImplemented / 400): a lock-free claim protocol on top of S3's strong read-after-write and list
  consistency, see `create_by_claim`. Which of the two S3 paths applies is decided once per process and root
  (endpoint + bucket/prefix) by `conditional_put_supported`, which probes on a throw-away key under
  ROOT/.cna-probe/ and caches the answer. Claim objects live under <key>.claims/.

Used by the registry (a version is claimed this way) and the store (a run's capture lease).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cna_dist.io import uri as urimod

PROBE_DIR = ".cna-probe"
# A claim older than this (by the server's LastModified, against the newer claim's) is a crashed publisher's and
# ignored. Safety assumes a claimant finishes its version PUT within CLAIM_TTL_S / 2 of starting its claim; it
# checks its own monotonic clock before the PUT and gives the claim up past CLAIM_TTL_S / 4.
CLAIM_TTL_S = 600.0
BACKOFF_BASE_S = 0.02
BACKOFF_CAP_S = 1.0

_probe_lock = threading.Lock()
_conditional: dict[tuple[str, str], bool] = {}


class VersionTaken(Exception):
    """Somebody else created this version first."""


class ClaimContended(VersionTaken):
    """Another live claim on this version: nobody owns it yet; back off and try the same version again."""


def is_s3(fs: Any) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _s3_error(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, S3 error code) of an s3fs error, read from the botocore error it was translated from."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode"), response.get("Error", {}).get("Code", "")
        seen = seen.__cause__ or seen.__context__
    return None, ""


def _precondition_failed(exc: BaseException) -> bool:
    status, code = _s3_error(exc)
    return isinstance(exc, FileExistsError) or status == 412 or code == "PreconditionFailed"


def _not_implemented(exc: BaseException) -> bool:
    status, code = _s3_error(exc)
    return status == 501 or code == "NotImplemented"


def _endpoint(fs: Any) -> str:
    try:
        return str(fs.s3.meta.endpoint_url)
    except Exception:  # not s3fs-like: the instance is the best identity there is
        return f"{type(fs).__name__}:{id(fs)}"


def conditional_put_supported(root: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the S3 server at `root` honours `If-None-Match: *`; probed once per endpoint and root, then cached.

    The probe writes a throw-away object under ROOT/.cna-probe/, then conditionally creates the same key again:
    412 means the header is honoured; success (the server silently overwrote) or a refusal (501 / 400) means it
    is not. Other errors (no permission, network) are raised and nothing is cached.
    """
    fs, path = urimod.filesystem(root, storage_options)
    key = (_endpoint(fs), path.rstrip("/"))
    with _probe_lock:
        if key in _conditional:
            return _conditional[key]
        probe = f"{key[1]}/{PROBE_DIR}/{uuid.uuid4().hex}"
        fs.pipe_file(probe, b"probe")
        try:
            fs.pipe_file(probe, b"probe-overwritten", mode="create")
            supported = False
        except Exception as exc:
            if _precondition_failed(exc):
                supported = True
            elif _not_implemented(exc) or _s3_error(exc)[0] == 400:  # a PUT of 17 bytes is refused for the header
                supported = False
            else:
                raise
        finally:
            try:
                fs.rm_file(probe)
            except (FileNotFoundError, OSError):
                pass
        _conditional[key] = supported
        return supported


def forget_probes() -> None:
    """Drop cached probe answers (tests; or after a server's configuration changed)."""
    with _probe_lock:
        _conditional.clear()


def _mark_unsupported(root: str, storage_options: dict[str, Any] | None) -> None:
    fs, path = urimod.filesystem(root, storage_options)
    with _probe_lock:
        _conditional[(_endpoint(fs), path.rstrip("/"))] = False


def _bucket_root(uri: str) -> str:
    protocol = urimod.protocol_of(uri)
    return f"{protocol}://{uri.split('://', 1)[1].split('/', 1)[0]}"


def create_exclusive(
    uri: str, data: bytes, storage_options: dict[str, Any] | None = None, *, root: str | None = None
) -> None:
    """Write `data` at `uri` only if nothing is there; raise VersionTaken otherwise. Never a partial file.

    `root` (the registry) scopes the S3 probe; it defaults to the bucket.
    """
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
    if is_s3(fs):
        root = root or _bucket_root(uri)
        if not conditional_put_supported(root, storage_options):
            create_by_claim(fs, path, data)
            return
    try:
        fs.pipe_file(path, data, mode="create")
    except Exception as exc:
        if _precondition_failed(exc):
            raise VersionTaken(uri) from None
        if is_s3(fs) and _not_implemented(exc):  # the server changed its mind since the probe
            _mark_unsupported(root or _bucket_root(uri), storage_options)
            create_by_claim(fs, path, data)
            return
        raise


def _claims_dir(path: str) -> str:
    return (path[: -len(".json")] if path.endswith(".json") else path) + ".claims"


def _last_modified(entry: dict[str, Any]) -> float | None:
    value = entry.get("LastModified") or entry.get("last_modified") or entry.get("mtime")
    return value.timestamp() if hasattr(value, "timestamp") else (float(value) if value is not None else None)


def create_by_claim(fs: Any, path: str, data: bytes, ttl: float | None = None) -> None:
    """Create `path` (no protocol) on a store without conditional writes; raise VersionTaken / ClaimContended.

    Protocol, for claimant P on version file F:
      1. t0 = P's monotonic clock; PUT a claim object F.claims/<uuid> (a fresh key: nothing is overwritten).
      2. LIST F.claims/. P's own claim must be there (else a winner has cleared the folder: F exists, P lost).
         Every other claim is live unless its LastModified is more than `ttl` before P's own claim's (server
         clock against server clock, never the local one). Any live rival: P deletes its claim, ClaimContended.
      3. HEAD F: present means P lost (VersionTaken).
      4. If more than ttl/4 has passed on P's monotonic clock since t0, P gives up the claim (ClaimContended).
      5. PUT F; then delete P's claim and the stale claims it ignored (if the PUT fails, P's claim is kept: the
         request may still land, and the claim holds rivals off until it is stale).

    Why two claimants P and Q can never both write F. Suppose both do, and P's claim PUT completed before Q's.
    Q's LIST starts after its own claim PUT completed, so by strong list consistency it shows P's claim unless
    that claim was deleted first. P deletes its own claim only after writing F (it won), and others delete it
    only after they wrote F; either way F existed before Q's LIST, so Q's HEAD (step 3) sees F and Q does not
    write. So Q's LIST shows P's claim, and Q goes on only by calling it stale: LastModified(Q) > LastModified(P)
    + ttl. LastModified(P) is no earlier than P's t0 and Q's step 3 comes after LastModified(Q), so Q's step 3
    comes more than ttl after P's t0 (less 1 s of LastModified rounding). P sent its PUT of F before t0 + ttl/4
    and, by the timing assumption, it completed before t0 + ttl/2, so Q's HEAD sees F and Q does not write.
    Contradiction either way: at most one claimant writes F, and F is never overwritten.

    Timing assumption: the PUT of a version (a small JSON) completes within ttl/4 of being sent (150 s by
    default, above one botocore attempt's connect + read timeouts); server clock skew is far below ttl/4.
    Liveness: rivals back off with random jitter (in `publish`); a crashed claimant blocks F for at most ttl.
    """
    ttl = CLAIM_TTL_S if ttl is None else ttl
    claims = _claims_dir(path)
    mine = f"{claims}/{uuid.uuid4().hex}"
    started = time.monotonic()
    fs.pipe_file(mine, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
    cleanup = [mine]
    try:
        listing = {
            e["name"].rstrip("/"): e for e in fs.ls(claims, detail=True, refresh=True) if e.get("type") == "file"
        }
        own = listing.pop(mine, None)
        if own is None:
            cleanup = []
            raise VersionTaken(path)
        own_t = _last_modified(own)
        stale = [
            name
            for name, e in listing.items()
            if own_t is not None and (t := _last_modified(e)) is not None and own_t - t > ttl
        ]
        if len(listing) > len(stale):
            raise ClaimContended(path)
        try:
            fs.info(path, refresh=True)
            raise VersionTaken(path)
        except FileNotFoundError:
            pass
        if time.monotonic() - started > ttl / 4:
            raise ClaimContended(f"{path}: claim held too long to write safely")
        cleanup = []  # a PUT that fails may still land later: keep the claim, blocking F until it goes stale
        fs.pipe_file(path, data)
        cleanup = [mine, *stale]
    finally:
        for name in cleanup:
            try:
                fs.rm_file(name)
            except (FileNotFoundError, OSError):
                pass
