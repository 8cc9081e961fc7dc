"""Parallel, ranged, resumable copies of remote files into a local folder, for any fsspec filesystem.

A 145 GB checkpoint copied one stream per file takes hours and restarts from zero after any interruption. Here every
file is cut into byte ranges fetched by a thread pool (`fs.cat_file(path, start, end)`: one ranged GET on object
stores; async filesystems such as s3fs run all of them on their one event loop, so the threads only wait) and written
with `os.pwrite` into a file of the final size. A record in the folder (`.progress.json`, replaced atomically) keeps
each file's size, identity (ETag, else mtime) and completed ranges, so a later call fetches only what is missing;
a file whose size or identity changed is discarded whole, never stitched from old and new bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cna_dist.errors import BadInput, RunFailure

RECORD = ".progress.json"
CONCURRENCY_ENV = "CNA_DIST_DOWNLOAD_CONCURRENCY"
PART_SIZE_ENV = "CNA_DIST_DOWNLOAD_PART_SIZE"
# 16 ranges of 32 MiB in flight: 512 MiB of buffers, enough streams to fill a node's link to S3 (one stream gives
# tens of MB/s) and ~4,600 GETs for 145 GB; a killed copy loses at most the ranges in flight.
DEFAULT_CONCURRENCY = 16
DEFAULT_PART_SIZE = 32 << 20
FLUSH_SECONDS = 1.0  # how often the record is rewritten (after an fdatasync of the files it vouches for)
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(frozen=True)
class Remote:
    """One file to copy: where it is, the name it gets locally, and what it was when listed."""

    path: str
    name: str
    size: int
    identity: str  # ETag, else modification time; "" when the store gives neither (such a file is never resumed)


def content_identity(entry: dict[str, Any]) -> str:
    """What names a listed file's content without reading it; "" when the listing says nothing about it.

    S3, GCS and Azure give an ETag; the Hub (HfFileSystem) gives an LFS file's sha256 (the hash of its bytes,
    what a local file is hashed to) and a small file's git blob id.
    """
    etag = entry.get("ETag") or entry.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    lfs = entry.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):
        return f"sha256:{lfs['sha256']}"
    if entry.get("blob_id"):
        return f"git:{entry['blob_id']}"
    return ""


def remote(entry: dict[str, Any]) -> Remote:
    """A Remote from one `fs.ls(..., detail=True)` / `fs.info` entry."""
    identity = content_identity(entry)
    if not identity:
        stamp = entry.get("mtime") or entry.get("LastModified") or entry.get("created")
        identity = f"mtime:{stamp}" if stamp else ""
    return Remote(str(entry["name"]), Path(str(entry["name"])).name, int(entry["size"]), identity)


@dataclass(frozen=True)
class Settings:
    concurrency: int = DEFAULT_CONCURRENCY
    part_size: int = DEFAULT_PART_SIZE

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from CNA_DIST_DOWNLOAD_CONCURRENCY (ranges in flight) and CNA_DIST_DOWNLOAD_PART_SIZE
        (bytes, or with a k/m/g suffix in KiB/MiB/GiB)."""
        concurrency = _env_size(CONCURRENCY_ENV, DEFAULT_CONCURRENCY, units=False)
        return cls(concurrency, _env_size(PART_SIZE_ENV, DEFAULT_PART_SIZE, units=True))


def _env_size(name: str, default: int, *, units: bool) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    match = re.fullmatch(r"([0-9]+)\s*([kmg]?)(i?b)?" if units else r"([0-9]+)()()", text.lower())
    value = int(match.group(1)) * UNITS[match.group(2)] if match else 0
    if value < 1:
        what = "a positive size in bytes (or with a k/m/g suffix)" if units else "a positive integer"
        raise BadInput(f"{name} = {text!r} is not {what}", source="environment", field=name)
    return value


@dataclass
class Stats:
    files: int
    total: int  # bytes of all files
    fetched: int = 0  # bytes fetched by this call
    resumed: int = 0  # bytes kept from an earlier, interrupted call
    seconds: float = 0.0

    def describe(self) -> str:
        rate = self.fetched / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return (
            f"{self.files} files, {_human(self.total)} in {self.seconds:.1f} s ({rate:.0f} MB/s), "
            f"resumed {_human(self.resumed)}"
        )


