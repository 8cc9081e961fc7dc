"""Benchmark: the replica's store write path against plain writes of the same bytes, and whether compute waits.

Why: a 4-GPU 72B replica at 200 prompts/s produces about 0.95 GB/s of rows (80 x 29568 float16 = 4.7 MB each).
If the store cannot take them that fast the writer, not the GPUs, caps the replica. This script measures, in
one process, for each writer thread count:

- `store`: rows from memory through `Run.write_rows` + `Run.commit` (the replica's path) into a run of that shape,
  the shard planned beforehand, untimed (the driver plans; benchmarks/million.py times it);
- `plain`: the same bytes in the same chunk-sized objects, each chunk copied out once and written as a file (or
  PUT), the same number of threads: what any writer must at least do;
- `zarr` (once): the array's own `arr[rows] = values`, the path `write_rows` took before.

GB/s (wall) and CPU seconds per GB (this process: moto's server is a separate process) are medians of
`--repeats`, the methods alternating. Targets: local disk (`--dir`, a temporary folder by default) and S3 (moto's
server on 127.0.0.1, started here, as benchmarks/download.py does).

Then `idle`: a replica (cna_dist.runtime.replica.Replica, with CONCURRENCY calls in flight as the driver runs it,
against two) whose engine is a fixture emitting a shard's rows at a set rate (it sleeps as a
GPU computes: the host is free meanwhile) writes `--idle-shards` shards to local disk; the idle fraction is the
time the engine waited between shards (for a free call, i.e. for writes) over its compute time.

    python benchmarks/write.py [--rows 64] [--threads 1,2,4,8] [--targets local,s3] [--rate 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from download import start_moto  # benchmarks/download.py, beside this script

from cna_dist.prompts.batching import Limits
from cna_dist.runtime.replica import CONCURRENCY, Replica, ReplicaSpec
from cna_dist.store import chunks
from cna_dist.store.activations import ActivationStore, Run, RunMeta, WrittenPart, chunking


def meta(layers: int, width: int, shard_rows: int) -> RunMeta:
    return RunMeta(
        fingerprint=uuid.uuid4().hex * 2,  # a fresh run each time: nothing is skipped as already written
        model_uri="/bench",
        n_layers=layers,
        intermediate_size=width,
        dtype="float16",
        model_dtype="bfloat16",
        chat_template=True,
        shard_rows=shard_rows,
    )


def fresh(n: int) -> list[str]:
    """Row hashes never seen before (the store keys rows by the sha256 of their rendered prompt)."""
    return [uuid.uuid4().hex * 2 for _ in range(n)]


# A method: called untimed, it prepares one write (a store write's shard plan: the driver's work, not the
# replica's) and returns the write itself, which is timed.
Method = Callable[[], Callable[[], None]]


def timed(method: Method) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds, all threads) of one write, its preparation untimed."""
    write = method()
    wall, cpu = time.perf_counter(), time.process_time()
    write()
    return time.perf_counter() - wall, time.process_time() - cpu


def store_write(run: Run, acts: np.ndarray, threads: int) -> Method:
    """The replica's path: `write_rows` and `commit` of a shard the driver planned."""

    def prepare() -> Callable[[], None]:
        (plan,) = run.plan(fresh(len(acts)))
        run.write_threads = threads
        return lambda: run.commit(plan, [run.write_rows(plan, acts, slice(0, run.meta.n_layers))], writer="bench")

    return prepare


def zarr_write(run: Run, acts: np.ndarray) -> Method:
    def prepare() -> Callable[[], None]:
        (plan,) = run.plan(fresh(len(acts)))

        def write() -> None:
            run.array()[plan.start : plan.start + len(acts)] = acts
            run.commit(plan, [WrittenPart(plan.shard, 0, run.meta.n_layers, int(acts.nbytes))], writer="bench")

        return write

    return prepare


