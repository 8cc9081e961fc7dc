"""Write a block of rows straight into a Zarr v3 array's chunk objects, encoded in parallel threads; read them back.

Why: zarr's own write path encodes every chunk (the bytes codec, then crc32c) on its event-loop thread, one
after another, and copies each chunk several times on the way. A replica of a 72B model produces about 1 GB/s
of rows; on a few cores that path, not the GPUs, would cap it. Here each worker thread takes one chunk: a chunk
the block covers whole is not copied at all; its rows are checked for NaN and hashed (crc32c) block by block while
in cache, then written with one writev (or joined once for a PUT). An edge chunk is copied once, padded, into a
buffer with room for its checksum. Chunks are checked and stored side by side: numpy's reductions, the writes and
awscrt's crc32c all release the GIL. The checksum is awscrt's, not google-crc32c's (which zarr reads with): from
memory it hashes twice as fast here (folding with carry-less multiplies), and google-crc32c holds the GIL, so its
hashing in all writer threads together ran at one core's speed and stalled the replica's compute thread.

Reads mirror writes: a chunk file is read straight into the caller's block with one readv and its crc32c checked,
where zarr's read decodes through copies on its event loop, about 3x slower. `read_block` takes any `Get`; the store
uses it for local files only (object stores read through zarr).

Only the plain layout the activation store creates is written this way: C order, little-endian bytes,
crc32c, no other codec; `direct_layout` says whether an array has it, and other arrays go through zarr. The
objects are byte for byte what zarr writes (tests/test_chunks.py reads them back through zarr), under the key
zarr's own metadata gives for each chunk. A region's edge chunk that the region covers only in part is padded
with the array's fill value, as zarr stores it, and only a region that owns whole chunks may be written: the
store's shards own whole row chunks, and writers own whole layer chunks.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from awscrt.checksums import crc32c

# A chunk object's bytes as C-contiguous buffers, in order: stored with one writev locally, joined for a PUT.
Put = Callable[[str, list[Any]], None]
# Fills writable byte buffers, in order, with a chunk object's bytes (one readv); False if it is absent.
Get = Callable[[str, list[memoryview]], bool]
BLOCK_BYTES = 1 << 20  # bytes checked for NaN and hashed per step: the second read comes from a core's cache
_pools: dict[int, cf.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def direct_layout(arr: Any) -> bool:
    """True when the array's chunks are exactly [C-order little-endian bytes][crc32c]: what `encode` makes."""
    meta = arr.metadata
    codecs = [codec.to_dict() for codec in getattr(meta, "codecs", ())]
    names = [c.get("name") for c in codecs]
    if names != ["bytes", "crc32c"] or getattr(meta, "zarr_format", 3) != 3:
        return False
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    return endian == "little" and getattr(arr, "order", "C") == "C"


def encode(block: np.ndarray, chunk_shape: tuple[int, ...], fill: Any) -> memoryview:
    """One chunk object: the values (padded to the chunk shape with `fill`) then their crc32c, one copy.

    The buffer is numpy's (malloc'd, reused across chunks), not a zeroed bytearray: fresh zeroed pages cost a page
    fault each, which made encoding ten times slower than the copy itself.
    """
    itemsize = block.dtype.itemsize
    nbytes = int(np.prod(chunk_shape)) * itemsize
    out = np.empty(nbytes + 4, dtype=np.uint8)
    values = out[:nbytes].view(block.dtype.newbyteorder("<")).reshape(chunk_shape)
    if block.shape != chunk_shape:
        values[...] = fill
    values[tuple(slice(0, n) for n in block.shape)] = block
    out[nbytes:] = np.frombuffer(_crc_bytes(crc32c(out[:nbytes])), np.uint8)
    return memoryview(out)


def _crc_bytes(crc: int) -> bytes:
    return int(crc).to_bytes(4, "little")


def in_place(part: np.ndarray, chunk_shape: tuple[int, ...]) -> bool:
    """True when a chunk's values can be stored straight from `part`, without a copy: it fills the whole chunk,
    is little-endian, and each of its rows (its first axis) is C-contiguous (a block of whole rows sliced by layer
    range, as the store's shards are)."""
    little = part.dtype == part.dtype.newbyteorder("<")
    return part.shape == chunk_shape and little and (part.flags.c_contiguous or part[0].flags.c_contiguous)


