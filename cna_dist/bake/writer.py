"""Write a baked checkpoint: safetensors streamed file by file and tensor by tensor, never the whole model.

- A weight file holding a circuit neuron (or any file when the dtype changes) is rewritten: its header is copied
  as is (or re-laid for the new dtype), untouched byte runs are streamed through in parts read as parallel byte
  ranges (`fs.cat_file(path, start, end)`: ranged GETs on object stores), and only a tensor that changes is held
  whole in memory. Peak memory is the largest changed tensor plus `concurrency` parts in flight.
- A file without a circuit neuron is copied as a whole object: server-side (S3 CopyObject, `fs.copy`) when source
  and destination are on the same filesystem, else streamed through in parallel ranges.
- Writes to S3 are multipart uploads with `concurrency` parts in flight (`ParallelUpload`); other filesystems get
  their own streaming writer.
- Crash safety: a local file is written under a temporary name and renamed into place; an object-store write
  becomes visible only when its upload completes. Each finished weight file gets a marker under
  `.cna-bake-partial/<key>/`, so a re-run of the same bake skips it. The files that make a folder look like a
  checkpoint are written last: the shard index, then config.json, the model card, and `cna-bake.json` (the
  completion record) at the very end; only then are the markers removed. A folder without `cna-bake.json` is an
  unfinished bake, and loaders fail on it (no config.json) until every weight file is in place.
"""

from __future__ import annotations

import json
import posixpath
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cna_dist.bake import header as headermod
from cna_dist.bake.columns import Edits
from cna_dist.bake.scale import TORCH, transformed
from cna_dist.errors import RunFailure
from cna_dist.store.download import Settings

PARTIAL = ".cna-bake-partial"
RECORD = "cna-bake.json"
CARD = "README.md"
INDEX_SUFFIX = ".safetensors.index.json"
# Written last, in this order: what makes the folder loadable comes after every weight file.
LAST = ("config.json",)
MIN_UPLOAD_PART = 5 << 20  # S3 multipart parts (all but the last) must be at least 5 MiB


@dataclass(frozen=True)
class Location:
    """A filesystem and a folder path in it."""

    fs: Any
    path: str

    def join(self, name: str) -> str:
        return posixpath.join(self.path.rstrip("/"), name)

    @property
    def local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


@dataclass
class Stats:
    rewritten: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    server_side: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished by an earlier, interrupted run
    bytes_read: int = 0
    bytes_written: int = 0


def same_filesystem(a: Location, b: Location) -> bool:
    return a.fs is b.fs or (type(a.fs) is type(b.fs) and a.fs.storage_options == b.fs.storage_options)


def ranges(
    src: Location, path: str, start: int, end: int, pool: ThreadPoolExecutor, settings: Settings
) -> Iterator[bytes]:
    """The bytes [start, end) of `path` in parts of `settings.part_size`, `settings.concurrency` reads in flight."""
    bounds = iter([(a, min(a + settings.part_size, end)) for a in range(start, end, settings.part_size)])
    pending: deque[tuple[int, Future]] = deque()

    def submit() -> None:
        nxt = next(bounds, None)
        if nxt is not None:
            pending.append((nxt[1] - nxt[0], pool.submit(src.fs.cat_file, path, start=nxt[0], end=nxt[1])))

    for _ in range(settings.concurrency):
        submit()
    while pending:
        size, fut = pending.popleft()
        data = fut.result()
        if len(data) != size:
            raise RunFailure(f"{path}: read {len(data)} bytes where {size} were expected (file changed?)")
        submit()
        yield data


def read_whole(
    src: Location, path: str, start: int, end: int, pool: ThreadPoolExecutor, settings: Settings
) -> bytearray:
    buf = bytearray(end - start)
    pos = 0
    for part in ranges(src, path, start, end, pool, settings):
        buf[pos : pos + len(part)] = part
        pos += len(part)
    return buf


