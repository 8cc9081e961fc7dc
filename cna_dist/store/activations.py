"""Activation store: Zarr v3 on any fsspec URL, content-addressed so nothing is captured twice.

Layout under STORE:

    runs/<run>/run.json                 model fingerprint, shape, capture params, chunking (written once)
    runs/<run>/acts/                    Zarr array [row, layer, neuron], chunks (rows_per_chunk, layers_per_chunk,
                                        neurons), fill NaN (a missing chunk can never read as data), crc32c per chunk
    runs/<run>/commits/<shard>.json     written after all of the shard's data: the sha256 of every rendered prompt
                                        in its rows, in row order, and how they were made. No marker, no shard.

`run` = hash(model fingerprint, capture params); a row belongs to a rendered prompt's hash, so any manifest
using the same model and capture params reuses every committed row. Shard i owns rows
[i * shard_rows, (i + 1) * shard_rows), a whole number of row chunks: writers never share a chunk.
A shard may have several writers, each owning a range of layer chunks (a pipeline stage): each writes its part
(`write_rows`), and the marker comes once every part is in (`commit`). Only the driver grows the array (metadata),
before it hands out shards.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cna_dist.errors import BadInput, RunFailure
from cna_dist.store import chunks, integrity
from cna_dist.store import uri as urimod
from cna_dist.store.lease import Lease
from cna_dist.store.objects import LocalObjects

FORMAT = "cna-store/1"
TARGET_CHUNK_BYTES = 8 << 20
# chunks encoded and stored at once per write: enough to keep an object store's PUTs and a few cores busy
WRITE_THREADS = int(os.environ.get("CNA_WRITE_THREADS", "0")) or min(8, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class RunMeta:
    """What makes two captures interchangeable: same model bytes, same rendering, same stored dtype."""

    fingerprint: str
    model_uri: str
    n_layers: int
    intermediate_size: int
    dtype: str
    model_dtype: str
    chat_template: bool
    rows_per_chunk: int = 0
    layers_per_chunk: int = 0
    shard_rows: int = 0

    def key(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "model_dtype": self.model_dtype,
            "chat_template": self.chat_template,
        }


def run_id(meta: RunMeta) -> str:
    return hashlib.sha256(json.dumps(meta.key(), sort_keys=True).encode()).hexdigest()[:20]


def chunking(n_layers: int, width: int, itemsize: int, shard_rows: int | None = None) -> tuple[int, int, int]:
    """(rows_per_chunk, layers_per_chunk, shard_rows) giving chunks of about 8 MB at real model sizes.

    Qwen2.5-72B in float16: one layer of one row is 59 KB, so chunks are 64 rows x 2 layers = 7.6 MB and a
    reduce task reading one layer block holds one such chunk at a time.
    """
    row_layer = width * itemsize
    if row_layer * n_layers * 256 <= TARGET_CHUNK_BYTES:
        layers_per_chunk = n_layers  # small models: whole rows per chunk
    else:
        layers_per_chunk = max(1, min(n_layers, TARGET_CHUNK_BYTES // (row_layer * 64)))
    rows = min(TARGET_CHUNK_BYTES // (row_layer * layers_per_chunk), 1024, shard_rows or 1024)
    rows_per_chunk = int(2 ** np.floor(np.log2(max(1, rows))))
    if shard_rows is None:
        shard_rows = max(rows_per_chunk, 256)
    shard_rows = max(rows_per_chunk, (shard_rows // rows_per_chunk) * rows_per_chunk)
    return rows_per_chunk, layers_per_chunk, shard_rows


def chunk_aligned(
    parts: list[tuple[int, int, np.ndarray]], layers_per_chunk: int, n_layers: int
) -> list[tuple[int, int, np.ndarray]]:
    """Adjacent parts joined until every boundary falls on a layer-chunk edge, so no two writes share a chunk.

    Pipeline stages split layers where the GPUs balance, the store chunks layers by size: on a 72B model (one layer
    per chunk) every stage writes its own part; on a small model (whole rows per chunk) the parts become one write.
    """
    out: list[tuple[int, int, np.ndarray]] = []
    pending: list[tuple[int, int, np.ndarray]] = []
    for part in sorted(parts, key=lambda p: p[0]):
        pending.append(part)
        hi = part[1]
        if hi % layers_per_chunk == 0 or hi == n_layers:
            acts = pending[0][2] if len(pending) == 1 else np.concatenate([p[2] for p in pending], axis=1)
            out.append((pending[0][0], hi, acts))
            pending = []
    if pending:
        raise RunFailure(f"parts end at layer {pending[-1][1]}, not at the last layer {n_layers}")
    return out


def has_nan(a: np.ndarray) -> bool:
    """NaN test on the bit pattern (exponent all ones, mantissa non-zero): ~15x faster than np.isnan on float16."""
    bits = {2: (np.uint16, 0x7FFF, 0x7C00), 4: (np.uint32, 0x7FFFFFFF, 0x7F800000)}.get(a.dtype.itemsize)
    if bits is None or a.dtype.kind != "f":
        return bool(np.isnan(a).any())
    view, magnitude, inf = bits
    return bool(((a.view(view) & magnitude) > inf).any())


@dataclass(frozen=True)
class WrittenPart:
    """A writer's receipt: shard `shard`'s rows for layers [lo, hi) are in the store (not yet committed)."""

    shard: int
    lo: int
    hi: int
    nbytes: int


@dataclass(frozen=True)
class ShardPlan:
    """Shard `shard` holds rows [start, start + len(hashes)). `positions`: where each of its hashes stands in the
    list `Run.plan` was given (its first occurrence), so the caller gathers their token ids by position."""

    shard: int
    start: int
    hashes: list[str]
    positions: np.ndarray | None = field(default=None, compare=False, repr=False)


class Run:
    """One content-addressed run inside a store: its array, its commit markers, its row index.

    `write_threads`: how many chunks `write_rows` encodes and stores at once (benchmarks/write.py measures it).
    `direct_reads`: `read_blocks` reads a local store's chunk files itself (False: through zarr, as
    benchmarks/reduce.py compares).
    """

    write_threads: int = WRITE_THREADS
    direct_reads: bool = True

    def __init__(self, store_uri: str, run: str, meta: RunMeta, storage_options: dict[str, Any] | None = None):
        self.store_uri = store_uri
        self.id = run
        self.meta = meta
        self.storage_options = storage_options or {}
        self.root = urimod.join(store_uri, "runs", run)
        self.fs, self.root_path = urimod.filesystem(self.root, self.storage_options)
        self._seen: dict[tuple, dict[str, Any]] = {}  # (marker name, size, version) -> the marker read

    def __getstate__(self) -> dict[str, Any]:
        """A Run travels to every replica call: without the driver's cache of markers read."""
        return {**self.__dict__, "_seen": {}}

    # -- objects -------------------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root_path.rstrip("/"), *parts])

    def array(self, mode: str = "r+") -> Any:
        import zarr

        try:
            return zarr.open_array(store=self.root, path="acts", mode=mode, storage_options=self._zarr_options())
        except Exception as exc:  # noqa: BLE001 - any failure to open is reported with the object's name
            raise RunFailure(f"cannot open activation array {self.root}/acts: {type(exc).__name__}: {exc}") from exc

    def _zarr_options(self) -> dict[str, Any] | None:
        """zarr opens its own filesystem: with the options (retries, timeouts) every other object here gets."""
        return None if urimod.is_local(self.root) else urimod.effective_options(self.root, self.storage_options)

    def commit_path(self, shard: int) -> str:
        return self._path("commits", f"{shard:08d}.json")

    # -- reading the state ---------------------------------------------------------------------------------
    def markers(self) -> dict[int, dict[str, Any]]:
        """Shard -> its commit marker, for every committed shard. A corrupt marker is an error, not absent.

        One listing per call; a marker already read (same name, size and version) is not read again, so a driver
        that plans, counts and indexes a run of thousands of shards reads each marker once, not once per call.
        """
        out: dict[int, dict[str, Any]] = {}
        folder = self._path("commits")
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return out
        for entry in entries:
            name = entry["name"]
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".json"):
                version = (name, entry.get("size"), entry.get("ETag") or entry.get("mtime"))
                marker = self._seen.get(version)
                if marker is None:
                    marker = self._seen[version] = self._marker(name, base)
                out[int(marker["shard"])] = marker
        return out

    def _marker(self, name: str, base: str) -> dict[str, Any]:
        return integrity.marker(self.fs.cat_file(name), name, self.meta.shard_rows)

    def committed(self) -> dict[int, list[str]]:
        """Shard -> row hashes, for every shard whose marker exists."""
        return {shard: list(marker["rows"]) for shard, marker in self.markers().items()}

    def row_index(self, committed: dict[int, list[str]] | None = None) -> dict[str, int]:
        committed = self.committed() if committed is None else committed
        index: dict[str, int] = {}
        for shard, rows in sorted(committed.items()):
            start = shard * self.meta.shard_rows
            for offset, h in enumerate(rows):
                index.setdefault(h, start + offset)
        return index

    # -- planning and writing --------------------------------------------------------------------------------
    def _put(self) -> chunks.Put:
        """Where `write_rows` stores encoded chunk objects: files under the array's folder, or the object store."""
        if urimod.is_local(self.root):
            return chunks.local_put(self._path("acts"))
        return chunks.fs_put(self.fs, self._path("acts"))

    def plan(self, hashes: list[str]) -> list[ShardPlan]:
        """Shards for the prompts not yet committed, in free shard slots; grows the array to hold them."""
        committed = self.committed()
        have = self.row_index(committed)
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            if h not in have:
                first.setdefault(h, i)
        missing, where = list(first), np.fromiter(first.values(), dtype=np.int64, count=len(first))
        size = self.meta.shard_rows
        plans: list[ShardPlan] = []
        slot = 0
        for i in range(0, len(missing), size):
            while slot in committed:
                slot += 1
            plans.append(ShardPlan(slot, slot * size, missing[i : i + size], where[i : i + size].copy()))
            slot += 1
        if plans:
            arr = self.array()
            needed = max(p.start + len(p.hashes) for p in plans)
            if needed > arr.shape[0]:
                arr.resize((needed, *arr.shape[1:]))
        return plans

    def write_rows(self, plan: ShardPlan, acts: np.ndarray, layers: slice) -> WrittenPart:
        """Write one writer's part of a shard: its rows for a range of layers (a pipeline stage owns a range).

        The range must start and end on the store's layer-chunk boundaries (or the last layer), so two writers of
        one shard never write the same chunk. Nothing is committed: see `commit`.
        """
        lo, hi = layers.start or 0, self.meta.n_layers if layers.stop is None else layers.stop
        per = self.meta.layers_per_chunk
        if not 0 <= lo < hi <= self.meta.n_layers:
            raise RunFailure(f"shard {plan.shard}: layers {lo}:{hi} are outside the run's {self.meta.n_layers}")
        if lo % per or (hi % per and hi != self.meta.n_layers):
            raise RunFailure(
                f"shard {plan.shard}: layers {lo}:{hi} cut the store's layer chunks of {per}; another writer of this "
                "shard would share a chunk"
            )
        expected = (len(plan.hashes), hi - lo, self.meta.intermediate_size)
        if acts.shape != expected:
            raise RunFailure(f"shard {plan.shard}: activations of shape {acts.shape} do not match {expected}")
        arr, rows = self.array(), slice(plan.start, plan.start + len(plan.hashes))
        direct = chunks.direct_layout(arr) and acts.dtype == arr.dtype
        if not direct and has_nan(acts):  # NaN is the fill of a chunk never written: stored, it would read as missing
            row = int(np.flatnonzero(np.isnan(acts).any(axis=(1, 2)))[0])
            raise RunFailure(f"shard {plan.shard}: the activations of row {plan.start + row} hold NaN; nothing written")
        try:
            if direct:  # each chunk checked for NaN as it is encoded: one pass over the values, not two
                chunks.write_block(arr, acts, (plan.start, lo, 0), self._put(), self.write_threads)
            else:
                arr[rows, lo:hi] = acts
        except chunks.NaNRows as exc:
            raise RunFailure(
                f"shard {plan.shard}: the activations of row {exc.row} hold NaN; the shard is not committed"
            ) from None
        except Exception as exc:  # noqa: BLE001 - storage errors do not name their object: this does
            raise RunFailure(
                f"cannot write {self.root}/acts rows {rows.start}:{rows.stop} layers {lo}:{hi}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return WrittenPart(plan.shard, lo, hi, int(acts.nbytes))

    def commit(
        self, plan: ShardPlan, parts: list[WrittenPart], writer: str = "", made_by: dict[str, str] | None = None
    ) -> None:
        """Write the shard's marker once its parts cover every layer exactly once: no marker, no shard.

        Called after every writer's `write_rows` returned, so a marker never precedes its data; a shard interrupted
        before its marker is simply absent and is captured again. `made_by` (backend, library, engine) records how
        the rows were made without entering the run id.
        """
        spans = sorted((p.lo, p.hi) for p in parts if p.shard == plan.shard)
        edges = [0] + [edge for span in spans for edge in span] + [self.meta.n_layers]
        if len(spans) != len(parts) or any(edges[i] != edges[i + 1] for i in range(0, len(edges), 2)):
            raise RunFailure(f"shard {plan.shard}: written parts {spans} do not cover layers 0:{self.meta.n_layers}")
        marker = {
            "shard": plan.shard,
            "rows": plan.hashes,
            "n_rows": len(plan.hashes),
            "writer": writer,
            "nbytes": sum(p.nbytes for p in parts),
            "layers": [list(span) for span in spans],
        }
        if made_by:
            marker["made_by"] = made_by
        marker = integrity.seal(marker)  # its own checksum: a hand edit that keeps the schema is found on reading
        try:
            if urimod.is_local(self.root):  # a local file is written in place: a crash would leave half a marker
                LocalObjects(self.root).put(f"commits/{plan.shard:08d}.json", json.dumps(marker).encode())
            else:  # an object store's PUT is whole or nothing
                self.fs.pipe_file(self.commit_path(plan.shard), json.dumps(marker).encode())
        except Exception as exc:  # noqa: BLE001 - storage errors do not name their object: this does
            uri = f"{self.root}/commits/{plan.shard:08d}.json"
            raise RunFailure(f"cannot write the commit marker {uri}: {type(exc).__name__}: {exc}") from exc

    # -- reading blocks --------------------------------------------------------------------------------------
    def read_rows(self, rows: np.ndarray, layers: slice, prefetch: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (positions in `rows`, activations [n, layer block, neuron]) one row chunk at a time."""
        for _, positions, acts in self.read_blocks(rows, [layers], prefetch):
            yield positions, acts

    def read_blocks(
        self, rows: np.ndarray, blocks: list[slice], prefetch: int = 1
    ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """Yield (layer block, positions in `rows`, activations [n, block, neuron]): each block, a row chunk at a time.

        Memory stays at `prefetch` + 1 chunk row-ranges of a block whatever the store size: a reader thread fetches
        and decodes the next chunk, across block boundaries too, while the caller computes on this one. A chunk that
        is missing (reads as the NaN fill) or fails its checksum is an error naming the chunk. The arrays yielded
        are the caller's to modify.
        """
        arr = self.array(mode="r")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        bounds = np.flatnonzero(np.diff(sorted_rows // self.meta.rows_per_chunk)) + 1
        pieces = list(zip(np.split(order, bounds), np.split(sorted_rows, bounds), strict=True))
        work = [(layers, positions, wanted) for layers in blocks for positions, wanted in pieces]
        with cf.ThreadPoolExecutor(1, thread_name_prefix="cna-read") as reader:
            pending: deque[tuple[slice, np.ndarray, cf.Future]] = deque()
            try:
                for layers, positions, wanted in work:
                    pending.append((layers, positions, reader.submit(self._read_chunk, arr, wanted, layers)))
                    if len(pending) > prefetch:
                        done, at, future = pending.popleft()
                        yield done, at, future.result()
                while pending:
                    done, at, future = pending.popleft()
                    yield done, at, future.result()
            finally:
                for _, _, future in pending:
                    future.cancel()

    def read_region(self, arr: Any, rows: slice, layers: slice) -> np.ndarray:
        """Rows and layers of the array (`array()`) as an array of their own, every chunk's checksum checked.

        In a local store, where the array has the store's own layout and the region starts on chunk edges, its chunk
        files are read straight into it (chunks.read_block): zarr's path decodes each chunk through copies on its
        event loop and reads about 3x slower. Object stores, any other region, or `direct_reads` off: through zarr,
        whose GETs of large chunks ran faster on moto than a GET through the run's own filesystem.
        """
        start, stop, step = layers.indices(self.meta.n_layers)
        lo, hi = rows.start, rows.stop
        edges = lo % self.meta.rows_per_chunk == 0 and start % self.meta.layers_per_chunk == 0
        local = self.direct_reads and urimod.is_local(self.root)
        if local and step == 1 and stop > start and hi > lo and edges and chunks.direct_layout(arr):
            block = np.empty((hi - lo, stop - start, arr.shape[2]), dtype=arr.dtype)
            chunks.read_block(arr, block, (lo, start, 0), chunks.local_get(self._path("acts")))
            return block
        return np.asarray(arr[rows, layers])

    def _read_chunk(self, arr: Any, wanted: np.ndarray, layers: slice) -> np.ndarray:
        """The wanted rows (sorted, all in one row chunk) of a layer block; a view when they are the whole range."""
        r = self.meta.rows_per_chunk
        lo = int(wanted[0]) // r * r
        hi = min(lo + r, arr.shape[0])
        try:
            block = self.read_region(arr, slice(lo, hi), layers)
        except Exception as exc:  # noqa: BLE001
            raise RunFailure(
                f"cannot read {self.root}/acts rows {lo}:{hi} layers "
                f"{layers.start}:{layers.stop}: {type(exc).__name__}: {exc}"
            ) from exc
        first, n = int(wanted[0]) - lo, wanted.size
        contiguous = int(wanted[-1]) - int(wanted[0]) == n - 1 and np.all(np.diff(wanted) == 1)
        picked = block[first : first + n] if contiguous else block[wanted - lo]
        # Writes refuse NaN, so a NaN can only be the fill of a chunk never written: each (row, layer) is in one
        # chunk spanning every neuron, so neuron 0 of each tells, at a 1/width of the cost of a full scan.
        probe = picked[:, :, 0]
        if np.isnan(probe).any():
            bad = int(wanted[np.isnan(probe).any(axis=1)][0])
            raise RunFailure(
                f"missing data in {self.root}/acts chunk {bad // r}.{layers.start or 0}.0 "
                f"(row {bad}): the chunk is absent or holds NaN"
            )
        return picked

    def nbytes(self) -> int:
        try:
            return int(self.fs.du(self._path("acts")))
        except FileNotFoundError:
            return 0


class ActivationStore:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri
        self.storage_options = storage_options or {}
        self.fs, self.path = urimod.filesystem(uri, self.storage_options)

    def runs(self) -> list[str]:
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path + "/runs", detail=False))
        except FileNotFoundError:
            return []

    def load_meta(self, run: str) -> RunMeta | None:
        path = f"{self.path}/runs/{run}/run.json"
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - an outage is not damage: say which it is
            raise RunFailure(f"cannot read run metadata {path}: {type(exc).__name__}: {exc}") from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RunFailure(f"corrupt run metadata {path}: {type(exc).__name__}: {exc}") from exc
        meta = RunMeta(**integrity.run_meta_fields(data, path, RunMeta))
        if run_id(meta) != run:
            raise RunFailure(f"{path} was written for another model or capture: its values give run {run_id(meta)}")
        return meta

    def lease(self, run: str, **options: Any) -> Lease:
        """The lease a driver holds on `run` while it plans and captures (see cna_dist.store.lease)."""
        return Lease(f"{urimod.join(self.uri, 'runs', run)}/lease.json", self.storage_options, **options)

    def check_writable(self) -> None:
        if urimod.is_local(self.uri):
            return  # validate checked a local folder's permissions without creating it: bad input writes nothing
        probe = f"{self.path}/.write-probe"
        try:
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except (PermissionError, FileNotFoundError) as exc:  # no such bucket, no right to write: the input's fault
            raise BadInput(
                f"cannot write to the activation store: {type(exc).__name__}: {exc}",
                source=self.uri,
                field="output.store",
            ) from None
        except Exception as exc:  # noqa: BLE001 - an outage after every retry: a failure at run time, exit 1
            raise RunFailure(f"cannot write to the activation store {self.uri}: {type(exc).__name__}: {exc}") from exc

    def open_run(self, meta: RunMeta, create: bool = True) -> Run:
        """Open (or create) the run for `meta`; a run written for another model is refused by name."""
        import zarr
        from zarr.codecs import Crc32cCodec

        run = run_id(meta)
        existing = self.load_meta(run)
        if existing is not None:
            if existing.key() != meta.key() or (existing.n_layers, existing.intermediate_size) != (
                meta.n_layers,
                meta.intermediate_size,
            ):
                raise RunFailure(
                    f"{self.uri}/runs/{run}/run.json was written for another model or capture "
                    f"({existing.key()}), not {meta.key()}"
                )
            handle = Run(self.uri, run, existing, self.storage_options)
            integrity.check_array(existing, handle.array(mode="r"), f"{self.path}/runs/{run}/run.json")
            return handle
        if not create:
            raise RunFailure(f"no run {run} in {self.uri}")
        itemsize = np.dtype(meta.dtype).itemsize
        rows_per_chunk, layers_per_chunk, shard_rows = chunking(
            meta.n_layers, meta.intermediate_size, itemsize, meta.shard_rows or None
        )
        full = RunMeta(
            **{
                **asdict(meta),
                "rows_per_chunk": rows_per_chunk,
                "layers_per_chunk": layers_per_chunk,
                "shard_rows": shard_rows,
            }
        )
        handle = Run(self.uri, run, full, self.storage_options)
        # No run.json means no commit can exist yet (markers come after it): a leftover array is safe to replace.
        zarr.create_array(
            store=handle.root,
            name="acts",
            shape=(0, meta.n_layers, meta.intermediate_size),
            chunks=(rows_per_chunk, layers_per_chunk, meta.intermediate_size),
            dtype=meta.dtype,
            fill_value=np.nan,
            compressors=[Crc32cCodec()],
            attributes={integrity.ARRAY_ATTRIBUTE: asdict(full)},
            overwrite=True,
            storage_options=handle._zarr_options(),
        )
        self.fs.pipe_file(f"{self.path}/runs/{run}/run.json", json.dumps(asdict(full), indent=1).encode())
        return handle
