"""The retrying scheduler on its own: a scripted pool of fake replicas and a fake clock, no Ray, no threads."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import pytest

from cna_dist.errors import RunFailure
from cna_dist.runtime.scheduler import ReplicaLost, ReplicaRestarting, Scheduler, Settings
from tests.fakeclock import FakeClock


@dataclass(eq=False)
class Handle:
    replica: int
    item: Any
    outcome: Any  # a value, or an exception to raise from result()


@dataclass
class FakeReplica:
    index: int
    pool: FakePool

    def work(self, item: Any) -> Handle:
        return self.pool.start(self.index, item)


@dataclass
class FakePool:
    """`script(replica, item, attempt)` decides each call's outcome; handles finish in the order they started."""

    n: int
    script: Callable[[int, Any, int], Any]
    probe_script: Callable[[int, int], Any] = lambda r, attempt: r
    started: list[tuple[int, Any]] = field(default_factory=list)
    probes: list[int] = field(default_factory=list)
    waits: list[int] = field(default_factory=list)  # handles outstanding at each wait: the in-flight bound at work

    def __len__(self) -> int:
        return self.n

    def replica(self, r: int) -> FakeReplica:
        return FakeReplica(r, self)

    def start(self, r: int, item: Any) -> Handle:
        attempt = sum(1 for _, i in self.started if i == item)
        self.started.append((r, item))
        return Handle(r, item, self.script(r, item, attempt))

    def wait(self, handles: Collection[Handle], timeout: float) -> list[Handle]:
        self.waits.append(len(handles))
        return [next(iter(handles))]

    def result(self, handle: Handle) -> Any:
        if isinstance(handle.outcome, Exception):
            raise handle.outcome
        return handle.outcome

    def probe(self, r: int) -> Handle:
        self.probes.append(r)
        return Handle(r, "probe", self.probe_script(r, self.probes.count(r) - 1))


def run(pool: FakePool, items: list[Any], settings: Settings = Settings(), clock: FakeClock | None = None):
    results: dict[int, Any] = {}
    report = Scheduler(pool, lambda replica, item: replica.work(item), settings, clock or FakeClock()).run(
        items, results.__setitem__, [f"item {i}" for i in items]
    )
    return results, report


def test_every_item_once_results_in_order_and_in_flight_bounded() -> None:
    pool = FakePool(3, lambda r, item, attempt: item * 10)
    results, report = run(pool, list(range(20)), Settings(max_in_flight=2))
    assert results == {i: i * 10 for i in range(20)}
    assert sorted(item for _, item in pool.started) == list(range(20))
    assert {r for r, _ in pool.started} == {0, 1, 2}
    assert max(pool.waits) <= 3 * 2
    assert (report.retries, report.replica_deaths, report.failures) == (0, 0, [])


def test_a_failing_call_is_retried_with_exponential_backoff() -> None:
    clock = FakeClock()
    pool = FakePool(1, lambda r, item, attempt: ValueError("flaky") if attempt < 2 else "ok")
    results, report = run(pool, ["a"], Settings(call_retries=3, backoff_s=0.5), clock)
    assert results == {0: "ok"} and report.retries == 2
    # no sleeping: the call waits in the queue until its backoff (0.5 s, then 1 s) ends on the clock
    assert pool.started == [(0, "a")] * 3


def test_a_call_in_backoff_lets_the_calls_behind_it_start_in_queue_order() -> None:
    # "a" fails once and waits 1 s; the clock never reaches it until the other five are done, so they start first,
    # in their queue order, each on the first replica with room, and "a" keeps its place at the queue's head
    clock = FakeClock()
    pool = FakePool(2, lambda r, item, attempt: ValueError("flaky") if item == "a" and attempt == 0 else item)
    results, report = run(pool, list("abcdef"), Settings(max_in_flight=1, backoff_s=1.0), clock)
    assert results == {i: item for i, item in enumerate("abcdef")} and report.retries == 1
    assert pool.started == [(0, "a"), (1, "b"), (0, "c"), (1, "d"), (0, "e"), (1, "f"), (0, "a")]


def test_no_replica_holds_more_than_max_in_flight_while_replicas_die_and_return() -> None:
    # replica 1 dies on its first call and answers its second probe; replica 2 fails every third call: through all
    # of it no replica ever holds more than two calls, the returned replica works again, and every item is done
    outstanding = [0, 0, 0]
    most = [0, 0, 0]

    class Counted(FakePool):
        def start(self, r: int, item: Any) -> Handle:
            outstanding[r] += 1
            most[r] = max(most[r], outstanding[r])
            return super().start(r, item)

        def result(self, handle: Handle) -> Any:
            if handle.item != "probe":
                outstanding[handle.replica] -= 1
            return super().result(handle)

    def script(r: int, item: Any, attempt: int) -> Any:
        calls = sum(1 for replica, _ in pool.started if replica == r)
        if r == 1 and calls == 1:
            return ReplicaLost("actor died")
        return ValueError("flaky") if r == 2 and calls % 3 == 0 else item

    pool = Counted(3, script, lambda r, attempt: ReplicaRestarting("loading") if attempt < 1 else r)
    results, report = run(pool, list(range(40)), Settings(max_in_flight=2, backoff_s=0.1), FakeClock())
    assert results == {i: i for i in range(40)} and report.replica_deaths == 1
    assert most == [2, 2, 2] and outstanding == [0, 0, 0]
    assert sum(1 for r, _ in pool.started if r == 1) > 1  # back at work after its probe answered


