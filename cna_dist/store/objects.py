"""Objects under one root URI: get, put, list, delete and create-if-absent, the same on local disk and on any S3.

In the style of zarr-python's `Store`: one `Objects` per root URI and storage options; keys are `/`-separated
strings relative to the root. Everything that needs an object written exactly once (registry versions, the run
lease) goes through `create_if_absent`, which never overwrites and never leaves a partial object:

- `LocalObjects`: the data is written under a temporary name and hard-linked into place (a link fails if the name
  exists); `put` writes a temporary file and renames it over the old one, so a reader never sees half a file.
- `ConditionalPutObjects`: S3 that honours conditional writes (PUT with `If-None-Match: *`, 412 when the key
  exists), or any other fsspec filesystem through `pipe_file(..., mode="create")`.
- `ClaimObjects`: S3-compatible servers that ignore that header (older MinIO/Ceph, some gateways silently
  overwrite) or reject it (501 NotImplemented / 400): a lock-free claim protocol on top of S3's strong
  read-after-write and list consistency, see `ClaimObjects.create_if_absent`. Claim objects live under
  <key>.claims/ (a `.json` suffix dropped first).

Which S3 path applies is decided once per process and root (endpoint + bucket/prefix) by
`conditional_put_supported`, which probes on a throw-away key under ROOT/.cna-probe/ and caches the answer.
`open_objects` picks the implementation from that cache; a root not probed yet is probed at its first
`create_if_absent`, not when it is opened, so readers with read-only credentials never write a probe.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cna_dist.clock import SYSTEM_CLOCK, Clock
from cna_dist.store import uri as urimod

__all__ = [
    "SYSTEM_CLOCK",
    "AlreadyExists",
    "ClaimContended",
    "ClaimObjects",
    "Clock",
    "ConditionalPutObjects",
    "FsspecObjects",
    "LocalObjects",
    "Objects",
    "conditional_put_supported",
    "forget_probes",
    "open_objects",
    "split_uri",
]

PROBE_DIR = ".cna-probe"
# A claim older than this (by the server's LastModified, against the newer claim's) is a crashed publisher's and
# ignored. Safety assumes a claimant finishes its PUT within CLAIM_TTL_S / 2 of starting its claim; it checks its
# own monotonic clock before the PUT and gives the claim up past CLAIM_TTL_S / 4.
CLAIM_TTL_S = 600.0

_probe_lock = threading.Lock()
_conditional: dict[tuple[str, str], bool] = {}


class AlreadyExists(Exception):
    """Something is at this key already (or, for ClaimContended, somebody is creating it): nothing was written."""

    def __init__(self, key: str, detail: str = "") -> None:
        super().__init__(f"{key}: {detail}" if detail else key)
        self.key = key


class ClaimContended(AlreadyExists):
    """Another live claim on this key: nobody owns it yet; back off and try the same key again."""


def split_uri(uri: str) -> tuple[str, str]:
    """(folder URI, object name) of an object's URI: the root to open and the key inside it."""
    folder, sep, name = uri.rpartition("/")
    if not name:
        raise ValueError(f"{uri!r} names a folder, not an object")
    return (folder or "/") if sep else ".", name


class Objects(ABC):
    """Objects under one root; keys are `/`-separated and relative to it."""

    def __init__(self, root: str, clock: Clock | None = None) -> None:
        self.root = root.rstrip("/") or root
        self.clock = clock or SYSTEM_CLOCK

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) the object whole."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names (not keys) of the immediate children of `prefix`, objects and folders alike, sorted; [] if none.

        Always asks the server: a version another process wrote a moment ago is listed.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object (or a folder) is there, asking the server, never a cache."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; one that is already gone is fine."""

    @abstractmethod
    def modified(self, key: str) -> float | None:
        """When the object was last written, in the server's clock (epoch seconds); None when absent or unknown."""

    @abstractmethod
    def create_if_absent(self, key: str, data: bytes) -> None:
        """Write the object only if nothing is there; AlreadyExists otherwise. Never overwrites, never partial."""

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def put_json(self, key: str, obj: Any) -> None:
        self.put(key, encode_json(obj))

    def uri(self, key: str) -> str:
        """The object's full URI, as fsspec and the rest of the package open it."""
        key = _clean(key)
        return urimod.join(self.root, *key.split("/")) if key else self.root

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"


def encode_json(obj: Any) -> bytes:
    """The one JSON form objects are written in: indent 1, trailing newline (small, and diffs read well)."""
    return (json.dumps(obj, indent=1) + "\n").encode()


def _clean(key: str) -> str:
    key = key.strip("/")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"bad object key {key!r}: empty, '.' or '..' parts")
    return key