def _human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class Progress:
    """The folder's record of completed byte ranges per file, rewritten atomically (temp file, fsync, rename)."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        self.files: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()  # guards files and touched
        self.writing = threading.Lock()  # one record writer at a time
        self.touched: set[str] = set()
        self.flushed_at = time.monotonic()
        try:
            data = json.loads((folder / RECORD).read_text())
        except (OSError, ValueError):
            data = {}
        self.valid = isinstance(data, dict) and data.get("key") == key and isinstance(data.get("files"), dict)
        if self.valid:
            self.files = data["files"]

    def adopt(self, item: Remote) -> int:
        """Keep the ranges recorded for `item` if it is the same file of the same size; return the bytes kept."""
        entry = self.files.get(item.name)
        on_disk = self.folder / item.name
        done = _recorded(entry, item)
        if done is None or not (on_disk.is_file() and on_disk.stat().st_size == item.size):
            done = []
            on_disk.unlink(missing_ok=True)  # stale or unvouched bytes: never stitched to new ones
        self.files[item.name] = {"size": item.size, "identity": item.identity, "done": done}
        return sum(end - start for start, end in done)

    def missing(self, item: Remote, part_size: int) -> list[tuple[int, int]]:
        """The ranges of `item` not yet done, cut into parts of at most `part_size` bytes."""
        parts, cursor = [], 0
        for start, end in [*self.files[item.name]["done"], (item.size, item.size)]:
            parts += [(s, min(s + part_size, start)) for s in range(cursor, start, part_size)]
            cursor = end
        return parts

    def add(self, name: str, start: int, end: int, fds: dict[str, int]) -> None:
        """Note a range as written; rewrite the record when it is due, unless another thread is at it (the
        fdatasync can take a while and the other parts keep landing meanwhile)."""
        with self.lock:
            self.files[name]["done"] = _merged([*self.files[name]["done"], [start, end]])
            self.touched.add(name)
            due = time.monotonic() - self.flushed_at >= FLUSH_SECONDS
        if due and self.writing.acquire(blocking=False):
            try:
                self._flush(fds)
            finally:
                self.writing.release()

    def discard(self, name: str) -> None:
        with self.lock:
            self.files.pop(name, None)
            self.touched.add(name)

    def flush(self, fds: dict[str, int]) -> None:
        with self.writing:
            self._flush(fds)

    def _flush(self, fds: dict[str, int]) -> None:
        """The ranges done now, made durable (fdatasync of their files) before the record says so."""
        with self.lock:
            record = json.dumps({"key": self.key, "files": self.files})
            touched, self.touched = self.touched & fds.keys(), set()
            self.flushed_at = time.monotonic()
        for name in touched:
            os.fdatasync(fds[name])
        tmp = self.folder / f"{RECORD}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.folder / RECORD)


def _recorded(entry: Any, item: Remote) -> list[list[int]] | None:
    """The done ranges an entry of the record holds for `item`, or None when it is of another file (other size or
    identity, or none to compare) or not a well-formed list of ranges inside the file."""
    if not (isinstance(entry, dict) and item.identity and isinstance(entry.get("done"), list)):
        return None
    if (entry.get("size"), entry.get("identity")) != (item.size, item.identity):
        return None
    done = entry["done"]
    if not all(isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in done):
        return None
    return _merged(done) if all(0 <= a < b <= item.size for a, b in done) else None


def _merged(ranges: Iterable[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def copy(fs: Any, files: list[Remote], folder: Path, *, key: str, settings: Settings | None = None) -> Stats:
    """Copy `files` into `folder` (the copy's own folder: anything else in it is removed), resuming an earlier
    call's record when it has the same `key`; returns what was copied. After the copy the sizes on disk and the
    remote files' identities are checked again: a mismatch raises RunFailure naming the file (its parts dropped).
    """
    settings = settings or Settings()
    began = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    progress = Progress(folder, key)
    _prune(folder, {f.name for f in files} | ({RECORD} if progress.valid else set()))
    stats = Stats(files=len(files), total=sum(f.size for f in files))
    stats.resumed = sum(progress.adopt(f) for f in files)
    progress.files = {f.name: progress.files[f.name] for f in files}
    _check_space(folder, stats.total - stats.resumed)
    fds: dict[str, int] = {}
    try:
        for f in files:
            fds[f.name] = _open_sized(folder / f.name, f.size)
        stats.fetched = _fetch_all(fs, files, fds, progress, settings)
    except BaseException:
        progress.flush(fds)  # what the next call resumes from; a finished copy needs no record (and no fdatasync)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    _verify(fs, files, folder, progress)
    (folder / RECORD).unlink(missing_ok=True)
    stats.seconds = time.monotonic() - began
    return stats


def _prune(folder: Path, keep: set[str]) -> None:
    for path in folder.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise RunFailure(
            f"{folder}: not enough disk space for the copy: {needed / 2**30:.2f} GiB needed, "
            f"{free / 2**30:.2f} GiB free"
        )


def _open_sized(path: Path, size: int) -> int:
    """Open (or create) the local file at its final size: parts land at their offsets in any order."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)
    return fd


def _fetch_all(fs: Any, files: list[Remote], fds: dict[str, int], progress: Progress, settings: Settings) -> int:
    """Fetch every missing part with `settings.concurrency` in flight; stop at the first failure (the parts in
    flight finish and are recorded) and raise it naming the file and range. Returns the bytes fetched."""
    jobs = [(f, s, e) for f in files for s, e in progress.missing(f, settings.part_size)]
    pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="cna-download")
    futures: dict[Future, tuple[Remote, int, int]] = {}
    stop = threading.Event()  # set by the first failing part: parts not yet started are skipped
    try:
        futures = {pool.submit(_fetch_part, fs, f, s, e, fds, progress, stop): (f, s, e) for f, s, e in jobs}
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        if future.done() and not future.cancelled() and future.exception() is not None:
            item, start, end = futures[future]
            raise RunFailure(
                f"{item.path}: fetching bytes {start}-{end} of {item.size} failed: {future.exception()}"
            ) from future.exception()
    return sum(end - start for _, start, end in jobs)


