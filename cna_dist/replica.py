"""A model replica as a Ray actor: loads once, captures shards and writes them straight into the store."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from cna_dist import capture as capturemod
from cna_dist import model as modelmod
from cna_dist.store import Run, ShardPlan


class Replica:
    """Plain class; the driver wraps it with ray.remote so it is testable without Ray."""

    def __init__(self, model_uri: str, storage_options: dict[str, Any], dtype: str, trust_remote_code: bool,
                 gpus: int, max_memory_per_gpu: str | None, capture_dtype: str, token_budget: int,
                 max_batch_size: int):
        import torch

        path = modelmod.localize(model_uri, storage_options)
        device_map = None
        max_memory = None
        if gpus > 0 and torch.cuda.is_available():
            device_map = "auto" if gpus > 1 else {"": 0}
            if max_memory_per_gpu:
                max_memory = {i: max_memory_per_gpu for i in range(torch.cuda.device_count())}
        self.model, self.tokenizer = modelmod.load(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                   device_map=device_map, max_memory=max_memory)
        self.capturer = capturemod.Capturer(self.model)
        self.capture_dtype = capture_dtype
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def pid(self) -> int:
        return os.getpid()

    def capture_shard(self, run: Run, plan: ShardPlan, token_ids: list[list[int]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        out, overflow = capturemod.capture_with(self.capturer, token_ids, self.tokenizer.pad_token_id,
                                                dtype=self.capture_dtype, token_budget=self.token_budget,
                                                max_batch_size=self.max_batch_size)
        run.write_shard(plan, out, writer=self.name)
        return {"shard": plan.shard, "replica": self.name, "rows": len(token_ids), "float16_overflow": overflow,
                "seconds": time.perf_counter() - t0}