class LocalObjects(Objects):
    """A folder on this machine; writes go through a temporary file, so no reader ever sees a partial object."""

    def __init__(self, root: str, clock: Clock | None = None) -> None:
        super().__init__(root, clock)
        self.base = Path(urimod.filesystem(root)[1])

    def _file(self, key: str) -> Path:
        key = _clean(key)
        return self.base.joinpath(*key.split("/")) if key else self.base

    def _place(self, key: str, data: bytes, move: Any) -> None:
        """Write `data` under a temporary name beside `key`, then `move(tmp, path)` it there whole; no temp is left."""
        path = self._file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        try:
            move(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # gone after a replace; the second name of a link

    def get(self, key: str) -> bytes:
        return self._file(key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        self._place(key, data, os.replace)

    def list(self, prefix: str = "") -> list[str]:
        try:
            names = [p.name for p in self._file(prefix).iterdir()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if not (n.startswith(".") and n.endswith(".tmp")))  # a put in flight

    def exists(self, key: str) -> bool:
        return self._file(key).exists()

    def delete(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)

    def modified(self, key: str) -> float | None:
        try:
            return self._file(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def create_if_absent(self, key: str, data: bytes) -> None:
        try:
            self._place(key, data, os.link)  # link fails if the key exists: never overwritten
        except FileExistsError:
            raise AlreadyExists(key) from None


class FsspecObjects(Objects):
    """Everything but `create_if_absent` on an fsspec filesystem, reading past fsspec's caches every time."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None, clock: Clock | None = None) -> None:
        super().__init__(root, clock)
        self.storage_options = dict(storage_options or {})
        self.fs, path = urimod.filesystem(root, self.storage_options)
        self.path = path.rstrip("/")

    def _path(self, key: str) -> str:
        key = _clean(key)
        return f"{self.path}/{key}" if key else self.path

    def get(self, key: str) -> bytes:
        with _naming(self.uri(key)):
            return self.fs.cat_file(self._path(key))

    def put(self, key: str, data: bytes) -> None:
        with _naming(self.uri(key)):
            self.fs.pipe_file(self._path(key), data)

    def list(self, prefix: str = "") -> list[str]:
        try:
            with _naming(self.uri(prefix)):
                self.fs.invalidate_cache(self._path(prefix))  # adlfs ignores refresh=True: it takes invalidate_cache
                entries = self.fs.ls(self._path(prefix), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def _info(self, key: str) -> dict[str, Any] | None:
        try:
            with _naming(self.uri(key)):
                return self.fs.info(self._path(key), refresh=True)
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._info(key) is not None

    def delete(self, key: str) -> None:
        _remove(self.fs, [self._path(key)])

    def modified(self, key: str) -> float | None:
        info = self._info(key)
        return None if info is None else _last_modified(info)


class ConditionalPutObjects(FsspecObjects):
    """An fsspec filesystem whose create refuses an existing key: S3 with If-None-Match, or `mode="create"`.

    On S3 the server is first asked (once per root, cached) whether it honours the header; a server that does not,
    or that starts refusing it later, has its creates done by `ClaimObjects` on the same root.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None, clock: Clock | None = None) -> None:
        super().__init__(root, storage_options, clock)
        self._s3 = _is_s3(self.fs)

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether the object at `key` is exactly `data`: what a create whose answer was lost finds on its retry.

        Bytes written by a rival are never exactly ours (a lease names its owner, a registry version its creation
        time); and where they were, the object would hold just what this create meant to write.
        """
        try:
            return self.get(key) == data
        except FileNotFoundError:
            return False

    def _claims(self) -> ClaimObjects:
        return ClaimObjects(self.root, self.storage_options, self.clock)

    def create_if_absent(self, key: str, data: bytes) -> None:
        with _naming(self.uri(key)):
            self._create(key, data)

    def _create(self, key: str, data: bytes) -> None:
        if self._s3 and not conditional_put_supported(self.root, self.storage_options):
            self._claims().create_if_absent(key, data)
            return
        try:
            self.fs.pipe_file(self._path(key), data, mode="create")
        except Exception as exc:
            if _precondition_failed(exc):
                if self._holds(key, data):
                    return  # our own create landed and its answer was lost: the retry met it (412)
                raise AlreadyExists(key) from None
            if not (self._s3 and _not_implemented(exc)):
                raise
            _remember(self.fs, self.path, False)  # the server changed its mind since the probe
            self._claims().create_if_absent(key, data)


class ClaimObjects(FsspecObjects):
    """Create-if-absent by claims, for S3 servers without conditional writes; see `create_if_absent`."""

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None = None,
        clock: Clock | None = None,
        *,
        ttl_s: float = CLAIM_TTL_S,
    ) -> None:
        super().__init__(root, storage_options, clock)
        self.ttl_s = ttl_s

    def create_if_absent(self, key: str, data: bytes) -> None:
        """Create `key` on a store without conditional writes; raise AlreadyExists / ClaimContended.

        Protocol, for claimant P on version file F:
          1. t0 = P's monotonic clock; PUT a claim object F.claims/<uuid> (a fresh key: nothing is overwritten).
          2. LIST F.claims/. P's own claim must be there (else a winner has cleared the folder: F exists, P lost).
             Every other claim is live unless its LastModified is more than `ttl` before P's own claim's (server
             clock against server clock, never the local one). Any live rival: P deletes its claim, ClaimContended.
          3. HEAD F: present means P lost (AlreadyExists).
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
        (`ttl` is `self.ttl_s`; "P's monotonic clock" is `self.clock.monotonic()`.)
        """
        target = self._path(key)
        claims = _claims_dir(target)
        mine = f"{claims}/{uuid.uuid4().hex}"
        started = self.clock.monotonic()
        self.fs.pipe_file(mine, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        cleanup = [mine]
        try:
            stale = self._stale_rivals(claims, mine, key)
            if stale is None:  # a winner cleared the folder, our claim with it
                cleanup = []
                raise AlreadyExists(key)
            if self._info(key) is not None:
                raise AlreadyExists(key)
            if self.clock.monotonic() - started > self.ttl_s / 4:
                raise ClaimContended(key, "claim held too long to write safely")
            cleanup = []  # a PUT that fails may still land later: keep the claim, blocking F until it goes stale
            self.fs.pipe_file(target, data)
            cleanup = [mine, *stale]
        finally:
            _remove(self.fs, cleanup)

    def _stale_rivals(self, claims: str, mine: str, key: str) -> list[str] | None:
        """Step 2: the rivals' claims that are stale; None when our own claim is gone; ClaimContended if any is live."""
        try:
            entries = self.fs.ls(claims, detail=True, refresh=True)
        except FileNotFoundError:  # S3 has no empty folders: a winner cleared every claim, ours too
            entries = []
        listing = {e["name"].rstrip("/"): e for e in entries if e.get("type") == "file"}
        own = listing.pop(mine, None)
        if own is None:
            return None
        own_t = _last_modified(own)
        stale = [
            name
            for name, e in listing.items()
            if own_t is not None and (t := _last_modified(e)) is not None and own_t - t > self.ttl_s
        ]
        if len(listing) > len(stale):
            raise ClaimContended(key)
        return stale


def open_objects(uri: str, storage_options: dict[str, Any] | None = None, *, clock: Clock | None = None) -> Objects:
    """The objects under `uri`: local disk, S3 with or without conditional writes, or another fsspec filesystem."""
    if urimod.is_local(uri):
        return LocalObjects(uri, clock)
    fs, path = urimod.filesystem(uri, storage_options)
    if _is_s3(fs) and _conditional.get(_probe_key(fs, path)) is False:
        return ClaimObjects(uri, storage_options, clock)
    return ConditionalPutObjects(uri, storage_options, clock)


# -- the S3 probe -------------------------------------------------------------------------------------------------


def _is_s3(fs: Any) -> bool:
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


def _probe_key(fs: Any, path: str) -> tuple[str, str]:
    try:
        endpoint = str(fs.s3.meta.endpoint_url)
    except Exception:  # not s3fs-like: the instance is the best identity there is
        endpoint = f"{type(fs).__name__}:{id(fs)}"
    return endpoint, path.rstrip("/")


def _remember(fs: Any, path: str, supported: bool) -> None:
    with _probe_lock:
        _conditional[_probe_key(fs, path)] = supported


def conditional_put_supported(root: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the S3 server at `root` honours `If-None-Match: *`; probed once per endpoint and root, then cached.

    The probe writes a throw-away object under ROOT/.cna-probe/, then conditionally creates the same key again:
    412 means the header is honoured; success (the server silently overwrote) or a refusal (501 / 400) means it
    is not. Other errors (no permission, network) are raised and nothing is cached.
    """
    fs, path = urimod.filesystem(root, storage_options)
    key = _probe_key(fs, path)
    with _probe_lock:
        if key not in _conditional:
            _conditional[key] = _probe(fs, f"{key[1]}/{PROBE_DIR}/{uuid.uuid4().hex}")
        return _conditional[key]


def _probe(fs: Any, probe: str) -> bool:
    fs.pipe_file(probe, b"probe")
    try:
        fs.pipe_file(probe, b"probe-overwritten", mode="create")
        return False
    except Exception as exc:
        if _precondition_failed(exc):
            return True
        if _not_implemented(exc) or _s3_error(exc)[0] == 400:  # a PUT of 17 bytes is refused for the header
            return False
        raise
    finally:
        _remove(fs, [probe])


def forget_probes() -> None:
    """Drop cached probe answers (tests; or after a server's configuration changed)."""
    with _probe_lock:
        _conditional.clear()


# -- helpers ------------------------------------------------------------------------------------------------------


def _claims_dir(path: str) -> str:
    return (path[: -len(".json")] if path.endswith(".json") else path) + ".claims"


def _last_modified(entry: dict[str, Any]) -> float | None:
    value = entry.get("LastModified") or entry.get("last_modified") or entry.get("mtime") or entry.get("created")
    return value.timestamp() if hasattr(value, "timestamp") else (float(value) if value is not None else None)


@contextmanager
def _naming(uri: str) -> Iterator[None]:
    """A storage error that names no object (s3fs's 5xx and throttling errors do not) gets `uri` as its filename."""
    try:
        yield
    except OSError as exc:
        if type(exc) is not OSError or exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), uri) from exc


def _remove(fs: Any, paths: list[str]) -> None:
    for path in paths:
        try:
            fs.rm_file(path)
        except (FileNotFoundError, OSError):
            pass
