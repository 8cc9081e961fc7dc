"""Benchmark: a million prompts through the real driver, scheduler, store and reduce, with simulated replicas.

Why: at N prompts the driver plans N / shard_rows shards, schedules them over the replicas, reads their commit
markers and indexes every row before the reduce. Anything in there that grows faster than N (every marker read at
every plan, a per-row object per step) would make a nightly million-prompt job slow in the driver, not on the
GPUs. This script runs the driver's own code, in this process:

- `Run.plan` (lists and reads the commit markers, grows the array),
- `capture_shards` (the retrying scheduler over a pool of R replicas, two calls in flight each, as on Ray), where
  every replica is the real `Replica` class, its engine a fixture that emits tiny rows (`--layers` x `--width`
  float16) at `--rate` rows/s per replica (it sleeps as a GPU computes) and its writes go through the real store,
- the re-run plan and the count of reused shards (as `cna-dist mine` does), `Run.row_index`, and
- `streamed.reduce_store` (means, universal counts, top-k) over all N rows, in process,

for each N and R, on local disk and on S3 (moto's server on 127.0.0.1). It prints, per shard and per prompt: the
driver thread's CPU seconds (time.thread_time of the thread running plan and scheduler: the replicas are other
threads), the objects listed and read by a plan, the driver's peak memory (VmHWM over the run; the replicas'
tiny rows included), and the reduce's wall time.

    python benchmarks/million.py [--n 10000,100000,1000000] [--replicas 16,64] [--s3-n 10000,100000] [--ids dict]
                                 [--writes none]

The driver holds the prompts' token ids packed (cna_dist.prompts.packed) and gathers a shard's by the plan's
positions, as `cna-dist mine` does; `--ids dict` runs a driver that keeps a dict of every prompt's id list instead.
`--writes none` gives replicas that write nothing (and skips the re-plan and the reduce): the driver's own cost
without the simulated replicas' writes running in its process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Hashable
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
from download import start_moto  # benchmarks/download.py, beside this script

from cna_dist.prompts.batching import Limits
from cna_dist.prompts.packed import PackedIds
from cna_dist.reduce import streamed
from cna_dist.runtime.calls import capture_shards
from cna_dist.runtime.pool import Finished, LocalActor, LocalPool
from cna_dist.runtime.replica import CONCURRENCY, Replica, ReplicaSpec, ShardResult
from cna_dist.runtime.scheduler import Settings
from cna_dist.store.activations import ActivationStore, Run, RunMeta


class TinyRows:
    """A capture backend fixture: rows of a shard after rows / rate seconds of sleep (a GPU computing)."""

    name = "tiny-rows-fixture"
    concurrent = False

    def __init__(self, layers: int, width: int, rate: float):
        self.layers, self.width, self.rate = layers, width, rate

    def made_by(self) -> dict[str, str]:
        return {"backend": self.name}

    def capture_parts(self, token_ids: list, dtype: str, limits: Limits) -> tuple[list, int]:
        time.sleep(len(token_ids) / self.rate)
        seed = int(token_ids[0][0]) if token_ids and token_ids[0] else 0
        acts = np.random.default_rng(seed).standard_normal((len(token_ids), self.layers, self.width), np.float32)
        return [(0, self.layers, acts.astype(np.float16))], 0

    def close(self) -> None:
        pass


class Unwritten(Replica):
    """`--writes none`: a replica that unpacks a shard's ids and sleeps as long as TinyRows would, one shard at a time
    under the replica's compute lock as `Replica.capture_shard` computes, writing nothing.

    Why: the simulated replicas are threads of the driver's process (on Ray they are other processes); with
    writes, up to 3R of them encode and PUT at once beside the driver thread. Without, the driver's CPU per shard
    is its own code's alone: the plan, the scheduler, gathering ids, the results.
    """

    def capture_shard(self, run: Run, plan: Any, token_ids: Any) -> ShardResult:
        rows = token_ids.to_lists() if isinstance(token_ids, PackedIds) else token_ids
        with self._compute_lock:  # the same pace as a writing replica: its compute is one shard at a time
            time.sleep(len(rows) / self.engine.rate)
        return ShardResult(plan.shard, self.name, len(rows), 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)


class SimPool(LocalPool):
    """R in-process replicas with Ray's call shape (LocalActor), never lost: the scheduler's `Pool`. Waiting and
    results are LocalPool's (futures); only the number of replicas differs."""

    def __init__(self, replicas: list[Replica]):
        self.finished = Finished()
        self.actors = [LocalActor(r, CONCURRENCY, self.finished) for r in replicas]

    def __len__(self) -> int:
        return len(self.actors)

    def replica(self, r: int) -> LocalActor:
        return self.actors[r]

    def probe(self, r: int) -> Hashable:
        return self.actors[r].pid.remote()

    def close(self) -> None:
        for actor in self.actors:
            actor.close()


