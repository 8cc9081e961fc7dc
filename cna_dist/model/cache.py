"""A bounded node cache of checkpoint copies: least recently used complete copies go first, never one in use.

A node keeps a copy of every remote checkpoint it has mined (`checkpoint.localize`: `<cache>/models/<fp>/`, and the
driver's config-and-tokenizer copies under `tokenizers/`). A nightly job whose checkpoints change fills the disk
one fingerprint at a time. With `CNA_DIST_CACHE_MAX_BYTES` set (bytes, or with a K, M, G or T suffix, powers of
1024), each time a process uses a copy the cache is brought under that size:

- the copy is stamped as used now (the modification time of `<fp>.use` beside it) and held: the process keeps a
  shared lock on `<fp>.use` for as long as it lives (a replica reads its weights for its whole life);
- complete copies of that kind are removed, least recently used first, while the cache is over the bound, skipping
  any that a live process holds (a lock it cannot take) or that is being copied (its copy lock, `<fp>.lock`);
- `.partial` copies of other fingerprints that nobody is copying now are removed (a checkpoint that changed never
  resumes its old copy), bound or no bound.

A copy in use is never removed, so the cache may stay over the bound; that is said on stderr, not an error.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cna_dist.errors import BadInput

ENV = "CNA_DIST_CACHE_MAX_BYTES"
SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_held: dict[str, IO[bytes]] = {}  # use-file path -> its open file, locked shared until this process ends


def max_bytes(value: str | None = None) -> int | None:
    """The bound from `CNA_DIST_CACHE_MAX_BYTES` (None: unbounded); a value that is not a size is bad input."""
    text = (os.environ.get(ENV) if value is None else value) or ""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return None
    number, unit = (text[:-1], text[-1]) if text[-1] in SUFFIXES else (text, "")
    try:
        size = float(number) * SUFFIXES[unit]
    except ValueError:
        size = -1.0
    if not size >= 0:
        raise BadInput(f"{text!r} is not a size in bytes (e.g. 500G)", field=ENV)
    return int(size)


@dataclass(frozen=True)
class Copy:
    path: Path
    nbytes: int
    used: float  # when a process last used it (the use file's mtime; the folder's for a copy never stamped)


def _use_file(copy: Path) -> Path:
    return copy.with_name(copy.name + ".use")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def used(target: Path) -> None:
    """The hook `checkpoint` calls with a copy it has just made or found, under that copy's lock."""
    hold(target)
    prune(target.parent, keep=target, bound=max_bytes())


def hold(target: Path) -> None:
    """Stamp the copy as used now and keep a shared lock on it for the rest of this process's life."""
    use = _use_file(target)
    if str(use) not in _held:
        handle = open(use, "ab")  # noqa: SIM115 - held open on purpose: the lock lives as long as the process
        fcntl.flock(handle, fcntl.LOCK_SH)
        _held[str(use)] = handle
    os.utime(use)


def copies(kind_root: Path) -> list[Copy]:
    """The complete copies of one kind (a `.complete` marker inside), least recently used first."""
    out = []
    for folder in kind_root.iterdir() if kind_root.is_dir() else ():
        if folder.is_dir() and (folder / ".complete").exists():
            use = _use_file(folder)
            stamp = use.stat().st_mtime if use.exists() else folder.stat().st_mtime
            out.append(Copy(folder, _size(folder), stamp))
    return sorted(out, key=lambda c: (c.used, c.path.name))


def _try_lock(path: Path, kind: int) -> IO[bytes] | None:
    """The file opened and locked (`kind` | non-blocking), or None when another process holds a conflicting lock."""
    handle = open(path, "ab")  # noqa: SIM115 - returned locked; the caller closes it
    try:
        fcntl.flock(handle, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _remove(folder: Path) -> bool:
    """Remove a copy (or a partial copy) nobody uses or copies, under its copy lock and its use lock, both taken
    without waiting; False when it is busy."""
    fp = folder.name.removesuffix(".partial")
    copying = _try_lock(folder.with_name(fp + ".lock"), fcntl.LOCK_EX)
    if copying is None:
        return False
    try:
        use = folder.with_name(fp + ".use")
        if str(use) in _held:  # this process holds it
            return False
        in_use = _try_lock(use, fcntl.LOCK_EX) if folder.name == fp else None
        if folder.name == fp and in_use is None:
            return False
        try:
            doomed = folder.with_name(folder.name + ".evicting")  # out of place first: never half a copy in place
            folder.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            if in_use is not None:
                use.unlink(missing_ok=True)
            return True
        finally:
            if in_use is not None:
                in_use.close()
    finally:
        copying.close()


def prune(kind_root: Path, *, keep: Path, bound: int | None) -> list[Path]:
    """Remove stale partial copies, then least recently used copies beyond `bound`; returns what was removed."""
    removed = []
    for partial in sorted(kind_root.glob("*.partial")):
        if partial.name != keep.name + ".partial" and _remove(partial):
            removed.append(partial)
    if bound is None:
        return removed
    found = copies(kind_root)
    total = sum(c.nbytes for c in found)
    for c in found:
        if total <= bound:
            break
        if c.path != keep and _remove(c.path):
            removed.append(c.path)
            total -= c.nbytes
    if total > bound:
        print(
            f"model cache {kind_root}: {total / 2**30:.2f} GiB in copies in use, over {ENV} ({bound / 2**30:.2f} GiB)",
            file=sys.stderr,
        )
    return removed
