"""Executors: where replicas run and where reduce tasks run. One protocol, two implementations.

`InProcessExecutor` keeps one replica in this process and runs tasks in a loop; `RayExecutor` joins or starts a
Ray cluster, runs replicas as actors and tasks as Ray tasks. `mine` and `eval` take either and run the same code.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from cna_dist.reduce.streamed import local_map
from cna_dist.runtime.pool import LocalPool, RayPool
from cna_dist.runtime.replica import CONCURRENCY, ReplicaSpec, ShardResult
from cna_dist.runtime.scheduler import Pool, Settings


class Executor(Protocol):
    settings: Settings
    on_shard: Callable[[ShardResult], None] | None  # observes each committed shard (monitoring, fault tests)

    def replicas(self, spec: ReplicaSpec) -> Pool:
        """The replica pool for `spec`, started on first use and kept until `release_replicas`."""
        ...

    def release_replicas(self) -> None: ...

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterable[Any]:
        """`fn(*a)` for each `a`, results in order: the reduce's tasks."""
        ...

    def close(self) -> None: ...


class _Replicas:
    """Keeps one pool for one spec; a new spec (another model) replaces it."""

    def __init__(self, start: Callable[[ReplicaSpec], Any]):
        self.start = start
        self.pool: Any = None

    def get(self, spec: ReplicaSpec) -> Any:
        if self.pool is not None and self.pool.spec != spec:
            self.release()
        if self.pool is None:
            self.pool = self.start(spec)
        return self.pool

    def release(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class InProcessExecutor:
    """No Ray: one replica in this process (CONCURRENCY calls at once, as on Ray), tasks in a loop."""

    def __init__(self, *, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.on_shard: Callable[[ShardResult], None] | None = None
        self._replicas = _Replicas(lambda spec: LocalPool(spec, CONCURRENCY))

    def replicas(self, spec: ReplicaSpec) -> Pool:
        return self._replicas.get(spec)

    def release_replicas(self) -> None:
        self._replicas.release()

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> list[Any]:
        return local_map(fn, args)

    def close(self) -> None:
        self.release_replicas()

    def __enter__(self) -> InProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RayExecutor:
    """Joins a cluster (`address`, RAY_ADDRESS) or starts a local Ray, at first use; closes what it started.

    Nothing starts before the first replica or task is asked for, so a command that fails on its input (exit 2)
    never pays for a Ray start-up.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        replicas: int | None = None,
        max_in_flight: int = CONCURRENCY,
        call_retries: int = 3,
        backoff_s: float = 0.5,
        num_cpus: int | None = None,
    ):
        self.address, self.num_cpus = address, num_cpus
        self.settings = Settings(max_in_flight, call_retries, backoff_s)
        self.on_shard: Callable[[ShardResult], None] | None = None
        self.requested = replicas
        self.started = False  # whether this executor started the Ray it uses (and so shuts it down)
        self._replicas = _Replicas(self._start)

    def _ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            # Without an address, a new local Ray: ray.init() alone would join any cluster `ray start` left
            # running on this machine (spec §2: --address or RAY_ADDRESS picks a cluster, nothing else).
            options: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "address": self.address or os.environ.get("RAY_ADDRESS") or "local",
            }
            if options["address"] == "local" and self.num_cpus:
                options["num_cpus"] = self.num_cpus
            ray.init(**options)
            self.started = True
        return ray

    def _start(self, spec: ReplicaSpec) -> RayPool:
        self._ray()
        n = RayPool.size(spec.gpus, self.requested)
        return RayPool(spec, n, concurrency=CONCURRENCY, max_restarts=self.settings.actor_restarts)

    def replicas(self, spec: ReplicaSpec) -> Pool:
        return self._replicas.get(spec)

    def release_replicas(self) -> None:
        """Kill the replica actors so their CPUs and GPUs go to the reduce tasks."""
        self._replicas.release()

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> Iterator[Any]:
        """Every task submitted now; results fetched in order as the caller consumes them, so the driver holds one
        result at a time (the others wait in Ray's object store) whatever the number of tasks."""
        ray = self._ray()
        task = ray.remote(num_cpus=1, max_retries=self.settings.task_retries)(fn)
        return _in_order(ray, deque(task.remote(*a) for a in args))

    def close(self) -> None:
        import ray

        self.release_replicas()
        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_order(ray: Any, refs: deque) -> Iterator[Any]:
    """Each result as it is consumed; its reference dropped at once, so Ray may free it."""
    while refs:
        yield ray.get(refs.popleft())


def open_executor(address: str | None = None, replicas: int | None = None, in_process: bool = False) -> Executor:
    """The CLI's executor: this process with --in-process, else Ray (joins `address` or starts a local one)."""
    if in_process:
        return InProcessExecutor()
    return RayExecutor(address, replicas=replicas)
