"""A model replica: loads once, captures shards and writes them straight into the store; generates for eval.

Its model comes from the engine registry as a capture engine and, where the engine can generate, a generator
(`cna_dist.capture.backend`); generation, CAA and log-likelihood calls go to the generator and nothing else.

The same class runs in this process (InProcessExecutor) and as a Ray actor (RayExecutor), always with CONCURRENCY
(three) concurrent calls. A lock covers the compute part of `capture_shard` only, so while calls write their shards
(data, then the commit marker) another call already computes the next one, and a call waiting at the lock is
there the moment a compute ends: the devices do not sit idle during store writes, and a call still returns only
after its marker is written. With two calls the devices would wait whenever one shard's write (plus the driver's
turnaround) took longer than the next shard's compute, which at GPU rates is most of the time on a busy host
(benchmarks/write.py, `idle`); with three, writes may lag by a whole shard before compute waits.
Bounded: at most CONCURRENCY - 1 shards' rows wait in host memory for their writes (2 x 1.2 GB at 72B).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

from cna_dist.capture import engines
from cna_dist.capture import registry as engine_registry
from cna_dist.capture.backend import Advice, CaptureEngine, Generator
from cna_dist.errors import BadInput
from cna_dist.manifest import Manifest
from cna_dist.model import checkpoint
from cna_dist.prompts.batching import Limits
from cna_dist.prompts.packed import PackedIds
from cna_dist.store.activations import Run, ShardPlan, chunk_aligned

CONCURRENCY = 3  # calls a replica runs at once: one computes while up to two write their shards


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica is built from, taken from the manifest once; plain data, so it travels to actors."""

    model_uri: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)  # may hold keys
    dtype: str = "auto"
    trust_remote_code: bool = False
    gpus: int = 0
    max_memory_per_gpu: str | None = None
    capture_dtype: str = "float16"
    token_budget: int = 8192
    max_batch_size: int = 64
    backend: str = "hf"
    engine: str = "auto"  # auto | device_map | pipeline | stream, or a resolved single (cna_dist.capture.engines)
    stages: int | tuple[tuple[int, int], ...] | None = None  # the pipeline's split; None: one stage per GPU
    hidden_budget: int | None = None  # stream: a shard's hidden states beyond this wait in host memory
    fingerprint: str | None = None  # the driver's: a replica copies that very checkpoint, or fails naming it

    def limits(self, max_batch_size: int | None = None) -> Limits:
        return Limits(self.token_budget, max_batch_size or self.max_batch_size)

    @classmethod
    def from_manifest(cls, m: Manifest) -> ReplicaSpec:
        return cls(
            model_uri=m.model.uri,
            storage_options=dict(m.model.storage_options),
            dtype=m.model.dtype,
            trust_remote_code=m.model.trust_remote_code,
            gpus=m.model.gpus_per_replica,
            max_memory_per_gpu=m.model.max_memory_per_gpu,
            capture_dtype=m.capture.dtype,
            token_budget=m.capture.token_budget,
            max_batch_size=m.capture.max_batch_size,
            engine=m.model.engine,
            stages=tuple(map(tuple, m.model.stages)) if isinstance(m.model.stages, list) else m.model.stages,
            hidden_budget=m.model.stream_hidden_budget,
        )

    def for_generation(self) -> ReplicaSpec:
        """The same replica for eval, on the engine that generates for this one (`engines.generator_engine`)."""
        return replace(self, engine=engines.generator_engine(self.engine, self.gpus), stages=None, hidden_budget=None)


@dataclass(frozen=True)
class ShardResult:
    """What a capture call returns: a small report, never activations.

    compute_seconds: the capture itself. idle_seconds: how long the devices sat without work between the previous
    shard's compute and this one's on this replica (0 for the first), which in steady state is the compute time
    lost to store writes and dispatch. queued_seconds: how long the call waited for the lock, i.e. computed-behind-
    another-shard time, the overlap at work. write_seconds: data plus marker.
    """

    shard: int
    replica: str
    rows: int
    float16_overflow: int
    seconds: float
    compute_seconds: float
    idle_seconds: float
    queued_seconds: float
    write_seconds: float
    nbytes: int = 0  # activation bytes written


