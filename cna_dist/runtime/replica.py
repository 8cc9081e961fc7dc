"""A model replica as a Ray actor: loads once, captures shards and writes them straight into the store.

The driver runs the actor with two concurrent calls. A lock covers the compute part of `capture_shard` only,
so while one call writes its shard (data, then its commit marker) the other call already computes the next
one: the GPU does not sit idle during store writes, and a call still returns only after its marker is written.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from cna_dist.io.store import Run, ShardPlan
from cna_dist.model import capture as capturemod
from cna_dist.model import checkpoint as modelmod


class Replica:
    """Plain class; the driver wraps it with ray.remote so it is testable without Ray."""

    def __init__(
        self,
        model_uri: str,
        storage_options: dict[str, Any],
        dtype: str,
        trust_remote_code: bool,
        gpus: int,
        max_memory_per_gpu: str | None,
        capture_dtype: str,
        token_budget: int,
        max_batch_size: int,
    ):
        import torch

        path = modelmod.localize(model_uri, storage_options)
        device_map = None
        max_memory = None
        if gpus > 0 and torch.cuda.is_available():
            device_map = "auto" if gpus > 1 else {"": 0}
            if max_memory_per_gpu:
                max_memory = {i: max_memory_per_gpu for i in range(torch.cuda.device_count())}
        self.model, self.tokenizer = modelmod.load(
            path, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory
        )
        self.capturer = capturemod.Capturer(self.model)
        self.capture_dtype = capture_dtype
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._compute_lock = threading.Lock()  # one capture at a time on this replica's devices
        self._compute_end: float | None = None  # when the last compute released the lock

    def pid(self) -> int:
        return os.getpid()

    def capture_shard(self, run: Run, plan: ShardPlan, token_ids: list[list[int]]) -> dict[str, Any]:
        """Capture under the compute lock, then write and commit outside it (overlapping the next compute).

        compute_seconds: the capture itself. idle_seconds: how long the devices sat without work between the
        previous shard's compute and this one's on this replica (0 for the first), which in steady state is
        the compute time lost to store writes and dispatch. queued_seconds: how long this call waited for the
        lock, i.e. computed-behind-another-shard time, the overlap at work. write_seconds: data plus marker.
        """
        t0 = time.perf_counter()
        with self._compute_lock:
            start = time.perf_counter()
            idle = 0.0 if self._compute_end is None else max(0.0, start - self._compute_end)
            try:
                out, overflow = capturemod.capture_with(
                    self.capturer,
                    token_ids,
                    self.tokenizer.pad_token_id,
                    dtype=self.capture_dtype,
                    token_budget=self.token_budget,
                    max_batch_size=self.max_batch_size,
                )
            finally:
                self._compute_end = end = time.perf_counter()
        run.write_shard(plan, out, writer=self.name)
        done = time.perf_counter()
        return {
            "shard": plan.shard,
            "replica": self.name,
            "rows": len(token_ids),
            "float16_overflow": overflow,
            "seconds": done - t0,
            "compute_seconds": end - start,
            "idle_seconds": idle,
            "queued_seconds": start - t0,
            "write_seconds": done - end,
        }

    # -- evaluation: the same loaded model generates under a steering condition ---------------------------------
    def generate(
        self, token_ids: list[list[int]], condition: dict[str, Any], max_new_tokens: int, max_batch_size: int
    ) -> list[str]:
        """Greedy completions under `condition`: {"pairs", "multiplier"} scales neurons, {"caa", "alpha"} adds."""
        from cna_dist.model import steer

        with self._compute_lock, steer.condition(self.model, condition):
            from cna_dist.model.generate import generate

            return generate(
                self.model,
                self.tokenizer,
                token_ids,
                max_new_tokens=max_new_tokens,
                max_batch_size=max_batch_size,
                token_budget=self.token_budget,
            )

    def caa_vectors(self, pos_ids: list[list[int]], neg_ids: list[list[int]], layers: list[int]) -> dict[int, list]:
        """CAA's mean MLP-output difference per layer, as lists so they travel as plain data."""
        from cna_dist.model import steer

        with self._compute_lock:
            vectors = steer.caa_vectors(
                self.model,
                pos_ids,
                neg_ids,
                self.tokenizer.pad_token_id,
                layers,
                token_budget=self.token_budget,
                max_batch_size=self.max_batch_size,
            )
        return {layer: v.tolist() for layer, v in vectors.items()}
