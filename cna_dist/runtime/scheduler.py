"""The retrying scheduler: items go to replicas as calls `fn(replica, item) -> handle`, like Ray's ActorPool.

It knows nothing of Ray or of what a call does. A `Pool` starts calls' handles and reports how they ended:
a handle's result is a value, or `ReplicaLost` (the replica's process died: the call is re-queued and the
replica gets no work until a probe answers, so its restart, a model reload, does not burn the calls' retries),
or any other exception (the call failed: retried with backoff). A call is retried at most `call_retries` times,
whatever killed it; then the run fails naming every call that failed. A replica still restarting after
`restart_timeout_s` (its node is gone and no node has room for it) counts as dead, so a run whose replicas all
lost their nodes fails instead of waiting forever; while any replica works, the others' restarts cost nothing.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cna_dist.clock import SYSTEM_CLOCK, Clock
from cna_dist.errors import RunFailure


class ReplicaLost(Exception):
    """The replica's process is gone; Ray may be restarting it."""


class ReplicaRestarting(ReplicaLost):
    """A probe found the replica still restarting: ask again shortly."""


class Pool(Protocol):
    """Replicas as the scheduler sees them: handles to wait on and their outcomes."""

    def __len__(self) -> int: ...

    def replica(self, r: int) -> Any: ...

    def wait(self, handles: Collection[Hashable], timeout: float) -> list[Hashable]:
        """The handles that finished, waiting up to `timeout` for one. `handles`: those started and not yet
        returned, in the order they started (a dict's keys, or a list)."""
        ...

    def result(self, handle: Hashable) -> Any: ...

    def probe(self, r: int) -> Hashable: ...


@dataclass(frozen=True)
class Settings:
    max_in_flight: int = 3  # calls per replica (replica.CONCURRENCY): up to two shards written while the next computes
    call_retries: int = 3  # a failed call (shard, eval chunk) is tried again this many times, with backoff
    backoff_s: float = 0.5
    restart_timeout_s: float = 1800.0  # a replica restarting longer than this is given up (a 145 GB copy fits)
    actor_restarts: int = 3  # Ray restarts a dead replica actor this many times (a lost node, a killed process)
    task_retries: int = 3  # Ray runs a reduce task again this many times when its worker or node dies


@dataclass
class Failure:
    call: str
    error: str


@dataclass
class Report:
    retries: int = 0
    replica_deaths: int = 0
    failures: list[Failure] = field(default_factory=list)


@dataclass
class _Call:
    index: int
    attempts: int = 0
    not_before: float = 0.0  # clock.monotonic() when its backoff ends


@dataclass
class _Slot:
    load: int = 0
    ready: bool = True
    dead: bool = False
    lost_at: float = 0.0  # clock.monotonic() when it was found lost
    listed: bool = True  # in the scheduler's heap of replicas that may have room