class Replica:
    def __init__(self, spec: ReplicaSpec, engine: CaptureEngine | None = None, generator: Generator | None = None):
        """Loads `spec`'s model (copied to this node first if remote), unless a loaded `engine` (and `generator`, if
        it generates) is given."""
        self.spec = spec
        if engine is None:
            loaded = engine_registry.load(
                spec, checkpoint.localize(spec.model_uri, spec.storage_options, fp=spec.fingerprint)
            )
            engine, generator = loaded.engine, loaded.generator
        self.engine, self.generator = engine, generator
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._compute_lock = threading.Lock()  # one computation at a time on this replica's devices
        self._compute_end: float | None = None  # when the last capture released the lock

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.engine.close()

    def capture_shard(self, run: Run, plan: ShardPlan, token_ids: list[list[int]] | PackedIds) -> ShardResult:
        """Capture under the compute lock, then write and commit outside it (overlapping the next compute)."""
        t0 = time.perf_counter()
        if isinstance(token_ids, PackedIds):  # unpacked here, on the replica: the driver never makes the lists
            token_ids = token_ids.to_lists()
        with nullcontext() if self.engine.concurrent else self._compute_lock:
            start = time.perf_counter()
            idle = 0.0 if self._compute_end is None else max(0.0, start - self._compute_end)
            try:
                parts, overflow = self.engine.capture_parts(token_ids, self.spec.capture_dtype, self.spec.limits())
            finally:
                self._compute_end = end = time.perf_counter()
        meta = run.meta
        written = [
            run.write_rows(plan, acts, slice(lo, hi))
            for lo, hi, acts in chunk_aligned(parts, meta.layers_per_chunk, meta.n_layers)
        ]
        run.commit(plan, written, writer=self.name, made_by=self.engine.made_by())
        done = time.perf_counter()
        return ShardResult(
            plan.shard,
            self.name,
            len(token_ids),
            overflow,
            done - t0,
            end - start,
            idle,
            start - t0,
            done - end,
            sum(part.nbytes for part in written),
        )

    def advise(self, mean_tokens: float) -> Advice | None:
        """The engine's advice on shard size (`rows`, `tokens`, `reason`), measured on this replica; None if it has
        no preference (single, device_map and pipeline keep the store's default)."""
        with self._compute_lock:
            return self.engine.advise(mean_tokens, self.spec.limits())

    def _generator(self) -> Generator:
        """This replica's generator; a replica whose engine captures only has none, which is the spec's fault."""
        if self.generator is None:
            raise BadInput(
                f"{self.spec.engine!r} captures only (engine {self.engine.name}): generation, CAA and log-likelihoods "
                f"run on one of {', '.join(engines.GENERATES)} (ReplicaSpec.for_generation picks it)",
                field="model.engine",
            )
        return self.generator

    def generate(
        self, token_ids: list[list[int]], condition: dict[str, Any], max_new_tokens: int, max_batch_size: int
    ) -> list[str]:
        """Greedy completions under `condition`: {"pairs", "multiplier"} scales neurons, {"caa", "alpha"} adds."""
        generator = self._generator()
        with self._compute_lock:
            return generator.generate(token_ids, condition, max_new_tokens, self.spec.limits(max_batch_size))

    def caa_vectors(self, pos_ids: list[list[int]], neg_ids: list[list[int]], layers: list[int]) -> dict[int, list]:
        """CAA's mean MLP-output difference per layer, as lists so they travel as plain data."""
        generator = self._generator()
        with self._compute_lock:
            return generator.caa_vectors(pos_ids, neg_ids, layers, self.spec.limits())

    def loglikelihoods(
        self, requests: list[tuple[list[int], list[int]]], condition: dict[str, Any], max_batch_size: int
    ) -> list[tuple[float, bool]]:
        """(log-probability, is-greedy) of each (context, continuation) pair under `condition`: what capability
        tasks score."""
        generator = self._generator()
        with self._compute_lock:
            return generator.loglikelihoods(requests, condition, self.spec.limits(max_batch_size))
