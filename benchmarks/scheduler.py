"""Benchmark: the retrying scheduler's own cost per call, against the number of replicas and of calls.

Why: the driver runs the scheduler once per finished call, over R replicas with three calls in flight each; any work
per call that grows with R or with the calls queued (visiting every replica, re-queueing, rebuilding lists) is paid
a million times in a million-prompt job. Here the replicas are instant fakes (a call's handle is its result, every
wait returns the oldest call in flight) and the clock is a fake, so what is timed is `Scheduler.run`'s code alone:
this thread's CPU seconds per call, the median of `--repeats`, for each R and number of calls. The baseline is the
smallest R in the same process: the ratio says how the cost grows with R.

    python benchmarks/scheduler.py [--replicas 1,16,64,256] [--calls 2000,20000] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from cna_dist.runtime.scheduler import Scheduler, Settings


class Handle:
    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class InstantReplica:
    def work(self, item: Any) -> Handle:
        return Handle(item)


class InstantPool:
    """The scheduler's `Pool` with nothing behind it: every call is done when first waited on."""

    def __init__(self, n: int):
        self.replicas = [InstantReplica() for _ in range(n)]

    def __len__(self) -> int:
        return len(self.replicas)

    def replica(self, r: int) -> InstantReplica:
        return self.replicas[r]

    def wait(self, handles: Collection[Handle], timeout: float) -> list[Handle]:
        return [next(iter(handles))]

    def result(self, handle: Handle) -> Any:
        return handle.value

    def probe(self, r: int) -> Handle:
        raise AssertionError("an instant replica is never lost")


class StoppedClock:
    """Time stands still: no call is ever in backoff, and nothing sleeps."""

    def monotonic(self) -> float:
        return 0.0

    def sleep(self, seconds: float) -> None:
        pass


def per_call_us(replicas: int, calls: int) -> float:
    items = list(range(calls))
    scheduler = Scheduler(InstantPool(replicas), lambda replica, item: replica.work(item), Settings(), StoppedClock())
    start = time.thread_time()
    scheduler.run(items, lambda i, result: None, [""] * calls)
    return 1e6 * (time.thread_time() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,16,64,256")
    parser.add_argument("--calls", default="2000,20000")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    replicas = [int(r) for r in args.replicas.split(",")]
    calls = [int(c) for c in args.calls.split(",")]
    print(f"{'replicas':>8} {'calls':>7} {'us/call':>8} {'spread':>15} {'x smallest R':>12}")
    rows = []
    for n in calls:
        base = None
        for r in replicas:
            samples = [per_call_us(r, n) for _ in range(args.repeats)]
            median = statistics.median(samples)
            base = base or median
            spread = f"{min(samples):.1f}-{max(samples):.1f}"
            print(f"{r:>8} {n:>7} {median:>8.1f} {spread:>15} {median / base:>12.2f}")
            rows.append({"replicas": r, "calls": n, "us_per_call": median, "samples_us": samples})
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
