"""Replica pools on their own, with a fake replica: in this process (threads) and on a local Ray (actors)."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import threading
import time

import pytest

from cna_dist.runtime.executor import InProcessExecutor
from cna_dist.runtime.pool import Finished, LocalPool, RayPool
from cna_dist.runtime.replica import ReplicaSpec
from cna_dist.runtime.scheduler import ReplicaLost, Scheduler, Settings

SPEC = ReplicaSpec("fake://model")


class FakeReplica:
    """Stands in for Replica: same call shape, no model."""

    def __init__(self, spec: ReplicaSpec):
        self.spec = spec
        self.active = 0
        self.most = 0
        self.lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def square(self, x: int) -> int:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x * x

    def die(self) -> None:
        os._exit(1)


def test_local_pool_runs_calls_concurrently_and_reports_their_errors() -> None:
    pool = LocalPool(SPEC, concurrency=2, factory=FakeReplica)
    try:
        handles = [pool.replica(0).square.remote(x) for x in (1, 2, 3, 4)]
        done: list = []
        while len(done) < 4:
            done += [h for h in pool.wait([h for h in handles if h not in done], timeout=5) if h not in done]
        assert [pool.result(h) for h in handles] == [1, 4, 9, 16]
        assert pool.actor.target.most == 2  # two calls at once, never more
        with pytest.raises(ValueError, match="negative: -1"):
            pool.result(pool.replica(0).square.remote(-1))
        assert pool.result(pool.probe(0)) == os.getpid()
    finally:
        pool.close()


def test_scheduler_over_a_local_pool() -> None:
    pool = LocalPool(SPEC, concurrency=2, factory=FakeReplica)
    out: dict[int, int] = {}
    try:
        Scheduler(pool, lambda replica, x: replica.square.remote(x), Settings(max_in_flight=3)).run(
            list(range(7)), out.__setitem__, [str(i) for i in range(7)]
        )
    finally:
        pool.close()
    assert out == {i: i * i for i in range(7)}


def test_in_process_executor_keeps_one_pool_per_spec() -> None:
    executor = InProcessExecutor()
    executor._replicas.start = lambda spec: LocalPool(spec, 2, factory=FakeReplica)
    first = executor.replicas(SPEC)
    assert executor.replicas(ReplicaSpec("fake://model")) is first  # equal spec: the same loaded replica
    other = executor.replicas(ReplicaSpec("fake://other"))
    assert other is not first and first.actor.threads._shutdown
    executor.close()
    assert other.actor.threads._shutdown and executor._replicas.pool is None
    assert executor.map(pow, [(2, 3), (3, 2)]) == [8, 9]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")  # the suite's shared local Ray
def test_ray_pool_maps_a_dead_actor_to_replica_lost() -> None:
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests package
    pool = RayPool(SPEC, 2, max_restarts=0, replica_cls=FakeReplica)
    try:
        assert len(pool) == 2
        assert pool.result(pool.replica(1).square.remote(7)) == 49
        with pytest.raises(ValueError, match="negative"):
            pool.result(pool.replica(1).square.remote(-2))
        with pytest.raises(ReplicaLost):
            pool.result(pool.replica(0).die.remote())
        with pytest.raises(ReplicaLost):  # no restarts left: the probe finds it gone
            pool.result(pool.probe(0))
        assert pool.result(pool.probe(1)) > 0
    finally:
        pool.close()
    assert len(pool) == 0


def test_finished_returns_each_finished_handle_once_and_only_those_asked_for() -> None:
    finished = Finished()
    a, b, c = cf.Future(), cf.Future(), cf.Future()
    for future in (a, b, c):
        future.add_done_callback(finished.add)
    assert finished.wait([a, b], timeout=0.01) == []  # nothing finished: the timeout ends the wait
    c.set_result(3)
    assert finished.wait([a, b], timeout=0.01) == []  # c finished but was not asked for
    threading.Timer(0.05, lambda: b.set_exception(ValueError("b"))).start()
    assert finished.wait([a, b], timeout=5) == [b]  # woken by b's end, not by the timeout
    assert finished.wait([a, b], timeout=0.01) == []  # b was claimed once
    assert finished.wait([a, c], timeout=0.01) == [c]  # c waited, unclaimed, until asked for
    a.set_result(1)
    assert finished.wait([a], timeout=0) == [a]


def test_finished_drops_futures_nobody_holds() -> None:
    finished = Finished()
    future: cf.Future = cf.Future()
    future.add_done_callback(finished.add)
    future.set_result(1)
    assert len(finished._done) == 1
    del future
    gc.collect()
    assert len(finished._done) == 0
