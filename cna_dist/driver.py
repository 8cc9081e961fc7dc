"""The Ray shell: replica actors for capture, tasks for the reduce. It only moves work, never activations."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from cna_dist.errors import RunFailure
from cna_dist.manifest import Manifest
from cna_dist.replica import Replica
from cna_dist.store import Run, ShardPlan


class RayExecutor:
    """Connects to a cluster (`address`, RAY_ADDRESS) or starts a local Ray; closes what it started."""

    def __init__(self, address: str | None = None, *, replicas: int | None = None, max_in_flight: int = 2,
                 max_retries: int = 3, backoff_s: float = 0.5, num_cpus: int | None = None):
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
        self.actors = [actor_cls.options(num_gpus=m.model.gpus_per_replica, num_cpus=1, max_restarts=self.max_retries,
                                         max_task_retries=0).remote(
            m.model.uri, m.model.storage_options, m.model.dtype, m.model.trust_remote_code, m.model.gpus_per_replica,
            m.model.max_memory_per_gpu, m.capture.dtype, m.capture.token_budget, m.capture.max_batch_size)
            for _ in range(n)]
        return self.actors

    def capture(self, m: Manifest, run: Run, plans: list[ShardPlan], token_ids: dict[str, list[int]], *,
                progress: bool = True) -> dict[str, Any]:
        """Fan shards out with bounded in-flight work per replica; a dead replica's shards are re-queued."""
        from ray.exceptions import RayActorError, RayTaskError

        report: dict[str, Any] = {"float16_overflow": 0, "replicas": {}, "retries": 0, "failures": []}
        if not plans:
            return report
        actors = self.start_replicas(m)
        queue: deque[ShardPlan] = deque(plans)
        attempts: dict[int, int] = {}
        in_flight: dict[Any, tuple[int, ShardPlan]] = {}
        load = [0] * len(actors)
        bar = tqdm(total=sum(len(p.hashes) for p in plans), desc="capture", unit="prompt", disable=not progress)
        try:
            while queue or in_flight:
                for i, actor in enumerate(actors):
                    while queue and load[i] < self.max_in_flight:
                        plan = queue.popleft()
                        ref = actor.capture_shard.remote(run, plan, [token_ids[h] for h in plan.hashes])
                        in_flight[ref] = (i, plan)
                        load[i] += 1
                done, _ = self.ray.wait(list(in_flight), num_returns=1)
                ref = done[0]
                i, plan = in_flight.pop(ref)
                load[i] -= 1
                try:
                    result = self.ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    attempts[plan.shard] = attempts.get(plan.shard, 0) + 1
                    report["retries"] += 1
                    if attempts[plan.shard] > self.max_retries:
                        report["failures"].append({"shard": plan.shard, "error": f"{type(exc).__name__}: {exc}"[:500]})
                        continue
                    time.sleep(self.backoff_s * 2 ** (attempts[plan.shard] - 1))
                    queue.append(plan)
                    continue
                report["float16_overflow"] += result["float16_overflow"]
                report["replicas"][result["replica"]] = report["replicas"].get(result["replica"], 0) + 1
                bar.update(result["rows"])
                bar.set_postfix(shards=sum(report["replicas"].values()), retried=report["retries"])
        finally:
            bar.close()
            self.release_replicas()  # their CPUs/GPUs go to the reduce tasks
        if report["failures"]:
            shards = ", ".join(str(f["shard"]) for f in report["failures"])
            raise RunFailure(f"capture failed for shards {shards} after {self.max_retries} retries: "
                             f"{report['failures'][0]['error']}")
        return report

    def map(self, fn: Callable[..., Any], args: Sequence[tuple]) -> list[Any]:
        task = self.ray.remote(num_cpus=1, max_retries=self.max_retries)(fn)
        return self.ray.get([task.remote(*a) for a in args])