class SimExecutor:
    """The executor `capture_shards` drives: the simulated pool, the scheduler's default settings."""

    def __init__(self, pool: SimPool):
        self.pool, self.settings, self.on_shard = pool, Settings(), None

    def replicas(self, spec: ReplicaSpec) -> SimPool:
        return self.pool

    def release_replicas(self) -> None:
        pass


class Counting:
    """Counts the listings and reads a run's filesystem serves (wraps `ls` and `cat_file`)."""

    def __init__(self, run: Run):
        self.listed = self.read = 0
        ls, cat = run.fs.ls, run.fs.cat_file

        def counted_ls(path: str, *args: Any, **kwargs: Any) -> Any:
            self.listed += 1
            return ls(path, *args, **kwargs)

        def counted_cat(path: str, *args: Any, **kwargs: Any) -> Any:
            self.read += 1
            return cat(path, *args, **kwargs)

        run.fs.ls, run.fs.cat_file = counted_ls, counted_cat

    def take(self) -> tuple[int, int]:
        out = (self.listed, self.read)
        self.listed = self.read = 0
        return out


def status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here on


def measure(where: str, uri: str, n: int, replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    reset_peak()
    base = status_bytes("VmRSS")  # after imports
    meta = RunMeta(
        fingerprint=hashlib.sha256(f"{uri}{n}{replicas}".encode()).hexdigest(),
        model_uri="/sim",
        n_layers=args.layers,
        intermediate_size=args.width,
        dtype="float16",
        model_dtype="bfloat16",
        chat_template=True,
        shard_rows=args.shard_rows,
    )
    run = ActivationStore(uri).open_run(meta)
    counts = Counting(run)
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    # the prompts' token ids as the driver holds them: packed (three ids a prompt), indexed by the plans' positions
    ids = np.stack([np.arange(n), np.ones(n, np.int64), np.full(n, 2, np.int64)], axis=1)
    token_ids: PackedIds | dict[str, list[int]] = PackedIds(ids.ravel(), np.arange(n + 1, dtype=np.int64) * 3)
    if args.ids == "dict":  # the dict driver: every prompt's id list in a dict, a lookup per row
        token_ids = {h: [i, 1, 2] for i, h in enumerate(hashes)}
    spec = ReplicaSpec(model_uri="/sim")
    replica = Replica if args.writes == "store" else Unwritten
    pool = SimPool([replica(spec, engine=TinyRows(args.layers, args.width, args.rate)) for _ in range(replicas)])
    cpu, wall = time.thread_time(), time.perf_counter()
    plans = run.plan(hashes)
    plan_cpu, plan_io = time.thread_time() - cpu, counts.take()
    report = capture_shards(SimExecutor(pool), spec, run, plans, token_ids, progress=False)
    capture_cpu, capture_wall = time.thread_time() - cpu, time.perf_counter() - wall
    counts.take()
    pool.close()
    replan_cpu, replan_io, reduce_s = 0.0, (0, 0), 0.0
    if args.writes == "store":  # then as `cna-dist mine` goes on: count the reused shards, index rows for the reduce
        cpu = time.thread_time()
        again = run.plan(hashes)
        reused = len(run.committed())
        index = run.row_index()
        replan_cpu, replan_io = time.thread_time() - cpu, counts.take()
        assert not again and reused == len(plans), (len(again), reused, len(plans))
        half = n // 2
        rows = {
            "positive": np.array([index[h] for h in hashes[:half]], dtype=np.int64),
            "negative": np.array([index[h] for h in hashes[half:]], dtype=np.int64),
            "diverse": np.array([index[h] for h in hashes[: max(1, n // 10)]], dtype=np.int64),
        }
        start = time.perf_counter()
        streamed.reduce_store(
            run,
            rows,
            k=8,
            exclude_layers=[],
            universal_fraction=0.01,
            universal_threshold=0.8,
            universal_scope="global",
        )
        reduce_s = time.perf_counter() - start
    shards = len(plans)
    return {
        "where": where,
        "n": n,
        "replicas": replicas,
        "shards": shards,
        "capture_wall_s": capture_wall,
        "driver_cpu_ms_per_shard": 1e3 * capture_cpu / shards,
        "driver_cpu_us_per_prompt": 1e6 * capture_cpu / n,
        "plan_cpu_us_per_prompt": 1e6 * plan_cpu / n,  # the first plan alone: part of the driver's CPU
        "schedule_cpu_ms_per_shard": 1e3 * (capture_cpu - plan_cpu) / shards,  # capture_shards: the rest of it
        "first_plan_listed_per_shard": plan_io[0] / shards,
        "first_plan_read_per_shard": plan_io[1] / shards,
        "replan_listed": replan_io[0],  # the re-plan, the reused count and the row index together
        "replan_read": replan_io[1],
        "replan_cpu_us_per_prompt": 1e6 * replan_cpu / n,
        "driver_peak_mb": (status_bytes("VmHWM") - base) / 1e6,
        "driver_peak_bytes_per_prompt": (status_bytes("VmHWM") - base) / n,
        "reduce_s": reduce_s,
        "reduce_us_per_prompt": 1e6 * reduce_s / n,
        "retries": report.retries,
    }


HEADER = (
    f"{'where':<6} {'N':>8} {'R':>3} {'shards':>6} {'wall s':>7} {'drv ms/shard':>12} {'drv us/prompt':>13} "
    f"{'plan us/prompt':>14} {'sched ms/shard':>14} "
    f"{'plan ls+read/shard':>18} {'re-plan ls/read':>15} {'peak MB':>8} {'B/prompt':>8} {'reduce s':>8} "
    f"{'reduce us/prompt':>16}"
)


def line(r: dict[str, Any]) -> str:
    io = f"{r['first_plan_listed_per_shard']:.3f}+{r['first_plan_read_per_shard']:.3f}"
    return (
        f"{r['where']:<6} {r['n']:>8} {r['replicas']:>3} {r['shards']:>6} {r['capture_wall_s']:>7.1f} "
        f"{r['driver_cpu_ms_per_shard']:>12.2f} {r['driver_cpu_us_per_prompt']:>13.1f} "
        f"{r['plan_cpu_us_per_prompt']:>14.2f} {r['schedule_cpu_ms_per_shard']:>14.2f} {io:>18} "
        f"{r['replan_listed']:>7}/{r['replan_read']:<7} {r['driver_peak_mb']:>8.0f} "
        f"{r['driver_peak_bytes_per_prompt']:>8.0f} {r['reduce_s']:>8.1f} {r['reduce_us_per_prompt']:>16.1f}"
    )


def flatness(rows: list[dict[str, Any]]) -> list[str]:
    """Per-prompt figures at the largest N over the smallest, per target and replica count."""
    out = []
    keys = (
        "driver_cpu_us_per_prompt",
        "plan_cpu_us_per_prompt",
        "schedule_cpu_ms_per_shard",
        "driver_peak_bytes_per_prompt",
        "reduce_us_per_prompt",
    )
    for where, replicas in sorted({(r["where"], r["replicas"]) for r in rows}):
        group = sorted((r for r in rows if r["where"] == where and r["replicas"] == replicas), key=lambda r: r["n"])
        if len(group) < 2:
            continue
        lo, hi = group[0], group[-1]
        ratios = ", ".join(f"{k} x{hi[k] / lo[k]:.2f}" for k in keys if lo[k] > 0)
        out.append(f"{where} R={replicas}: N {lo['n']} -> {hi['n']}: {ratios}")
    return out


def cases(targets: list[tuple[str, int]], args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(where, N, R, run) for every case, the runs of all cases interleaved so load on the machine falls alike."""
    replicas = [int(r) for r in args.replicas.split(",")]
    return [(where, n, r, attempt) for attempt in range(args.runs) for where, n in targets for r in replicas]


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (where, N, R): the median of every figure over the runs."""
    out = []
    for key in dict.fromkeys((r["where"], r["n"], r["replicas"]) for r in rows):
        group = [r for r in rows if (r["where"], r["n"], r["replicas"]) == key]
        row: dict[str, Any] = {}
        for k, v in group[0].items():
            values = [g[k] for g in group]  # whole numbers (counts) stay whole: the lower median
            row[k] = (
                v if isinstance(v, str) else statistics.median_low(values) if isinstance(v, int) else median(values)
            )
        out.append(row)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="10000,100000,1000000", help="prompt counts on local disk")
    parser.add_argument("--s3-n", default="10000,100000", help="prompt counts on S3 (moto); empty: none")
    parser.add_argument("--replicas", default="16,64")
    parser.add_argument("--rate", type=float, default=2000.0, help="rows/s each simulated replica emits")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--shard-rows", type=int, default=256, help="rows per shard (the store's default at 72B)")
    parser.add_argument("--runs", type=int, default=1, help="runs of every case; medians printed after")
    parser.add_argument("--ids", choices=("packed", "dict"), default="packed", help="how the driver holds token ids")
    parser.add_argument(
        "--writes",
        choices=("store", "none"),
        default="store",
        help="store: replicas write and commit through the store; none: they write nothing (no re-plan, no reduce)",
    )
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # WHERE,N,R,URI: one case, in this process
    return parser.parse_args()


def one_case(args: argparse.Namespace) -> None:
    """Each case runs in a fresh process, so its peak memory is its own."""
    where, n, replicas, uri = args.one.split(",", 3)
    print(json.dumps(measure(where, uri, int(n), int(replicas), args)))


def main() -> None:
    args = parse_args()
    if args.one:
        return one_case(args)
    targets = [("local", int(n)) for n in args.n.split(",") if n] + [("s3", int(n)) for n in args.s3_n.split(",") if n]
    passed = ["--rate", str(args.rate), "--layers", str(args.layers), "--width", str(args.width)]
    passed += ["--shard-rows", str(args.shard_rows), "--ids", args.ids, "--writes", args.writes]
    rows: list[dict[str, Any]] = []
    moto: subprocess.Popen | None = None
    print(HEADER)
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            for where, n, replicas, attempt in cases(targets, args):
                if where == "s3" and moto is None:
                    moto, endpoint = start_moto()
                    import s3fs

                    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("cna")
                name = f"{n}-{replicas}-{attempt}"
                uri = f"{tmp}/{name}" if where == "local" else f"s3://cna/million-{name}"
                case = [sys.executable, __file__, "--one", f"{where},{n},{replicas},{uri}", *passed]
                out = subprocess.run(case, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(line(rows[-1]), flush=True)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait()
    if args.runs > 1:
        rows = medians(rows)
        print(f"medians of {args.runs} runs:\n{HEADER}")
        for row in rows:
            print(line(row))
    for text in flatness(rows):
        print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