def pieces(part: np.ndarray, row: int) -> list[Any]:
    """A whole chunk's values straight from `part` (its rows, not a copy), then its crc32c.

    The values are checked for NaN (NaNRows with the array row; `row` is part's first) and hashed in blocks of
    about BLOCK_BYTES, so the check reads each block from the cache the hash just filled. They are stored with one
    write call once all are checked, so a chunk holding NaN is never begun.
    """
    crc = 0
    step = max(1, BLOCK_BYTES // max(1, part[0].nbytes))
    whole = part.flags.c_contiguous
    for lo in range(0, len(part), step):
        block = part[lo : lo + step]
        for buffer in [block] if whole else block:
            crc = crc32c(buffer, crc)
        bad = first_nan_row(block)
        if bad is not None:
            raise NaNRows(row + lo + bad)
    return [part, _crc_bytes(crc)] if whole else [*part, _crc_bytes(crc)]


def encoded(part: np.ndarray, chunk_shape: tuple[int, ...], fill: Any, row: int) -> list[Any]:
    """A chunk that `part` fills only in part (an edge chunk) or cannot be stored from in place: one padded copy."""
    data = encode(part, chunk_shape, fill)
    values = np.frombuffer(data, dtype=part.dtype, count=int(np.prod(chunk_shape)))
    # the copy just made, still in cache; only the part's own values: a chunk past the array's last row or layer
    # is padded with the fill (NaN), which is no missing data
    bad = first_nan_row(values.reshape(chunk_shape)[tuple(slice(0, n) for n in part.shape)])
    if bad is not None:
        raise NaNRows(row + bad)
    return [data]


def regions(
    shape: tuple[int, ...], chunk_shape: tuple[int, ...], start: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(chunk coordinates, the slice of `block` it holds) for a block of `shape` placed at `start` in the array."""
    if any(s % c for s, c in zip(start, chunk_shape, strict=True)):
        raise ValueError(f"a block at {start} does not start on a chunk edge {chunk_shape}")
    grids = [range(0, n, c) for n, c in zip(shape, chunk_shape, strict=True)]
    out = []
    for offsets in np.ndindex(*[len(g) for g in grids]):
        lows = [grids[d][k] for d, k in enumerate(offsets)]
        coords = tuple((s + lo) // c for s, lo, c in zip(start, lows, chunk_shape, strict=True))
        where = tuple(slice(lo, min(lo + c, n)) for lo, c, n in zip(lows, chunk_shape, shape, strict=True))
        out.append((coords, where))
    return out


def pool(threads: int) -> cf.ThreadPoolExecutor:
    """A writer pool per thread count, kept for the process: starting threads for every shard cost milliseconds."""
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = cf.ThreadPoolExecutor(threads, thread_name_prefix=f"cna-write{threads}")
        return _pools[threads]


def write_block(arr: Any, block: np.ndarray, start: tuple[int, ...], put: Put, threads: int) -> int:
    """Check, hash and store every chunk `block` covers (placed at `start`), `threads` at a time; returns the bytes.

    A chunk holding NaN (the array's fill: stored, it would read as missing data) is not stored and raises NaNRows
    with its first such row; chunks of the block already stored stay, uncommitted, as after an interrupted write.
    """
    chunk_shape = tuple(arr.metadata.chunk_grid.chunk_shape)
    fill = arr.metadata.fill_value
    work = regions(block.shape, chunk_shape, start)
    nbytes = int(np.prod(chunk_shape)) * block.dtype.itemsize + 4

    def one(item: tuple[tuple[int, ...], tuple[slice, ...]]) -> int:
        coords, where = item
        part, row = block[where], start[0] + where[0].start
        data = pieces(part, row) if in_place(part, chunk_shape) else encoded(part, chunk_shape, fill, row)
        put(arr.metadata.encode_chunk_key(coords), data)
        return nbytes

    if threads <= 1 or len(work) == 1:
        return sum(map(one, work))
    futures = [pool(threads).submit(one, item) for item in work]
    cf.wait(futures)  # every chunk finished or failed before this returns, as with a pool of its own
    return sum(f.result() for f in futures)


def read_block(arr: Any, out: np.ndarray, start: tuple[int, ...], get: Get) -> None:
    """Fill `out` (C-contiguous) with the array's values from `start` (on chunk edges), each chunk's checksum checked.

    A chunk that fills its region of `out` whole is read straight into it, row by row, with no copy (locally one
    readv, the mirror of a write's writev); an edge chunk (past the array's end) is read into a buffer and its part
    copied. An absent chunk reads as the fill value, as through zarr, and the reader's NaN probe says it is missing.
    """
    chunk_shape = tuple(arr.metadata.chunk_grid.chunk_shape)
    for coords, where in regions(out.shape, chunk_shape, start):
        key = arr.metadata.encode_chunk_key(coords)
        part = out[where]
        values = part if part.shape == chunk_shape else np.empty(chunk_shape, out.dtype)
        stored = bytearray(4)
        rows = [memoryview(values)] if values.flags.c_contiguous else [memoryview(row) for row in values]
        views = [row.cast("B") for row in rows]
        if not get(key, [*views, memoryview(stored)]):
            part[...] = arr.metadata.fill_value
            continue
        crc = 0
        for view in views:
            crc = crc32c(view, crc)
        if crc != int.from_bytes(stored, "little"):
            raise ValueError(
                f"chunk {key}: stored and computed checksum do not match "
                f"(stored {int.from_bytes(stored, 'little'):#010x}, computed {crc:#010x})"
            )
        if values is not part:
            part[...] = values[tuple(slice(0, n) for n in part.shape)]


def local_get(folder: str) -> Get:
    """Read a chunk object from a file under `folder` (the array's folder) with readv; a file of another size than
    the chunk's is an error naming it (a truncated or foreign object is never decoded as values)."""

    def get(key: str, views: list[memoryview]) -> bool:
        path = os.path.join(folder, *key.split("/"))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            _check_size(path, os.fstat(fd).st_size, views)
            _read_all(fd, path, views)
        finally:
            os.close(fd)
        return True

    return get


def _check_size(path: str, size: int, views: list[memoryview]) -> None:
    expected = sum(len(v) for v in views)
    if size != expected:
        raise ValueError(f"chunk object {path} holds {size} bytes, not the {expected} of a chunk and its checksum")


def _read_all(fd: int, path: str, views: list[memoryview]) -> None:
    _vectored(os.readv, fd, views, f"chunk object {path} ended early")


def _vectored(call: Callable[[int, list[memoryview]], int], fd: int, views: list[memoryview], stalled: str) -> None:
    """os.readv or os.writev until every buffer is done: a short call continues where it stopped, IOV_MAX buffers a
    call; a call that moves nothing (a file that ended) raises `stalled`."""
    while views:
        done = call(fd, views[:1024])
        if done == 0:
            raise OSError(stalled)
        while views and done >= len(views[0]):
            done -= len(views[0])
            views = views[1:]
        if done:
            views = [views[0][done:], *views[1:]]


def local_put(folder: str) -> Put:
    """Store a chunk object as a file under `folder` (the array's folder), creating its parent folders: its
    buffers written with one writev (a file left half-written by a failing write is removed)."""

    def put(key: str, data: list[Any]) -> None:
        path = os.path.join(folder, *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    return put


def _write_all(fd: int, buffers: list[Any]) -> None:
    _vectored(os.writev, fd, [memoryview(b).cast("B") for b in buffers], "a write of a chunk object stored nothing")


def fs_put(fs: Any, folder: str) -> Put:
    """Store a chunk object through an fsspec filesystem: one PUT per object, its buffers joined (the one copy)."""

    def put(key: str, data: list[Any]) -> None:
        fs.pipe_file(f"{folder.rstrip('/')}/{key}", b"".join(data))

    return put


class NaNRows(ValueError):
    """A chunk's values hold NaN (the fill of a chunk never written); `row` is the first such row in the array."""

    def __init__(self, row: int):
        super().__init__(f"row {row} holds NaN")
        self.row = row


# per float width: (unsigned view, signed view, magnitude mask, +inf's bits, -inf's bits)
_BITS = {
    2: (np.uint16, np.int16, 0x7FFF, 0x7C00, 0xFC00),
    4: (np.uint32, np.int32, 0x7FFFFFFF, 0x7F800000, 0xFF800000),
}


def first_nan_row(values: np.ndarray) -> int | None:
    """The first index along axis 0 whose values hold a NaN, or None; float16/32 by bit pattern.

    A NaN's bits lie above +inf's read as signed integers (positive NaN) or above -inf's read as unsigned (negative
    NaN), so two max reductions, which read the values and write nothing, decide; only then is the row located.
    """
    bits = _BITS.get(values.dtype.itemsize)
    if bits is None or values.dtype.kind != "f":
        bad = np.isnan(values).reshape(len(values), -1).any(axis=1)
    else:
        unsigned, signed, magnitude, inf, negative_inf = bits
        if values.size == 0 or (values.view(signed).max() <= inf and values.view(unsigned).max() <= negative_inf):
            return None
        bad = (np.bitwise_and(values.view(unsigned), magnitude) > inf).reshape(len(values), -1).any(axis=1)
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None
