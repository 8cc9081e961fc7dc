"""Replica pools: start, size, probe and release replicas, in this process or as Ray actors.

A call is written once, `fn(replica, item) -> handle`, as against a Ray actor: `replica.capture_shard.remote(...)`.
In this process `LocalActor` gives a plain `Replica` that shape, each call running on a small thread pool, so
both pools run the same replica code with the same concurrency (CONCURRENCY calls per replica: writes overlap the next
compute).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import weakref
from collections.abc import Callable, Collection, Hashable
from typing import Any

from cna_dist.runtime.replica import CONCURRENCY, Replica, ReplicaSpec
from cna_dist.runtime.scheduler import ReplicaLost, ReplicaRestarting


class Finished:
    """Calls that have finished, told by each future's done callback.

    Why: `concurrent.futures.wait` visits every future it is given (a lock and a waiter each) on every wait, and
    the scheduler waits once per finished call over all calls in flight: at 64 replicas x 3 calls that visit was
    the driver's largest cost per shard. Here a wait looks only at the calls that finished and were not yet
    claimed. Futures nobody waits for are held weakly: dropped, they leave.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._done: weakref.WeakSet[cf.Future] = weakref.WeakSet()

    def add(self, future: cf.Future) -> None:
        with self._changed:
            self._done.add(future)
            self._changed.notify_all()

    def wait(self, handles: Collection[Hashable], timeout: float) -> list[Hashable]:
        """The handles among `handles` that finished, waiting up to `timeout` seconds for the first; each is
        returned once. Every handle must come from a method of an actor that reports here. `handles` is only
        asked whether it holds a finished one (a dict's keys answer at once, whatever their number)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                ready = [f for f in self._done if f in handles]
                left = deadline - time.monotonic()
                if ready or left <= 0:
                    for future in ready:
                        self._done.discard(future)
                    return ready  # type: ignore[return-value]
                self._changed.wait(left)


class _LocalMethod:
    def __init__(self, threads: cf.ThreadPoolExecutor, method: Callable[..., Any], finished: Finished):
        self.threads, self.method, self.finished = threads, method, finished

    def remote(self, *args: Any, **kwargs: Any) -> cf.Future:
        future = self.threads.submit(self.method, *args, **kwargs)
        future.add_done_callback(self.finished.add)
        return future


class LocalActor:
    """A replica object with Ray's call shape: `actor.method.remote(*args)` returns a future, told to `finished`
    when it ends (the pool waits there)."""

    def __init__(self, target: Any, concurrency: int, finished: Finished):
        self.target, self.finished = target, finished
        self.threads = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="cna-replica")

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(self.threads, getattr(self.target, name), self.finished)

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        close = getattr(self.target, "close", None)
        if close is not None:
            close()


class LocalPool:
    """One replica in this process. It cannot die without the driver, so it is never lost."""

    def __init__(
        self, spec: ReplicaSpec, concurrency: int = CONCURRENCY, factory: Callable[[ReplicaSpec], Any] = Replica
    ):
        self.spec = spec
        self.finished = Finished()
        self.actor = LocalActor(factory(spec), concurrency, self.finished)

    def __len__(self) -> int:
        return 1

    def replica(self, r: int) -> LocalActor:
        return self.actor

    def wait(self, handles: Collection[Hashable], timeout: float) -> list[Hashable]:
        return self.finished.wait(handles, timeout)

    def result(self, handle: Hashable) -> Any:
        return handle.result()  # type: ignore[attr-defined]

    def probe(self, r: int) -> Hashable:
        return self.actor.pid.remote()

    def close(self) -> None:
        self.actor.close()


class RayPool:
    """Replica actors on a Ray cluster, restarted by Ray when their process dies (max_restarts).

    Actors are placed with Ray's SPREAD strategy: replicas go to distinct nodes while there are nodes with room, so
    losing a node loses as few replicas as possible. An actor whose node is gone is restarted by Ray on a node with
    room (copying the model there if that node has no copy yet); until then its calls fail as unavailable.
    """

    def __init__(
        self,
        spec: ReplicaSpec,
        n: int,
        *,
        concurrency: int = CONCURRENCY,
        max_restarts: int = 3,
        replica_cls: type = Replica,
    ):
        import ray

        self.ray, self.spec = ray, spec
        actor_cls = ray.remote(replica_cls).options(
            num_gpus=spec.gpus,
            num_cpus=1,
            max_restarts=max_restarts,
            max_task_retries=0,
            max_concurrency=concurrency,
            scheduling_strategy="SPREAD",
        )
        self.actors = [actor_cls.remote(spec) for _ in range(n)]

    @staticmethod
    def size(gpus_per_replica: int, requested: int | None = None) -> int:
        """Replicas to start: as requested, else as many as the cluster's GPUs (or CPUs, less one for the driver)."""
        import ray

        if requested:
            return requested
        resources = ray.cluster_resources()
        if gpus_per_replica > 0:
            return max(1, int(resources.get("GPU", 0) // gpus_per_replica))
        return max(1, int(resources.get("CPU", 1)) - 1)

    def __len__(self) -> int:
        return len(self.actors)

    def replica(self, r: int) -> Any:
        return self.actors[r]

    def wait(self, handles: Collection[Hashable], timeout: float) -> list[Hashable]:
        finished, _ = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        return finished

    def result(self, handle: Hashable) -> Any:
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            return self.ray.get(handle)
        except ActorUnavailableError as exc:  # the process died and Ray is bringing it back
            raise ReplicaRestarting(str(exc)) from exc
        except RayActorError as exc:
            raise ReplicaLost(str(exc)) from exc

    def probe(self, r: int) -> Hashable:
        return self.actors[r].pid.remote()

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