def is_s3(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocol and hasattr(fs, "call_s3")


class ParallelUpload:
    """A file written to S3 as a multipart upload whose parts go up `concurrency` at a time.

    Memory: one part being filled plus `concurrency` parts in flight. The object exists only once `close` completes
    the upload; `discard` aborts it. A file smaller than one part is a single PUT.
    """

    def __init__(self, fs: Any, path: str, part_size: int, concurrency: int):
        self.fs, self.path, self.part_size, self.limit = fs, path, part_size, max(1, concurrency)
        self.bucket, self.key, _ = fs.split_path(path)
        self.buffer = bytearray()
        self.parts: list[Future] = []
        self.upload_id: str | None = None
        self.pool = ThreadPoolExecutor(self.limit)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            take = min(self.part_size - len(self.buffer), len(view) - pos)
            self.buffer += view[pos : pos + take]
            pos += take
            if len(self.buffer) == self.part_size:
                self._send(bytes(self.buffer))
                self.buffer = bytearray()
        return len(view)

    def _send(self, chunk: bytes) -> None:
        if self.upload_id is None:
            self.upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)["UploadId"]
        number = len(self.parts) + 1
        self.parts.append(
            self.pool.submit(
                self.fs.call_s3,
                "upload_part",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=chunk,
            )
        )
        while sum(not f.done() for f in self.parts) >= self.limit:
            wait([f for f in self.parts if not f.done()], return_when=FIRST_COMPLETED)
        for f in self.parts:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def close(self) -> None:
        try:
            if self.upload_id is None:
                self.fs.pipe_file(self.path, bytes(self.buffer))
                return
            if self.buffer:
                self._send(bytes(self.buffer))
            done = [{"PartNumber": i + 1, "ETag": f.result()["ETag"]} for i, f in enumerate(self.parts)]
            self.fs.call_s3(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": done},
            )
        finally:
            self.pool.shutdown()
            self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        for f in self.parts:
            f.cancel()
        self.pool.shutdown(wait=True)
        if self.upload_id is not None:
            self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)


class Output:
    """Writes files into the output folder so that no half-written file ever carries its final name."""

    def __init__(self, out: Location, settings: Settings):
        self.out, self.settings = out, settings

    @contextmanager
    def writing(self, name: str) -> Iterator[Any]:
        """A file open for writing, given its final name only if the block ends without an exception; an upload
        that fails is aborted (no object), a local file that fails keeps its temporary name."""
        part = max(self.settings.part_size, MIN_UPLOAD_PART)
        if is_s3(self.out.fs):
            f: Any = ParallelUpload(self.out.fs, self._staged(name), part, self.settings.concurrency)
        else:
            f = self.out.fs.open(self._staged(name), "wb", block_size=part)
        try:
            yield f
        except BaseException:
            if self.out.local or not hasattr(f, "discard"):
                f.close()
            else:
                f.discard()
            raise
        try:
            f.close()
        except BaseException:
            if not self.out.local and hasattr(f, "discard"):
                f.discard()
            raise
        self.publish(name)

    def publish(self, name: str) -> None:
        if self.out.local:
            self.out.fs.mv(self._staged(name), self.out.join(name))

    def put(self, name: str, data: bytes) -> None:
        with self.writing(name) as f:
            f.write(data)

    def _staged(self, name: str) -> str:
        return self.out.join(name + ".cna-partial") if self.out.local else self.out.join(name)


@dataclass(frozen=True)
class WeightFile:
    name: str
    header: headermod.Header
    edits: Edits  # of this file's tensors
    dtypes: dict[str, str]  # tensor -> new dtype, for a dtype change

    @property
    def changed(self) -> bool:
        return bool(self.edits or self.dtypes)

    def size_out(self) -> int:
        if not self.dtypes:
            return self.header.size
        raw, spans = headermod.relaid(self.header, self.dtypes)
        return max((b for _, b in spans.values()), default=len(raw))


def rewrite(
    src: Location, out: Output, wf: WeightFile, multiplier: float, pool: ThreadPoolExecutor, stats: Stats
) -> None:
    """Stream one weight file through, scaling its circuit columns and converting dtypes on the way."""
    path, settings = src.join(wf.name), out.settings
    raw = headermod.relaid(wf.header, wf.dtypes)[0] if wf.dtypes else wf.header.raw
    with out.writing(wf.name) as f:
        f.write(raw)
        stats.bytes_written += len(raw)
        for start, end, entry in segments(wf):
            if entry is None:
                for part in ranges(src, path, start, end, pool, settings):
                    f.write(part)
                    stats.bytes_read += len(part)
                    stats.bytes_written += len(part)
                continue
            data = read_whole(src, path, start, end, pool, settings)
            stats.bytes_read += len(data)
            cols = wf.edits.get(entry.name, [])
            view = transformed(data, entry.dtype, entry.shape, cols, multiplier, wf.dtypes.get(entry.name))
            f.write(view)
            stats.bytes_written += len(view)
            del data, view
    stats.rewritten.append(wf.name)