def test_a_call_that_always_fails_is_reported_by_name_after_call_retries() -> None:
    pool = FakePool(2, lambda r, item, attempt: IndexError("index out of range") if item == "bad" else item)
    with pytest.raises(RunFailure, match=r"item bad failed after 2 retries: IndexError: index out of range"):
        run(pool, ["good", "bad", "fine"], Settings(call_retries=2, backoff_s=0.01))
    assert sum(1 for _, item in pool.started if item == "bad") == 3


def test_a_lost_replica_gets_no_work_until_its_probe_answers() -> None:
    """The only replica dies on its first call; its probe says 'restarting' twice, then it answers and works."""
    events: list[str] = []

    def script(r: int, item: Any, attempt: int) -> Any:
        events.append(f"call {item}")
        return ReplicaLost("actor died") if len(events) == 1 else item

    def probe(r: int, attempt: int) -> Any:
        events.append("probe")
        return ReplicaRestarting("loading the model") if attempt < 2 else r

    pool = FakePool(1, script, probe)
    clock = FakeClock()
    results, report = run(pool, list(range(4)), Settings(max_in_flight=1, backoff_s=0.25), clock)
    assert results == {i: i for i in range(4)} and report.replica_deaths == 1 and report.retries == 1
    assert events == ["call 0", "probe", "probe", "probe", "call 1", "call 2", "call 3", "call 0"]  # retried last
    assert clock.slept == [0.25, 0.25]  # one backoff per 'still restarting'; the retried call was due by then


def test_every_replica_dead_fails_the_run_naming_what_is_left() -> None:
    pool = FakePool(2, lambda r, item, attempt: ReplicaLost("gone"), lambda r, attempt: ReplicaLost("no restarts"))
    with pytest.raises(RunFailure, match=r"every replica died \(restarts exhausted, .*\); \d+ calls not done"):
        run(pool, list(range(5)), Settings(max_in_flight=1, call_retries=10))


def lost_then_restarting(answers_after: int | None):
    """Replica 0 dies on its first call (its node is gone); its probe says 'restarting' `answers_after` times, then
    answers (None: never, as when no node has room for it). Replica 1, if any, always works."""

    def script(r: int, item: Any, attempt: int) -> Any:
        return ReplicaLost("node gone") if r == 0 and item == 0 and attempt == 0 else item

    def probe(r: int, attempt: int) -> Any:
        return ReplicaRestarting("pending") if answers_after is None or attempt < answers_after else r

    return script, probe


def test_a_replica_that_never_restarts_costs_the_others_nothing() -> None:
    script, probe = lost_then_restarting(None)
    pool = FakePool(2, script, probe)
    results, report = run(pool, list(range(6)), Settings(max_in_flight=1, backoff_s=0.5, restart_timeout_s=1e9))
    assert results == {i: i for i in range(6)} and report.replica_deaths == 1 and report.retries == 1
    assert [r for r, _ in pool.started].count(0) == 1  # the lost replica got no work after its first call


def test_every_replica_restarting_past_the_timeout_fails_the_run() -> None:
    """One replica, lost, and no node takes it: the run fails after restart_timeout_s instead of waiting forever."""
    script, probe = lost_then_restarting(None)
    pool, clock = FakePool(1, script, probe), FakeClock()
    with pytest.raises(RunFailure, match=r"still restarting after 5 s: no node with room\); 3 calls not done"):
        run(pool, list(range(3)), Settings(max_in_flight=1, backoff_s=0.5, restart_timeout_s=5), clock)
    assert clock.monotonic() == 5.0 and len(pool.probes) == 11  # at 0, 0.5, ..., 5 s: every backoff to the deadline


def test_a_replica_back_before_the_timeout_works_again() -> None:
    script, probe = lost_then_restarting(9)  # 9 backoffs of 0.5 s: back at 4.5 s, before the 5 s deadline
    pool, clock = FakePool(1, script, probe), FakeClock()
    results, report = run(pool, list(range(3)), Settings(max_in_flight=1, backoff_s=0.5, restart_timeout_s=5), clock)
    assert results == {i: i for i in range(3)} and report.replica_deaths == 1 and clock.monotonic() == 4.5


def test_nothing_to_do_starts_nothing() -> None:
    pool = FakePool(2, lambda r, item, attempt: item)
    results, report = run(pool, [])
    assert results == {} and pool.started == [] and report.retries == 0