def plain_write(
    put_for: Callable[[], chunks.Put], acts: np.ndarray, chunk: tuple[int, int], threads: int, copy: bool = True
) -> Method:
    """Each chunk written as one object with no check and no checksum, the same number of threads: `copy`: copied
    out contiguous once and written (`plain`); else its rows written straight from the block with one writev
    (`plainv`, local disk only: what a writer that copies nothing does)."""
    rows, layers = chunk
    work = [(r, lo) for r in range(0, acts.shape[0], rows) for lo in range(0, acts.shape[1], layers)]

    def go() -> None:
        put = put_for()

        def one(item: tuple[int, int]) -> None:
            r, lo = item
            part = acts[r : r + rows, lo : lo + layers]
            put(f"{r // rows}.{lo // layers}", [np.ascontiguousarray(part)] if copy else list(part))

        with cf.ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, work))

    return lambda: go


def target(kind: str, folder: Path, fs: Any) -> tuple[str, Callable[[], chunks.Put], Callable[[], None], str]:
    """(store URI, a fresh plain-write destination per call, cleanup, the plain writes' folder): local disk or S3."""
    if kind == "local":
        uri = str(folder / "store")

        def local() -> chunks.Put:
            return chunks.local_put(str(folder / "plain" / uuid.uuid4().hex))

        return uri, local, lambda: shutil.rmtree(folder, ignore_errors=True), str(folder / "plain")
    prefix = f"cna/{uuid.uuid4().hex}"

    def remote() -> chunks.Put:
        return chunks.fs_put(fs, f"{prefix}/plain/{uuid.uuid4().hex}")

    return f"s3://{prefix}/store", remote, lambda: fs.rm(prefix, recursive=True), f"{prefix}/plain"


def clean(kind: str, run: Run, plain: str, fs: Any) -> None:
    """Remove what the last write left (its chunks, markers, plain objects) and, on local disk, flush to disk."""
    if kind == "local":
        for path in (plain, run._path("acts", "c"), run._path("commits")):
            shutil.rmtree(path, ignore_errors=True)
        os.sync()
        return
    for path in (plain, run._path("acts", "c"), run._path("commits")):
        if fs.exists(path):
            fs.rm(path, recursive=True)
    fs.invalidate_cache()
    run.fs.invalidate_cache()


def crc(parts: list[np.ndarray], extend: Callable[[int, Any], int]) -> None:
    """Each chunk's crc32c, chained row by row as the store hashes it."""
    for part in parts:
        value = 0
        for row in part:
            value = extend(value, row)


def store_crc(value: int, row: Any) -> int:
    return chunks.crc32c(row, value)


