"""The Ray shell: replica actors for capture, tasks for the reduce. It only moves work, never activations."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from cna_dist.errors import RunFailure
from cna_dist.io.store import Run, ShardPlan
from cna_dist.manifest import Manifest
from cna_dist.runtime.replica import Replica


class RayExecutor:
    """Connects to a cluster (`address`, RAY_ADDRESS) or starts a local Ray; closes what it started."""

    def __init__(
        self,
        address: str | None = None,
        *,
        replicas: int | None = None,
        max_in_flight: int = 2,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        num_cpus: int | None = None,
    ):
        import ray

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            elif num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
            ray.init(**kwargs)
        self.replicas = replicas
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.actors: list[Any] = []
        self.on_shard: Callable[[dict[str, Any]], None] | None = None  # called with each committed shard's result

    def release_replicas(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def close(self) -> None:
        self.release_replicas()
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def n_replicas(self, gpus_per_replica: int) -> int:
        if self.replicas:
            return self.replicas
        resources = self.ray.cluster_resources()
        if gpus_per_replica > 0:
            return max(1, int(resources.get("GPU", 0) // gpus_per_replica))
        return max(1, int(resources.get("CPU", 1)) - 1)

    def start_replicas(self, m: Manifest) -> list[Any]:
        actor_cls = self.ray.remote(Replica)
        n = self.n_replicas(m.model.gpus_per_replica)
        self.actors = [
            actor_cls.options(
                num_gpus=m.model.gpus_per_replica,
                num_cpus=1,
                max_restarts=self.max_retries,
                max_task_retries=0,
                max_concurrency=2,
            ).remote(
                m.model.uri,
                m.model.storage_options,
                m.model.dtype,
                m.model.trust_remote_code,
                m.model.gpus_per_replica,
                m.model.max_memory_per_gpu,
                m.capture.dtype,
                m.capture.token_budget,
                m.capture.max_batch_size,
            )
            for _ in range(n)
        ]
        return self.actors

    def capture(
        self, m: Manifest, run: Run, plans: list[ShardPlan], token_ids: dict[str, list[int]], *, progress: bool = True
    ) -> dict[str, Any]:
        """Each shard goes to a replica, which captures, writes and commits it; only a small report returns.

        The replicas are released afterwards so their CPUs/GPUs go to the reduce tasks.
        """
        report: dict[str, Any] = {
            "float16_overflow": 0,
            "replicas": {},
            "retries": 0,
            "replica_deaths": 0,
            "failures": [],
        }
        if not plans:
            return report
        bar = tqdm(total=sum(len(p.hashes) for p in plans), desc="capture", unit="prompt", disable=not progress)

        def done(i: int, result: dict[str, Any]) -> None:
            report["float16_overflow"] += result["float16_overflow"]
            report["replicas"][result["replica"]] = report["replicas"].get(result["replica"], 0) + 1
            bar.update(result["rows"])
            bar.set_postfix(shards=f"{sum(report['replicas'].values())}/{len(plans)}", retried=report["retries"])
            if self.on_shard is not None:
                self.on_shard(result)

        try:
            self.fan_out(
                m,
                "capture_shard",
                [(run, p, [token_ids[h] for h in p.hashes]) for p in plans],
                done,
                report,
                names=[f"shard {p.shard}" for p in plans],
            )
        finally:
            bar.close()
            self.release_replicas()
        return report

    def replica_map(
        self, m: Manifest, method: str, args: Sequence[tuple], *, progress: str | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        """`Replica.<method>(*a)` for each `a`, results in order, with capture's retries; replicas stay up."""
        results: list[Any] = [None] * len(args)
        report: dict[str, Any] = {"retries": 0, "replica_deaths": 0, "failures": []}
        bar = tqdm(total=len(args), desc=progress or "", disable=progress is None)

        def done(i: int, result: Any) -> None:
            results[i] = result
            bar.update(1)

        try:
            self.fan_out(m, method, args, done, report, names=[f"{method} #{i}" for i in range(len(args))])
        finally:
            bar.close()
        return results, report

    def fan_out(
        self,
        m: Manifest,
        method: str,
        args: Sequence[tuple],
        done: Callable[[int, Any], None],
        report: dict[str, Any],
        *,
        names: Sequence[str],
    ) -> None:
        """Bounded in-flight calls per replica; a dead replica's calls are re-queued.

        A replica that dies is restarted by Ray (max_restarts); until a probe call answers it gets no work, so
        its restart (a model reload) does not burn the calls' retries. A call is retried at most `max_retries`
        times, with backoff, whatever killed it; then the run fails naming what failed.
        """
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        actors = self.actors or self.start_replicas(m)
        queue: deque[int] = deque(range(len(args)))
        attempts = [0] * len(args)
        not_before = [0.0] * len(args)  # monotonic time each call's backoff ends
        in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (replica, call)
        load = [0] * len(actors)
        ready = [True] * len(actors)
        dead = [False] * len(actors)
        probes: dict[Any, int] = {}
        while queue or in_flight:
            now = time.monotonic()
            for r, actor in enumerate(actors):
                waiting: deque[int] = deque()
                while ready[r] and queue and load[r] < self.max_in_flight:
                    i = queue.popleft()
                    if not_before[i] > now:
                        waiting.append(i)
                        continue
                    in_flight[getattr(actor, method).remote(*args[i])] = (r, i)
                    load[r] += 1
                queue.extendleft(reversed(waiting))
            if not in_flight and not probes and all(dead):
                raise RunFailure(f"every replica died (restarts exhausted); {len(queue)} calls not done")
            finished, _ = self.ray.wait([*in_flight, *probes], num_returns=1, timeout=self.backoff_s)
            if not finished:
                continue
            ref = finished[0]
            if ref in probes:
                r = probes.pop(ref)
                try:
                    self.ray.get(ref)
                    ready[r] = True
                except ActorUnavailableError:  # still restarting: ask again shortly
                    time.sleep(self.backoff_s)
                    probes[actors[r].pid.remote()] = r
                except RayActorError:
                    dead[r] = True
                continue
            r, i = in_flight.pop(ref)
            load[r] -= 1
            try:
                result = self.ray.get(ref)
            except (RayActorError, RayTaskError) as exc:
                if isinstance(exc, RayActorError) and ready[r]:
                    ready[r] = False
                    report["replica_deaths"] += 1
                    probes[actors[r].pid.remote()] = r
                attempts[i] += 1
                report["retries"] += 1
                if attempts[i] > self.max_retries:
                    report["failures"].append({"call": names[i], "error": f"{type(exc).__name__}: {exc}"[:500]})
                    continue
                not_before[i] = time.monotonic() + self.backoff_s * 2 ** (attempts[i] - 1)
                queue.append(i)
                continue
            done(i, result)
        if report["failures"]:
            failed = ", ".join(f["call"] for f in report["failures"])
            raise RunFailure(f"{failed} failed after {self.max_retries} retries: {report['failures'][0]['error']}")

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> list[Any]:
        task = self.ray.remote(num_cpus=1, max_retries=self.max_retries)(fn)
        return self.ray.get([task.remote(*a) for a in args])
