"""The pipeline engine: one worker per stage, micro-batches in flight on every stage at once.

A replica's decoder layers are split into stages (`cna_dist.capture.stage`), each on its own device with its own
CUDA stream (on a CPU replica, all on the CPU: that is how tests and users without GPUs run it). A capture call
puts its shard's micro-batches (the same length-bucketed batches single-device capture makes, so every row
equals it) on the first stage's bounded queue; each worker runs its stage, keeps its layers' last-token rows, and
hands the hidden states to the next stage. Calls of two shards may feed the pipeline one after the other, so it
fills and drains once per run, not once per shard.

On CUDA nothing inside the pipeline waits on the host: a stage waits for the previous stage's CUDA event on its
own stream, copies rows to pinned memory without blocking, and a call synchronises only on its own rows' events
once its last micro-batch has left the last stage.

A stage that raises fails only the call whose micro-batch it was: the other stages skip that call's remaining
micro-batches, the call raises once all of them have drained, and the pipeline goes on with the next call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cna_dist.capture.backend import Advice, Part, Prompts
from cna_dist.capture.pinned import PinnedRing
from cna_dist.capture.plumbing import STORE_DTYPES, devices, event, made_by, to_store
from cna_dist.capture.stage import Stage, load_stage
from cna_dist.model.checkpoint import load_tokenizer
from cna_dist.prompts.batching import Batch, Limits, batches

QUEUE_DEPTH = 2  # micro-batches waiting in front of each stage: enough to keep it busy, bounded for memory
_STOP = object()


@dataclass
class _Call:
    """One capture call: its rows per stage, its first error, and when its last micro-batch has left."""

    n_batches: int
    dtype: str
    rows: list[np.ndarray]
    overflow: list[torch.Tensor]
    finished: int = 0
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            self.error = self.error or exc

    def batch_left(self) -> None:
        with self.lock:
            self.finished += 1
            if self.finished == self.n_batches:
                self.done.set()


@dataclass
class _Item:
    call: _Call
    batch: Batch
    x: torch.Tensor  # input ids for the first stage, hidden states after it
    ready: Any = None  # CUDA event after which `x` may be read


class _Worker(threading.Thread):
    """Runs one stage over the micro-batches of its inbox, in order, and passes them on."""

    def __init__(
        self, index: int, stage: Stage, inbox: queue.Queue, outbox: queue.Queue | None, next_device: torch.device | None
    ):
        super().__init__(name=f"cna-stage-{index}", daemon=True)
        self.index, self.stage, self.inbox, self.outbox = index, stage, inbox, outbox
        self.next_device = next_device
        self.cuda = stage.device.type == "cuda"
        self.stream = torch.cuda.Stream(stage.device) if self.cuda else None
        self.width = stage.width
        self.rows = stage.recorder()
        # a fixed set of pinned buffers for this stage's rows, not a new one per micro-batch (kept by PyTorch forever)
        self.ring = PinnedRing() if self.cuda else None

    def run(self) -> None:
        while (item := self.inbox.get()) is not _STOP:
            if item.call.error is None:
                try:
                    self._step(item)
                except BaseException as exc:  # noqa: BLE001 - fails this call only; the pipeline goes on
                    item.call.fail(exc)
            if self.outbox is not None:
                self.outbox.put(item)
            else:
                item.call.batch_left()
        self.rows.close()
        if self.outbox is not None:
            self.outbox.put(_STOP)

    @torch.inference_mode()
    def _step(self, item: _Item) -> None:
        device, call = self.stage.device, item.call
        with torch.cuda.stream(self.stream) if self.cuda else nullcontext():
            if item.ready is not None:  # the previous stage's kernels and its copy of `x` onto this device
                torch.cuda.current_stream(device).wait_event(item.ready)
                item.x.record_stream(torch.cuda.current_stream(device))
            x = item.x.to(device, non_blocking=True)  # input ids from pinned host memory on the first stage
            mask = item.batch.attention_mask.to(device, non_blocking=True)
            shape = (x.shape[0], self.stage.hi - self.stage.lo, self.width)
            with self.rows.into(torch.empty(shape, dtype=self.stage.dtype, device=device)) as buffer:
                hidden = self.stage(x, mask)
            values = to_store(buffer, call.dtype, call.overflow[self.index])
            self._file(item, values)
            if self.next_device is not None:  # sent by this stage, on its stream: ordered after the compute
                hidden = hidden.to(self.next_device, non_blocking=True)
            item.x, item.ready = hidden, self._event()

    def _file(self, item: _Item, values: torch.Tensor) -> None:
        if not self.cuda:
            item.call.rows[self.index][item.batch.indices] = values.numpy()
            return
        self.ring.put(values, item.call.rows[self.index], item.batch.indices)

    def _event(self) -> Any:
        return event(torch.cuda.current_stream(self.stage.device)) if self.cuda else None


class PipelineBackend:
    """A `CaptureEngine` whose capture runs through a pipeline of stages. It captures only: generation needs the KV
    cache and the whole model per step, so eval of a pipeline manifest generates on the device_map engine."""

    name = "pipeline"
    concurrent = True  # calls feed the pipeline one after another themselves: the replica holds no compute lock

    def __init__(self, stages: list[Stage], pad_id: int, queue_depth: int = QUEUE_DEPTH):
        self.stages, self.pad_id = stages, pad_id
        self.n_layers = stages[-1].hi
        self.intermediate_size = stages[0].width
        boxes: list[queue.Queue] = [queue.Queue(maxsize=queue_depth) for _ in stages]
        nexts = [(boxes[i + 1], stages[i + 1].device) for i in range(len(stages) - 1)] + [(None, None)]
        self.workers = [_Worker(i, stage, boxes[i], *nexts[i]) for i, stage in enumerate(stages)]
        self._feed = threading.Lock()  # one call's micro-batches enter the pipeline together, in order
        for worker in self.workers:
            worker.start()

    @classmethod
    def load(cls, path: Path, ranges: Sequence[tuple[int, int]], *, dtype: str, gpus: int) -> PipelineBackend:
        """Each stage loads only its own layers from the checkpoint's safetensors (never the whole model)."""
        on = devices(len(ranges), gpus)
        stages = [load_stage(path, lo, hi, device=d, dtype=dtype) for (lo, hi), d in zip(ranges, on, strict=True)]
        return cls(stages, load_tokenizer(path).pad_token_id)

    def made_by(self) -> dict[str, str]:
        return made_by("hf", self.name, stages=",".join(f"{s.lo}-{s.hi}@{s.device}" for s in self.stages))

    def capture_parts(self, token_ids: Prompts, dtype: str, limits: Limits) -> tuple[list[Part], int]:
        """Every prompt's rows, one part per stage ([prompt, stage's layers, neuron]), and the float16 overflow."""
        pin = self.workers[0].cuda
        plan = list(batches(token_ids, self.pad_id, limits.token_budget, limits.max_batch_size, pin=pin))
        call = _Call(
            len(plan),
            dtype,
            [self._rows(len(token_ids), s, dtype) for s in self.stages],
            [self._counter(w) for w in self.workers],
        )
        if not plan:
            return self._parts(call), 0
        with self._feed:
            for batch in plan:
                self.workers[0].inbox.put(_Item(call, batch, batch.input_ids))
        call.done.wait()
        # Every copy of this call's rows is waited for and filed, also when it failed: its rows and counters must
        # not be freed while a worker stream's copy or count into them is still queued.
        for worker in self.workers:
            if worker.ring is not None:
                worker.ring.flush()
        if call.error is not None:
            raise call.error
        overflow = sum(int(c.cpu()) for c in call.overflow)
        return self._parts(call), overflow

    @staticmethod
    def _counter(worker: _Worker) -> torch.Tensor:
        """A stage's float16-overflow counter, zero-filled on the worker's own stream: filled on the caller's, the
        worker's additions (on a non-blocking stream that never waits for the caller's) could run before the fill,
        and a counter freed on the error path would go back to the caller's pool with additions still queued."""
        with torch.cuda.stream(worker.stream) if worker.cuda else nullcontext():
            return torch.zeros((), dtype=torch.int64, device=worker.stage.device)

    def _rows(self, n: int, stage: Stage, dtype: str) -> np.ndarray:
        return np.empty((n, stage.hi - stage.lo, self.intermediate_size), dtype=STORE_DTYPES[dtype])

    def _parts(self, call: _Call) -> list[Part]:
        return [(s.lo, s.hi, rows) for s, rows in zip(self.stages, call.rows, strict=True)]

    def advise(self, mean_tokens: float, limits: Limits) -> Advice | None:
        """No preference: every stage keeps its layers, so any shard size keeps the pipeline busy."""
        return None

    def close(self) -> None:
        self.workers[0].inbox.put(_STOP)
        for worker in self.workers:
            worker.join()