def checks(acts: np.ndarray, repeats: int) -> dict[str, float]:
    """Milliseconds per write for the store's two checks alone, over the same chunks as a write (no I/O): crc32c of
    every chunk's rows, on one thread and split over two, with the store's awscrt and with google-crc32c (zarr's);
    the NaN check, block by block as `chunks.pieces` runs it."""
    rows, layers, _ = chunking(acts.shape[1], acts.shape[2], acts.itemsize, len(acts))
    starts = [(r, lo) for r in range(0, len(acts), rows) for lo in range(0, acts.shape[1], layers)]
    parts = [acts[r : r + rows, lo : lo + layers] for r, lo in starts]
    step = max(1, chunks.BLOCK_BYTES // parts[0][0].nbytes)

    def two_threads(extend: Callable[[int, Any], int]) -> None:
        with cf.ThreadPoolExecutor(2) as pool:
            list(pool.map(crc, [parts[0::2], parts[1::2]], [extend, extend]))

    def nan() -> None:
        for part in parts:
            for lo in range(0, len(part), step):
                chunks.first_nan_row(part[lo : lo + step])

    steps = {
        "crc32c": lambda: crc(parts, store_crc),
        "crc32c 2 threads": lambda: two_threads(store_crc),
        "google-crc32c": lambda: crc(parts, google_crc32c.extend),
        "google-crc32c 2 threads": lambda: two_threads(google_crc32c.extend),
        "NaN check": nan,
    }
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_target(kind: str, acts: np.ndarray, args: argparse.Namespace, fs: Any) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    uri, put_for, cleanup, plain = target(kind, folder, fs)
    run = ActivationStore(uri).open_run(meta(acts.shape[1], acts.shape[2], len(acts)))
    chunk = (run.meta.rows_per_chunk, run.meta.layers_per_chunk)
    gb = acts.nbytes / 1e9
    results = []
    try:
        methods = {"zarr": zarr_write(run, acts)}
        for threads in args.threads:
            methods[f"store-{threads}"] = store_write(run, acts, threads)
            methods[f"plain-{threads}"] = plain_write(put_for, acts, chunk, threads)
            if kind == "local":
                methods[f"plainv-{threads}"] = plain_write(put_for, acts, chunk, threads, copy=False)
        for method in methods.values():  # warm-up: connections, folders
            method()()
            clean(kind, run, plain, fs)
        names = list(methods)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # the order rotated
                samples[name].append(timed(methods[name]))
                clean(kind, run, plain, fs)  # every write starts alike: nothing left over, nothing dirty
        for name, values in samples.items():
            wall = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            method, _, threads = name.partition("-")
            results.append(
                {
                    "target": kind,
                    "method": method,
                    "threads": int(threads or 0),
                    "gb_s": gb / wall,
                    "cpu_s_per_gb": cpu / gb,
                }
            )
    finally:
        cleanup()
    return results


class RateEngine:
    """A capture backend fixture: a shard's rows after rows / rate seconds of sleep, as a GPU computes them."""

    name = "rate-fixture"
    concurrent = False

    def __init__(self, rows: np.ndarray, rate: float):
        self.rows, self.rate = rows, rate

    def made_by(self) -> dict[str, str]:
        return {"backend": self.name}

    def capture_parts(self, token_ids: list, dtype: str, limits: Limits) -> tuple[list, int]:
        time.sleep(len(token_ids) / self.rate)
        return [(0, self.rows.shape[1], self.rows[: len(token_ids)])], 0

    def close(self) -> None:
        pass


def idle_fraction(acts: np.ndarray, args: argparse.Namespace, calls: int) -> dict[str, Any]:
    """A replica with `calls` calls in flight (the driver runs CONCURRENCY) writing `idle_shards` shards at `rate`
    rows/s."""
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        run = ActivationStore(str(folder / "store")).open_run(meta(acts.shape[1], acts.shape[2], len(acts)))
        run.write_threads = max(args.threads)
        replica = Replica(ReplicaSpec(model_uri="/bench"), engine=RateEngine(acts, args.rate))
        plans = run.plan(fresh(len(acts) * args.idle_shards))
        results = []
        lock = threading.Lock()

        def call(plan: Any) -> None:
            result = replica.capture_shard(run, plan, [[0]] * len(plan.hashes))
            with lock:
                results.append(result)

        start = time.perf_counter()
        with cf.ThreadPoolExecutor(calls) as pool:
            list(pool.map(call, plans))
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    compute = sum(r.compute_seconds for r in results)
    idle = sum(r.idle_seconds for r in results)
    rows = sum(r.rows for r in results)
    return {
        "calls": calls,
        "rate_rows_s": args.rate,
        "gb_s_offered": args.rate * acts[0].nbytes / 1e9,
        "shards": len(results),
        "achieved_rows_s": rows / wall,
        "idle_fraction": idle / (compute + idle),
        "write_s_median": statistics.median(r.write_seconds for r in results),
        "compute_s_median": statistics.median(r.compute_seconds for r in results),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """Store against plain writes (copy, then write) and, locally, against plainv (no copy: rows written in place)."""
    print(
        f"{'target':<6} {'threads':>7} {'store GB/s':>10} {'plain GB/s':>10} {'ratio':>6} "
        f"{'store CPU s/GB':>14} {'plain CPU s/GB':>14} {'CPU ratio':>9} {'plainv GB/s':>11} {'ratio':>6} "
        f"{'CPU ratio':>9}"
    )
    by = {(r["target"], r["method"], r["threads"]): r for r in rows}
    for (kind, method, threads), store in by.items():
        if method != "store":
            continue
        text = f"{kind:<6} {threads:>7} {store['gb_s']:>10.2f}"
        for name in ("plain", "plainv"):
            plain = by.get((kind, name, threads))
            if plain is None:
                continue
            ratio, cpu = store["gb_s"] / plain["gb_s"], store["cpu_s_per_gb"] / plain["cpu_s_per_gb"]
            if name == "plain":
                text += f" {plain['gb_s']:>10.2f} {ratio:>6.2f} {store['cpu_s_per_gb']:>14.2f}"
                text += f" {plain['cpu_s_per_gb']:>14.2f} {cpu:>9.2f}"
            else:
                text += f" {plain['gb_s']:>11.2f} {ratio:>6.2f} {cpu:>9.2f}"
        print(text)
    for (kind, method, _), r in by.items():
        if method == "zarr":
            print(f"{kind:<6} zarr's own arr[rows] = values: {r['gb_s']:.2f} GB/s, {r['cpu_s_per_gb']:.2f} CPU s/GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows per write (one shard)")
    parser.add_argument("--s3-rows", type=int, default=16, help="rows per write to S3 (moto holds objects in memory)")
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--width", type=int, default=29568)
    parser.add_argument("--threads", default="1,2,4,8", help="writer thread counts")
    parser.add_argument("--targets", default="local,s3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="rows/s the engine fixture emits")
    parser.add_argument("--idle-shards", type=int, default=12)
    parser.add_argument("--calls", default=f"2,{CONCURRENCY}", help="calls in flight on the idle replica, compared")
    parser.add_argument("--idle-runs", type=int, default=3, help="idle runs per calls-in-flight count (median)")
    parser.add_argument("--dir", default=None, help="local folder to write in (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    args.calls = [int(c) for c in args.calls.split(",")]
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((args.rows, args.layers, args.width), dtype=np.float32).astype(np.float16)
    s3_rows = min(args.s3_rows, args.rows)
    print(
        f"rows {args.rows} x {args.layers} x {args.width} float16 = {acts.nbytes / 1e9:.2f} GB per local write, "
        f"{s3_rows} rows = {acts[:s3_rows].nbytes / 1e9:.2f} GB per S3 write; {os.cpu_count()} CPUs; "
        f"medians of {args.repeats}"
    )
    results: list[dict[str, Any]] = []
    moto: subprocess.Popen | None = None
    try:
        for kind in [t for t in args.targets.split(",") if t]:
            fs = None
            if kind == "s3":
                import s3fs

                moto, endpoint = start_moto()
                fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
                fs.mkdir("cna")
            data = acts if kind == "local" else acts[: args.s3_rows]
            results += measure_target(kind, data, args, fs)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait()
    print_table(results)
    parts = checks(acts, args.repeats)
    print(
        f"checks alone, ms per {acts.nbytes / 1e9:.2f} GB write (no I/O, medians of {args.repeats}): "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in parts.items())
    )
    idle = [  # the calls-in-flight counts alternate, so load on the machine falls on each alike
        idle_fraction(acts[: min(len(acts), 32)], args, calls) for _ in range(args.idle_runs) for calls in args.calls
    ]
    for calls in args.calls:
        runs = [r for r in idle if r["calls"] == calls]
        r = runs[0]
        fractions = sorted(x["idle_fraction"] for x in runs)
        print(
            f"idle: {calls} calls in flight, engine fixture at {r['rate_rows_s']:.0f} rows/s "
            f"({r['gb_s_offered']:.2f} GB/s offered), {r['shards']} shards of {min(len(acts), 32)} rows into "
            f"{args.dir or 'a temporary folder'}, "
            f"writer threads {max(args.threads)}: achieved rows/s {sorted(round(x['achieved_rows_s']) for x in runs)}, "
            f"idle fraction median {statistics.median(fractions):.3f} of {[round(x, 3) for x in fractions]} "
            f"(median write {statistics.median(x['write_s_median'] for x in runs):.2f} s vs compute "
            f"{statistics.median(x['compute_s_median'] for x in runs):.2f} s per shard)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"writes": results, "checks_ms": parts, "idle": idle}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
