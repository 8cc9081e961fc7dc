"""The driver's two kinds of replica work, over any executor: capture shards, and map a call over items.

Each is a scheduler run with a progress bar; what the calls do lives in `Replica`, where they run in the executor.
Both release the replicas when they are done, so their CPUs and GPUs go to what comes next (the reduce tasks, or
another model's replicas); several maps that should share one set of replicas (eval's CAA, generations,
capability scores) run inside one `ReplicaCalls` block, which releases them once, at its end.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from cna_dist.errors import RunFailure
from cna_dist.prompts.packed import PackedIds
from cna_dist.runtime.executor import Executor
from cna_dist.runtime.replica import ReplicaSpec, ShardResult
from cna_dist.runtime.scheduler import Report, Scheduler
from cna_dist.store.activations import Run, ShardPlan


@dataclass
class CaptureReport:
    """What capture did: overflowed values, shards per replica, retries and deaths survived."""

    float16_overflow: int = 0
    replicas: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    replica_deaths: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    compute_seconds: float = 0.0  # summed over shards (replicas work in parallel)
    write_seconds: float = 0.0  # data plus marker, summed over shards
    written_bytes: int = 0  # activation bytes the committed shards wrote

    def add(self, result: ShardResult) -> None:
        self.float16_overflow += result.float16_overflow
        self.replicas[result.replica] = self.replicas.get(result.replica, 0) + 1
        self.compute_seconds += result.compute_seconds
        self.write_seconds += result.write_seconds
        self.written_bytes += result.nbytes

    def finish(self, report: Report) -> CaptureReport:
        self.retries, self.replica_deaths = report.retries, report.replica_deaths
        self.failures = [asdict(f) for f in report.failures]
        return self


def capture_shards(
    executor: Executor,
    spec: ReplicaSpec,
    run: Run,
    plans: list[ShardPlan],
    token_ids: dict[str, list[int]] | PackedIds,
    *,
    progress: bool = True,
) -> CaptureReport:
    """Each shard goes to a replica, which captures, writes and commits it; only a ShardResult comes back.

    `token_ids`: by row hash, or packed in the order of the hash list the plans were made from (each plan's
    `positions` index it: a shard's ids are gathered with array operations and travel as two arrays).
    The replicas are released afterwards, so their CPUs and GPUs go to the reduce tasks.
    """
    report = CaptureReport()
    if not plans:
        executor.release_replicas()  # started early for advice, perhaps: the reduce tasks need their CPUs
        return report

    def call(replica: Any, plan: ShardPlan) -> Hashable:
        return replica.capture_shard.remote(run, plan, shard_ids(token_ids, plan))

    bar = tqdm(total=sum(len(p.hashes) for p in plans), desc="capture", unit="prompt", disable=not progress)
    scheduler = Scheduler(executor.replicas(spec), call, executor.settings)

    def done(i: int, result: ShardResult) -> None:
        report.add(result)
        bar.update(result.rows)
        bar.set_postfix(shards=f"{sum(report.replicas.values())}/{len(plans)}", retried=scheduler.report.retries)
        if executor.on_shard is not None:
            executor.on_shard(result)

    try:
        report.finish(scheduler.run(plans, done, [f"shard {p.shard}" for p in plans]))
    finally:
        bar.close()
        executor.release_replicas()
    return report


class ReplicaCalls:
    """Maps over an executor's replicas that share them: each spec's replicas start at its first map and stay up for
    the next (another spec's replace them), and all are released when the block ends, also when a call failed."""

    def __init__(self, executor: Executor):
        self.executor = executor

    def __enter__(self) -> ReplicaCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.executor.release_replicas()

    def map(
        self,
        spec: ReplicaSpec,
        fn: Callable[[Any, Any], Hashable],
        items: Sequence[Any],
        *,
        progress: str | None = None,
    ) -> tuple[list[Any], Report]:
        """`fn(replica, item)` for each item on `spec`'s replicas, results in item order, with capture's retries."""
        results: list[Any] = [None] * len(items)
        bar = tqdm(total=len(items), desc=progress or "", disable=progress is None)

        def done(i: int, result: Any) -> None:
            results[i] = result
            bar.update(1)

        try:
            report = Scheduler(self.executor.replicas(spec), fn, self.executor.settings).run(
                items, done, [f"call #{i}" for i in range(len(items))]
            )
        finally:
            bar.close()
        return results, report


def shard_ids(token_ids: dict[str, list[int]] | PackedIds, plan: ShardPlan) -> list[list[int]] | PackedIds:
    """A shard's token ids, in its rows' order."""
    if not isinstance(token_ids, PackedIds):
        return [token_ids[h] for h in plan.hashes]
    if plan.positions is None or len(plan.positions) != len(plan.hashes):
        raise RunFailure(f"shard {plan.shard}: packed token ids need the plan's positions, and it has none")
    return token_ids.take(plan.positions)


def replica_map(
    executor: Executor,
    spec: ReplicaSpec,
    fn: Callable[[Any, Any], Hashable],
    items: Sequence[Any],
    *,
    progress: str | None = None,
) -> tuple[list[Any], Report]:
    """One `ReplicaCalls.map` on its own: the replicas are released afterwards, as `capture_shards` releases its."""
    with ReplicaCalls(executor) as calls:
        return calls.map(spec, fn, items, progress=progress)