def segments(wf: WeightFile) -> list[tuple[int, int, headermod.Entry | None]]:
    """The data section as (start, end, entry to transform or None): untouched neighbours merged into one run."""
    out: list[tuple[int, int, headermod.Entry | None]] = []
    pos = wf.header.data_start
    for e in wf.header.entries:
        if e.name in wf.edits or e.name in wf.dtypes:
            if e.start > pos:
                out.append((pos, e.start, None))
            out.append((e.start, e.end, e))
            pos = e.end
    if wf.header.size > pos:
        out.append((pos, wf.header.size, None))
    return out


def copy_file(
    src: Location, out: Output, name: str, size: int, pool: ThreadPoolExecutor, stats: Stats, server_side: bool
) -> None:
    """One file copied whole: server-side on a shared filesystem, else streamed in parallel ranges."""
    if server_side and not out.out.local:
        out.out.fs.copy(src.join(name), out.out.join(name))
        stats.server_side.append(name)
    elif server_side:
        out.out.fs.copy(src.join(name), out._staged(name))
        out.publish(name)
        stats.copied.append(name)
    else:
        with out.writing(name) as f:
            for part in ranges(src, src.join(name), 0, size, pool, out.settings):
                f.write(part)
                stats.bytes_read += len(part)
                stats.bytes_written += len(part)
        stats.copied.append(name)


@dataclass
class Plan:
    """Everything a bake writes, decided before the first byte is."""

    src: Location
    out: Location
    key: str  # names this bake (circuit, M, source, dtype): markers of another bake are never trusted
    multiplier: float
    weights: list[WeightFile]
    others: dict[str, int]  # non-weight file name -> size, copied as is (config.json and the index last)
    rewritten_text: dict[str, bytes] = field(default_factory=dict)  # name -> new content (config/index for a dtype)

    def marker(self, name: str) -> str:
        return self.out.join(f"{PARTIAL}/{self.key}/{name}.done")


def finished(plan: Plan) -> set[str]:
    """Weight files an earlier run of this same bake completed: marker present and the file of the recorded size."""
    fs, done = plan.out.fs, set()
    for wf in plan.weights:
        try:
            record = json.loads(fs.cat_file(plan.marker(wf.name)))
            if fs.info(plan.out.join(wf.name))["size"] == record["size"]:
                done.add(wf.name)
        except (FileNotFoundError, ValueError, KeyError):
            continue
    return done


def execute(plan: Plan, settings: Settings, finals: Callable[[Output], None]) -> Stats:
    """Write every weight file not finished yet, then the other files, then `finals` (card, record), then clean up."""
    stats = Stats()
    out = Output(plan.out, settings)
    server_side = same_filesystem(plan.src, plan.out)
    done = finished(plan)
    # the bake's own marker first, so that a run killed in its first file is recognised (and resumed) as this bake
    plan.out.fs.pipe_file(plan.out.join(f"{PARTIAL}/{plan.key}/started"), b"")
    with ThreadPoolExecutor(settings.concurrency) as pool:
        for wf in plan.weights:
            if wf.name in done:
                stats.skipped.append(wf.name)
                continue
            if wf.changed:
                rewrite(plan.src, out, wf, plan.multiplier, pool, stats)
            else:
                copy_file(plan.src, out, wf.name, wf.header.size, pool, stats, server_side)
            plan.out.fs.pipe_file(plan.marker(wf.name), json.dumps({"size": wf.size_out()}).encode())
        order = sorted(plan.others, key=lambda n: (n in LAST or n.endswith(INDEX_SUFFIX), n in LAST, n))
        for name in order:
            if name in plan.rewritten_text:
                out.put(name, plan.rewritten_text[name])
                stats.copied.append(name)
            else:
                copy_file(plan.src, out, name, plan.others[name], pool, stats, server_side)
    finals(out)
    try:
        plan.out.fs.rm(plan.out.join(PARTIAL), recursive=True)
    except FileNotFoundError:
        pass
    return stats


def dtype_changes(weights: list[headermod.Header], names: list[str], dtype: str | None) -> dict[str, dict[str, str]]:
    """file -> {tensor: new dtype} for every floating tensor not already `dtype`."""
    if dtype is None:
        return {}
    return {
        name: {e.name: dtype for e in h.entries if e.dtype in TORCH and e.dtype != dtype}
        for name, h in zip(names, weights, strict=True)
    }