def _read_range(fs: Any, path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) in one request. Object stores' `cat_file` sends exactly that range; a filesystem whose
    `cat_file` goes through a buffered file (the Hub's HfFileSystem) would read ahead a whole block past `end` on
    every part, so it is opened without a cache: one ranged GET of just the part."""
    if getattr(fs, "async_impl", False) or "hf" not in (
        fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    ):
        return fs.cat_file(path, start=start, end=end)
    with fs.open(path, "rb", cache_type="none") as f:
        f.seek(start)
        return f.read(end - start)


def _fetch_part(
    fs: Any, item: Remote, start: int, end: int, fds: dict[str, int], progress: Progress, stop: threading.Event
) -> None:
    if stop.is_set():
        return
    try:
        data = _read_range(fs, item.path, start, end)
        if len(data) != end - start:
            raise RunFailure(f"got {len(data)} bytes for a {end - start}-byte range (was the file changed?)")
        view, offset = memoryview(data), start
        while view:
            written = os.pwrite(fds[item.name], view, offset)
            view, offset = view[written:], offset + written
    except BaseException:
        stop.set()
        raise
    progress.add(item.name, start, end, fds)


def _verify(fs: Any, files: list[Remote], folder: Path, progress: Progress) -> None:
    """Sizes on disk and the remote identities as they were listed; a changed file loses its parts."""
    for item in files:
        size = (folder / item.name).stat().st_size
        if size != item.size:
            progress.discard(item.name)
            progress.flush({})
            raise RunFailure(f"{folder / item.name}: {size} bytes on disk, but {item.path} has {item.size}")
        fs.invalidate_cache(item.path)
        now = remote(fs.info(item.path))
        if (now.size, now.identity) != (item.size, item.identity):
            progress.discard(item.name)
            progress.flush({})
            raise RunFailure(
                f"{item.path} changed while it was copied ({item.size} bytes {item.identity!r} -> "
                f"{now.size} bytes {now.identity!r}); its parts are discarded"
            )
