"""The driver's replica calls release their replicas: a lone map afterwards, a `ReplicaCalls` block at its end,
also when a call fails; maps inside one block share one set of replicas. Real scheduler and in-process pool, a
plain object for the replica (no model)."""

from __future__ import annotations

from typing import Any

import pytest

from cna_dist.errors import RunFailure
from cna_dist.runtime.calls import ReplicaCalls, replica_map
from cna_dist.runtime.pool import LocalPool
from cna_dist.runtime.replica import ReplicaSpec
from cna_dist.runtime.scheduler import Settings

SPEC = ReplicaSpec("/model-a")


class Doubler:
    """A replica stand-in: doubles numbers, fails on negative ones."""

    def __init__(self, spec: ReplicaSpec):
        self.spec = spec

    def pid(self) -> int:
        return 1

    def double(self, x: int) -> int:
        if x < 0:
            raise ValueError(f"no negatives: {x}")
        return 2 * x


class CountingExecutor:
    """The Executor's replica half, counting the pools it starts and the pools it releases."""

    def __init__(self) -> None:
        self.settings = Settings(call_retries=0, backoff_s=0.0)
        self.pool: LocalPool | None = None
        self.started: list[str] = []
        self.released: list[str] = []

    def replicas(self, spec: ReplicaSpec) -> LocalPool:
        if self.pool is not None and self.pool.spec != spec:
            self.release_replicas()
        if self.pool is None:
            self.pool = LocalPool(spec, 2, factory=Doubler)
            self.started.append(spec.model_uri)
        return self.pool

    def release_replicas(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.released.append(self.pool.spec.model_uri)
            self.pool = None


def double(replica: Any, x: int) -> Any:
    return replica.double.remote(x)


def test_a_lone_map_releases_its_replicas() -> None:
    executor = CountingExecutor()
    results, report = replica_map(executor, SPEC, double, [1, 2, 3])
    assert results == [2, 4, 6] and report.retries == 0
    assert executor.started == ["/model-a"] and executor.released == ["/model-a"] and executor.pool is None


def test_a_lone_map_that_fails_releases_its_replicas() -> None:
    executor = CountingExecutor()
    with pytest.raises(RunFailure, match="no negatives: -1"):
        replica_map(executor, SPEC, double, [1, -1])
    assert executor.released == ["/model-a"] and executor.pool is None


def test_maps_in_one_block_share_replicas_released_after_the_last() -> None:
    executor = CountingExecutor()
    with ReplicaCalls(executor) as calls:
        assert calls.map(SPEC, double, [1])[0] == [2]
        assert calls.map(SPEC, double, [2, 3])[0] == [4, 6]
        assert executor.started == ["/model-a"] and executor.released == []  # still up for the next call
        assert calls.map(ReplicaSpec("/judge"), double, [5])[0] == [10]  # another model replaces them
        assert executor.released == ["/model-a"]
    assert executor.started == ["/model-a", "/judge"] and executor.released == ["/model-a", "/judge"]
    assert executor.pool is None


def test_a_block_whose_call_fails_releases_its_replicas() -> None:
    executor = CountingExecutor()
    with pytest.raises(RunFailure, match="no negatives: -4"), ReplicaCalls(executor) as calls:
        calls.map(SPEC, double, [1])
        calls.map(SPEC, double, [-4])
    assert executor.started == ["/model-a"] and executor.released == ["/model-a"] and executor.pool is None