class Scheduler:
    """One run of calls over a pool; `run` returns the report or raises RunFailure naming the failed calls."""

    def __init__(
        self,
        pool: Pool,
        fn: Callable[[Any, Any], Hashable],
        settings: Settings = Settings(),
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.pool, self.fn, self.settings, self.clock = pool, fn, settings, clock
        self.slots = [_Slot() for _ in range(len(pool))]
        self.room = list(range(len(pool)))  # a heap: replicas that may have room, lowest first (see _dispatch)
        self.queue: deque[_Call] = deque()
        self.in_flight: dict[Hashable, tuple[int, _Call]] = {}
        self.probes: dict[Hashable, int] = {}
        self.report = Report()

    def run(self, items: Sequence[Any], on_result: Callable[[int, Any], None], names: Sequence[str]) -> Report:
        self.queue.extend(_Call(i) for i in range(len(items)))
        while self.queue or self.in_flight:
            self._give_up_restarts()
            self._dispatch(items)
            if not self.in_flight and not self.probes:
                if all(s.dead for s in self.slots):
                    raise RunFailure(
                        f"every replica died (restarts exhausted, or still restarting after "
                        f"{self.settings.restart_timeout_s:g} s: no node with room); {len(self.queue)} calls not done"
                    )
                self._sleep_until_due()
                continue
            waiting_on = [*self.in_flight, *self.probes] if self.probes else self.in_flight.keys()
            for handle in self.pool.wait(waiting_on, self.settings.backoff_s):
                if handle in self.probes:
                    self._settle_probe(handle)
                else:
                    self._settle_call(handle, on_result, names)
        if self.report.failures:
            failed = ", ".join(f.call for f in self.report.failures)
            raise RunFailure(
                f"{failed} failed after {self.settings.call_retries} retries: {self.report.failures[0].error}"
            )
        return self.report

    def _dispatch(self, items: Sequence[Any]) -> None:
        """Fill every ready replica up to max_in_flight with calls whose backoff has ended, in queue order, the
        lowest-numbered replica first.

        Runs once per finished call, so it visits only replicas that may have room: a heap of them, to which a
        replica returns when a call of its own ends or its probe answers (a lost or full one popped is dropped).
        """
        limit, now = self.settings.max_in_flight, self.clock.monotonic()
        passed: list[int] = []  # replicas with room left after their turn: only calls in backoff remained
        while self.queue and self.room:
            r = heapq.heappop(self.room)
            slot = self.slots[r]
            slot.listed = False
            if not slot.ready or slot.load >= limit:
                continue
            waiting: list[_Call] = []
            while self.queue and slot.load < limit:
                call = self.queue.popleft()
                if call.not_before > now:
                    waiting.append(call)
                    continue
                self.in_flight[self.fn(self.pool.replica(r), items[call.index])] = (r, call)
                slot.load += 1
            if waiting:
                self.queue.extendleft(reversed(waiting))
            if slot.load < limit:
                passed.append(r)
        for r in passed:
            self._list(r)

    def _list(self, r: int) -> None:
        """Back in the heap of replicas that may have room, if it is ready, has room and is not there yet."""
        slot = self.slots[r]
        if not slot.listed and slot.ready and slot.load < self.settings.max_in_flight:
            slot.listed = True
            heapq.heappush(self.room, r)

    def _sleep_until_due(self) -> None:
        """Nothing to wait on but backoffs: sleep until the first queued call is due (not a busy loop)."""
        due = min(call.not_before for call in self.queue) - self.clock.monotonic()
        if due > 0:
            self.clock.sleep(due)

    def _give_up_restarts(self) -> None:
        """A replica restarting for `restart_timeout_s` is dead; its probe, answered or not, is dropped."""
        now = self.clock.monotonic()
        for handle, r in list(self.probes.items()):
            if now - self.slots[r].lost_at >= self.settings.restart_timeout_s:
                del self.probes[handle]
                self.slots[r].dead = True

    def _settle_probe(self, handle: Hashable) -> None:
        r = self.probes.pop(handle)
        try:
            self.pool.result(handle)
            self.slots[r].ready = True
            self._list(r)
        except ReplicaRestarting:
            self.clock.sleep(self.settings.backoff_s)
            self.probes[self.pool.probe(r)] = r
        except ReplicaLost:
            self.slots[r].dead = True

    def _settle_call(self, handle: Hashable, on_result: Callable[[int, Any], None], names: Sequence[str]) -> None:
        r, call = self.in_flight.pop(handle)
        slot = self.slots[r]
        slot.load -= 1
        self._list(r)
        try:
            result = self.pool.result(handle)
        except Exception as exc:  # noqa: BLE001 - every failure is retried, then reported by name
            if isinstance(exc, ReplicaLost) and slot.ready:
                slot.ready, slot.lost_at = False, self.clock.monotonic()
                self.report.replica_deaths += 1
                self.probes[self.pool.probe(r)] = r
            self._retry(call, exc, names)
            return
        on_result(call.index, result)

    def _retry(self, call: _Call, exc: Exception, names: Sequence[str]) -> None:
        call.attempts += 1
        self.report.retries += 1
        if call.attempts > self.settings.call_retries:
            self.report.failures.append(Failure(names[call.index], f"{type(exc).__name__}: {exc}"[:500]))
            return
        call.not_before = self.clock.monotonic() + self.settings.backoff_s * 2 ** (call.attempts - 1)
        self.queue.append(call)
