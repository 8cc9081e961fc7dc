"""Benchmark: the streamed reduce against a plain read of the same chunks, and its peak memory per task.

Why: spec §4 says a reduce must stream, with memory bounded by a few chunks per task and never by store size. This
script writes a synthetic float16 store (random activations of a 7B-like width, a few planted universal and
contrastive neurons) straight through ``Run.write_rows`` and ``Run.commit``, sized to at least 10x the per-task
memory budget, then:

* times, in this process and alternating, a plain read of every chunk as the reduce reads it (``Run.read_blocks``:
  the bytes and their checksum, nothing computed), a read of every chunk through zarr, and the whole
  ``reduce_store`` (moments, global-scope universal counting over a diverse set, top-k), one core each; it reports
  GB/s of store bytes and the ratios reduce / plain read and reduce / zarr read (medians of ``--repeats``; pages
  are cached after the write, so all measure decode + compute, not disk); and the same reduce reading through
  zarr (``Run.direct_reads`` off), for the gain of reading chunk objects straight;
* runs the reduce once more with every task (``block_moments``, ``group_top_counts``) in a
  fresh spawned process and reports each task's peak RSS increase: VmHWM after the step minus VmRSS before it,
  with VmHWM reset through /proc/self/clear_refs first, and its tracemalloc peak. RSS is what a worker pays: it
  also sees the allocator's cache of freed buffers; tracemalloc (numpy reports its buffers to it) is what the step
  holds live. Both are checked, against B and L below. ``ru_maxrss`` is not used: after fork+exec it can carry the
  parent's peak. The baseline is taken after the imports and a tiny zarr round trip, so lazily loaded codecs count
  as imports, not as the step;
* measures the driver (the merges in ``reduce_store``) with tracemalloc in this process during that run: its RSS
  would mix in freed buffers of the timing passes.

Budgets (C = chunk bytes, A = one float64 [layer block, neurons] array, T = a top-set task's running top
[prompts, n] in int64 keys + int64 ids, R = the most rows one task is given, M = one float64 [layers, neurons]
array, P = diverse prompts):

    live      L = 8 C + 4 A + T + 64 B x R   checked against each task's tracemalloc peak. Read path
                                             (store.read_blocks): the chunk the step works on, the next one already
                                             read, and the one after in the reader thread (through zarr: raw
                                             bytes, checksum-stripped copy and output; read straight into the
                                             block, as the store reads its own layout: the block only) (5 C); a
                                             float16 chunk widened to float32 for the sums (2 C); the step's
                                             accumulators and float64 temporaries of one row; row ids, their sort
                                             and labels (the only per-row state).
    per task  B = L + 6 C + 8 MiB            checked against each task's peak RSS. glibc keeps freed buffers for
                                             reuse: up to 2 C (its dynamic trim threshold) in each of the arenas of the
                                             main, event-loop and codec threads; 8 MiB for thread stacks, the
                                             interpreter and tracemalloc's own tables (measured 3 to 5 MiB).
    driver    D = 6 M + C + 32 B x P + 4 MiB the folds in reduce_store: mean_pos, mean_neg, delta, the universal
                                             counts and mask, a few tasks' results as the mapper yields them (block
                                             sums; a group's (id, count) pairs, at most T), row ids, their order and
                                             group per diverse prompt, the mapper's messages.

Only the 64 B x R and 32 B x P terms grow with the store: bytes per 0.7 MB row here, per 4.7 MB row at 72B scale.
Exit status: 0 when every task and the driver stay within budget, 1 when one does not (FAIL lines say which), 2 for
bad arguments.

Run from the repository root:

    .venv/bin/python benchmarks/reduce.py [--layers 32] [--width 11008] [--repeats 3] [--store DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import hashlib
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cna_dist.reduce import cna as r
from cna_dist.reduce import streamed
from cna_dist.store.activations import ActivationStore, Run, RunMeta

MiB = 1 << 20
TASK_FIXED = 8 * MiB
DRIVER_FIXED = 4 * MiB
SETS = ("positive", "negative", "diverse")


# -- the store ------------------------------------------------------------------------------------------------
def row_hashes(name: str, n: int, seed: int) -> list[str]:
    return [hashlib.sha256(f"bench-{seed}-{name}-{i}".encode()).hexdigest() for i in range(n)]


def open_run(store: str, layers: int, width: int) -> Run:
    meta = RunMeta(
        fingerprint=hashlib.sha256(f"bench-{layers}x{width}".encode()).hexdigest(),
        model_uri="synthetic",
        n_layers=layers,
        intermediate_size=width,
        dtype="float16",
        model_dtype="bfloat16",
        chat_template=True,
    )
    return ActivationStore(store).open_run(meta)


def planted(layers: int, width: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Neurons every prompt fires hard (universal) and neurons only the positive set shifts (the circuit)."""
    universal = [(layers // 2, 7), (layers - 1, width // 3)]
    contrastive = [(min(layers - 1, 2 + i % max(1, layers - 2)), (101 * i) % width) for i in range(8)]
    return universal, contrastive


def fill_store(run: Run, sets: dict[str, list[str]], seed: int) -> int:
    """Write every uncommitted shard: float16 N(0, 1) activations plus the planted neurons. Returns rows written."""
    meta = run.meta
    universal, contrastive = planted(meta.n_layers, meta.intermediate_size)
    positive = set(sets["positive"])
    written = 0
    for plan in run.plan([h for name in SETS for h in sets[name]]):
        rng = np.random.default_rng([seed, plan.shard])
        acts = rng.standard_normal((len(plan.hashes), meta.n_layers, meta.intermediate_size), dtype=np.float32)
        is_pos = np.array([h in positive for h in plan.hashes])
        for i, (layer, neuron) in enumerate(universal):
            acts[:, layer, neuron] += 40.0 - 10.0 * i
        acts[is_pos, universal[0][0], universal[0][1]] += 6.0  # universal, yet contrastive: filtered out, displaced
        for i, (layer, neuron) in enumerate(contrastive):
            acts[is_pos, layer, neuron] += 4.0 + i
        run.commit(plan, [run.write_rows(plan, acts.astype(np.float16), slice(0, meta.n_layers))], writer="bench")
        written += len(plan.hashes)
    return written


# -- budgets --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    chunk: int
    block_f64: int
    running_top: int
    rows_per_task: int
    model_f64: int
    n_diverse: int

    @property
    def live(self) -> int:
        return 8 * self.chunk + 4 * self.block_f64 + self.running_top + 64 * self.rows_per_task

    @property
    def task(self) -> int:
        return self.live + 6 * self.chunk + TASK_FIXED

    @property
    def driver(self) -> int:
        return 6 * self.model_f64 + self.chunk + 32 * self.n_diverse + DRIVER_FIXED


def budget(meta: RunMeta, n: int, cap: int, sizes: dict[str, int]) -> Budget:
    width = meta.intermediate_size
    chunk = meta.rows_per_chunk * meta.layers_per_chunk * width * np.dtype(meta.dtype).itemsize
    return Budget(
        chunk=chunk,
        block_f64=meta.layers_per_chunk * width * 8,
        running_top=cap * n * 16,
        rows_per_task=max(sizes["positive"] + sizes["negative"], sizes["diverse"]),
        model_f64=meta.n_layers * width * 8,
        n_diverse=sizes["diverse"],
    )


def set_sizes(n_rows: int) -> dict[str, int]:
    return {name: n_rows // 3 + (i < n_rows % 3) for i, name in enumerate(SETS)}


def row_bytes(meta: RunMeta) -> int:
    return meta.n_layers * meta.intermediate_size * np.dtype(meta.dtype).itemsize


def rows_for(multiple: float, meta: RunMeta, n: int, cap: int) -> int:
    """Fewest rows, a whole number of row chunks per prompt set, making the store `multiple` x the task budget."""
    step = len(SETS) * meta.rows_per_chunk
    n_rows = step
    while n_rows * row_bytes(meta) < multiple * budget(meta, n, cap, set_sizes(n_rows)).task:
        n_rows += step
    return n_rows


# -- timing ---------------------------------------------------------------------------------------------------
def plain_read(run: Run, n_rows: int) -> int:
    """Every chunk read as the reduce reads it, its checksum checked, nothing computed: the floor any reduce of this
    store pays (through zarr when `run.direct_reads` is off). Returns bytes."""
    blocks = streamed.layer_blocks(run.meta.n_layers, run.meta.layers_per_chunk)
    return sum(acts.nbytes for _, _, acts in run.read_blocks(np.arange(n_rows), blocks))


def reduce_kwargs(meta: RunMeta, fraction: float) -> dict[str, Any]:
    return {
        "k": r.n_top(0.001, meta.n_layers * meta.intermediate_size),
        "exclude_layers": [0, 1],
        "universal_fraction": fraction,
        "universal_threshold": 0.8,
        "universal_scope": "global",
    }


def run_reduce(
    run: Run, rows: dict[str, np.ndarray], kwargs: dict[str, Any], mapper: streamed.Mapper = streamed.local_map
) -> r.Reduction:
    return streamed.reduce_store(run, rows, mapper=mapper, **kwargs)


def time_all(run: Run, rows: dict[str, np.ndarray], kwargs: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """The reads and the reduce alternate, so drift in the machine hits each alike; one warm-up of each first."""
    n_rows = sum(v.size for v in rows.values())
    through_zarr = copy.copy(run)
    through_zarr.direct_reads = False
    steps: dict[str, Callable[[], Any]] = {
        "plain": lambda: plain_read(run, n_rows),
        "zarr": lambda: plain_read(through_zarr, n_rows),
        "reduce": lambda: run_reduce(run, rows, kwargs),
        "reduce_zarr": lambda: run_reduce(through_zarr, rows, kwargs),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(repeats + 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if repeat:
                times[name].append(time.perf_counter() - t0)
    return times


# -- memory ---------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Without it the peak may include the imports (overstated)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def one_thread() -> None:
    """Torch as a Ray reduce task runs it: Ray gives a task one CPU and sets OMP_NUM_THREADS=1. Left at two threads,
    the float16 widening's OpenMP workers spin against the chunk reader thread."""
    import torch

    torch.set_num_threads(1)


def _warm_child() -> None:
    """Imports and a tiny zarr round trip with the store's codecs, so that lazy loading is not charged to a step.

    torch too: the moments step widens float16 chunks with it.
    """
    import torch
    import zarr
    from zarr.codecs import Crc32cCodec

    a = zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=(4, 4),
        chunks=(2, 4),
        dtype="float16",
        fill_value=np.nan,
        compressors=[Crc32cCodec()],
    )
    a[:] = np.ones((4, 4), np.float16)
    np.asarray(a[:2, 1:3])
    torch.zeros(4).copy_(torch.ones(4, dtype=torch.float16))
    one_thread()


def _measured(fn: Callable[..., Any], args: tuple) -> tuple[Any, dict[str, Any]]:
    """Run one step in this (fresh) process and report its peak RSS increase and tracemalloc peak."""
    tracemalloc.start()
    reset = _reset_peak()
    base = _status_kb("VmRSS")
    tracemalloc.reset_peak()
    out = fn(*args)
    traced = tracemalloc.get_traced_memory()[1]
    peak = _status_kb("VmHWM")
    tracemalloc.stop()
    return out, {"rss": peak - base, "traced": traced, "reset": reset, "base": base}


@dataclass
class SubprocessMapper:
    """A mapper (as the Ray driver's) that runs each task in a fresh spawned process and keeps its memory figures."""

    workers: int
    stats: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterator[Any]:
        """Results yielded in order as the driver folds them, as the Ray executor's map does."""
        ctx = multiprocessing.get_context("spawn")
        step = fn.__name__.lstrip("_").replace("moments_task", "block_moments")
        with cf.ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_warm_child, max_tasks_per_child=1
        ) as pool:
            for i, (out, st) in enumerate(pool.map(_measured, [fn] * len(args), args)):
                self.stats.append({"step": step, "task": i, **st})
                yield out


def measure_memory(
    run: Run, rows: dict[str, np.ndarray], kwargs: dict[str, Any], workers: int
) -> tuple[SubprocessMapper, int, r.Reduction]:
    mapper = SubprocessMapper(workers)
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    result = run_reduce(run, rows, kwargs, mapper)
    driver = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return mapper, driver, result


# -- report ---------------------------------------------------------------------------------------------------
def mb(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def check(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B: 32)")
    p.add_argument("--width", type=int, default=11008, help="intermediate_size (Llama-2-7B: 11008)")
    p.add_argument("--rows", type=int, default=0, help="prompts in the store, split in 3 sets (0: 10x the budget)")
    p.add_argument("--multiple", type=float, default=10.0, help="store size / per-task budget when --rows is 0")
    p.add_argument("--fraction", type=float, default=0.001, help="universal.top_fraction")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (medians are quoted)")
    p.add_argument("--workers", type=int, default=2, help="processes for the memory run")
    p.add_argument(
        "--store",
        default="",
        help="store folder or URL (default: a temporary folder, removed after); "
        "an existing store is reused, only missing shards are written",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.layers, args.width, args.repeats, args.workers) < 1 or args.rows < 0:
        p.error("--layers, --width, --repeats and --workers must be >= 1, --rows >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one_thread()
    with tempfile.TemporaryDirectory(prefix="cna-bench-reduce-") as tmp:
        return bench(args, args.store or str(Path(tmp) / "store"))


def bench(args: argparse.Namespace, store: str) -> int:
    run = open_run(store, args.layers, args.width)
    meta = run.meta
    n = r.n_top(args.fraction, meta.n_layers * meta.intermediate_size)
    cap = streamed.group_cap(run, n)
    n_rows = args.rows or rows_for(args.multiple, meta, n, cap)
    sizes = set_sizes(n_rows)
    sets = {name: row_hashes(name, sizes[name], args.seed) for name in SETS}
    t0 = time.perf_counter()
    written = fill_store(run, sets, args.seed)
    write_s = time.perf_counter() - t0
    index = run.row_index()
    rows = {name: np.array([index[h] for h in sets[name]], dtype=np.int64) for name in SETS}
    b = budget(meta, n, cap, sizes)
    store_bytes = n_rows * row_bytes(meta)
    kwargs = reduce_kwargs(meta, args.fraction)
    print(f"store: {store} ({written} rows written in {write_s:.1f} s, {n_rows - written} reused)")
    print(
        f"shape: {n_rows} rows ({', '.join(f'{k} {v}' for k, v in sizes.items())}) x {meta.n_layers} layers x "
        f"{meta.intermediate_size} neurons, float16; chunks {meta.rows_per_chunk} rows x {meta.layers_per_chunk} "
        f"layers = {mb(b.chunk)}; on disk {mb(run.nbytes())}"
    )
    print(f"reduce: k={kwargs['k']}, universal global top n={n} per prompt, threshold tasks of <= {cap} prompts")
    print_budgets(b)
    multiple = store_bytes / b.task
    print(
        f"store size: {mb(store_bytes)} = {multiple:.1f} x per-task budget "
        f"({'>= 10x' if multiple >= 10 else 'WARN: under 10x, raise --rows or leave it 0'})"
    )

    times = time_all(run, rows, kwargs, args.repeats)
    speed = report_speed(times, store_bytes)
    mapper, driver, result = measure_memory(run, rows, kwargs, args.workers)
    failures = report_memory(mapper, driver, b)
    universal = [] if result.universal is None else np.argwhere(result.universal).tolist()
    print(f"result: {len(result.selected)} neurons selected, universal {universal}, {len(result.displaced)} displaced")
    print_summary(args, meta, n_rows, store_bytes, multiple, b, speed, mapper, driver)
    return 1 if failures else 0


def print_budgets(b: Budget) -> None:
    print(
        f"budget live per task: 8 x chunk {mb(b.chunk)} + 4 x block f64 {mb(b.block_f64)} + running top "
        f"{mb(b.running_top)} + 64 B x {b.rows_per_task} rows = {mb(b.live)}"
    )
    print(f"budget RSS per task: live {mb(b.live)} + 6 x chunk (allocator cache) + {mb(TASK_FIXED)} = {mb(b.task)}")
    print(
        f"budget driver: 6 x [layers, neurons] f64 {mb(b.model_f64)} + chunk + 32 B x {b.n_diverse} diverse prompts + "
        f"{mb(DRIVER_FIXED)} = {mb(b.driver)}"
    )


def report_speed(times: dict[str, list[float]], store_bytes: int) -> dict[str, float]:
    gb = store_bytes / 1e9
    speed = {name: gb / statistics.median(runs) for name, runs in times.items()}
    labels = {"plain": "plain read", "zarr": "zarr read", "reduce": "reduce", "reduce_zarr": "reduce through zarr"}
    for name, label in labels.items():
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(
            f"{label}: {speed[name]:.3f} GB/s of store bytes "
            f"(median {statistics.median(times[name]):.2f} s over {len(times[name])} runs: {runs})"
        )
    for base in ("plain", "zarr"):
        ratio = statistics.median(p / q for p, q in zip(times[base], times["reduce"], strict=True))
        speed[f"ratio_{base}"] = ratio
        print(
            f"ratio reduce/{base} read throughput: {ratio:.3f} (median of per-run ratios; the reduce reads each chunk "
            "once, as the reads do)"
        )
    gain = statistics.median(z / d for d, z in zip(times["reduce"], times["reduce_zarr"], strict=True))
    speed["gain"] = gain
    print(f"reduce / reduce through zarr throughput: {gain:.3f} (median of per-run ratios)")
    return speed


def report_memory(mapper: SubprocessMapper, driver: int, b: Budget) -> int:
    """One line per step (max over its tasks), PASS/FAIL against the budgets; returns how many checks failed."""
    if not all(s["reset"] for s in mapper.stats):
        print("note: /proc/self/clear_refs unavailable; peaks include the imports (overstated, never understated)")
    failures = 0
    for step in dict.fromkeys(s["step"] for s in mapper.stats):
        mine = [s for s in mapper.stats if s["step"] == step]
        rss, traced = max(s["rss"] for s in mine), max(s["traced"] for s in mine)
        ok = rss <= b.task and traced <= b.live
        failures += not ok
        print(
            f"task peak {step} ({len(mine)} tasks): RSS +{mb(rss)} <= {mb(b.task)}, tracemalloc {mb(traced)} <= "
            f"live {mb(b.live)}: {check(ok)}"
        )
    ok = driver <= b.driver
    failures += not ok
    print(f"driver peak (tracemalloc, merges in reduce_store): {mb(driver)} <= {mb(b.driver)}: {check(ok)}")
    return failures


def print_summary(
    args: argparse.Namespace,
    meta: RunMeta,
    n_rows: int,
    store_bytes: int,
    multiple: float,
    b: Budget,
    speed: dict[str, float],
    mapper: SubprocessMapper,
    driver: int,
) -> None:
    """A block to paste into a closing note: the command and every figure, nothing else."""
    rss = max(s["rss"] for s in mapper.stats)
    traced = max(s["traced"] for s in mapper.stats)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/reduce.py", *sys.argv[1:]])
    print("\n--- summary ---")
    print(f"command: {command}")
    print(
        f"store {mb(store_bytes)} ({n_rows} rows x {meta.n_layers} layers x {meta.intermediate_size} float16, "
        f"chunk {mb(b.chunk)}) = {multiple:.1f} x per-task budget {mb(b.task)}"
    )
    print(
        f"throughput (medians of {args.repeats}, one core of {os.cpu_count()}): plain read "
        f"{speed['plain']:.3f} GB/s, reduce {speed['reduce']:.3f} GB/s, ratio {speed['ratio_plain']:.3f}; "
        f"zarr read {speed['zarr']:.3f} GB/s, ratio reduce/zarr read {speed['ratio_zarr']:.3f}; "
        f"reduce through zarr {speed['reduce_zarr']:.3f} GB/s, reduce / reduce through zarr {speed['gain']:.3f}"
    )
    print(
        f"per-task peak RSS +{mb(rss)} (budget {mb(b.task)}), tracemalloc {mb(traced)} (live budget "
        f"{mb(b.live)}): {check(rss <= b.task and traced <= b.live)}"
    )
    print(f"driver peak {mb(driver)} (budget {mb(b.driver)}): {check(driver <= b.driver)}")


if __name__ == "__main__":
    sys.exit(main())
