"""The layer-streaming engine: a whole shard goes through the model one decoder layer at a time.

Capture needs no KV cache and no generation, so nothing forces the whole model onto the device at once: load
layer l (`cna_dist.capture.stage`, the embedding with layer 0), run every micro-batch of the shard through it (the
same length-bucketed batches single-device capture makes, so every row equals it), keep each micro-batch's
last-token down_proj input, release the layer, go on with layer l+1. A single loader thread reads layer l+1 while
layer l computes, so the device holds at most two layers plus the shard's hidden states, and one device of any
size captures any model (at one read of the weights per shard).

On CUDA the loader copies on its own stream; the compute stream waits for its event before using the layer, and
the loader's stream waits for the compute stream's event before reusing a released layer's memory. Nothing in a
layer waits on the host: its rows are converted on the device and copied to pinned memory with an event, and are
filed into the shard's array one layer later. Hidden states that would not fit `hidden_budget_bytes` stay in
(pinned) host memory and each micro-batch's go to the device only when its turn comes.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cna_dist.capture.backend import Advice, Part, Prompts
from cna_dist.capture.engines import compute_bound_tokens
from cna_dist.capture.plumbing import STORE_DTYPES, check_store_dtype, devices, made_by, to_store
from cna_dist.capture.plumbing import event as _event
from cna_dist.capture.stage import Stage, load_stage, stage_config
from cna_dist.model import arch
from cna_dist.model.checkpoint import inspect, load_tokenizer, torch_dtype
from cna_dist.prompts.batching import Batch, Limits, batches


class _Hidden:
    """Each micro-batch's input to the next layer: input ids at first, then hidden states, kept on the device or,
    spilled, in (pinned) host buffers reused layer after layer, uploaded when the micro-batch's turn comes."""

    def __init__(self, plan: list[Batch], device: torch.device, spill: bool):
        self.device, self.spill = device, spill
        self.x: list[torch.Tensor] = [b.input_ids for b in plan]
        self.host: list[torch.Tensor | None] = [None] * len(plan)

    def get(self, i: int) -> torch.Tensor:
        return self.x[i].to(self.device, non_blocking=True)

    def put(self, i: int, hidden: torch.Tensor) -> None:
        if not self.spill:
            self.x[i] = hidden
            return
        if self.host[i] is None:
            pin = self.device.type == "cuda"
            self.host[i] = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=pin)
        self.host[i].copy_(hidden, non_blocking=True)  # ordered on the compute stream before the next upload
        self.x[i] = self.host[i]


class _Filer:
    """Each layer's rows into the shard's host array, in prompt order. On CUDA through one of two pinned slots and
    an event, filed once the next layer is queued, so the host never waits on the layer it has just queued."""

    def __init__(self, out: np.ndarray, plan: list[Batch], stream: Any):
        self.out, self.stream = out, stream
        self.order = np.array([i for b in plan for i in b.indices], dtype=np.int64)  # rows' plan order
        self.slots: list[torch.Tensor] = []
        self.pending: tuple[int, torch.Tensor, Any] | None = None

    def file(self, layer: int, rows: torch.Tensor) -> None:
        if self.stream is None:
            self.out[self.order, layer] = rows.numpy()
            return
        if len(self.slots) < 2:
            self.slots.append(torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True))
        host = self.slots[layer % 2]
        host.copy_(rows, non_blocking=True)
        queued = (layer, host, _event(self.stream))
        self.finish()
        self.pending = queued

    def finish(self) -> None:
        if self.pending is not None:
            layer, host, event = self.pending
            event.synchronize()
            self.out[self.order, layer] = host.numpy()
            self.pending = None


class StreamBackend:
    """A `CaptureEngine` that streams layers through one device. It captures only: eval of a stream manifest
    generates on the single engine.

    `hidden_budget_bytes`: the most the shard's hidden states may take on the device (None: no limit); beyond it
    they are spilled to host memory. `peak_live_layers` is the most layers ever loaded and not yet released.
    """

    name = "stream"
    concurrent = False  # one shard streams at a time: the replica serialises calls

    def __init__(
        self, path: Path, pad_id: int, *, device: str | torch.device, dtype: str, hidden_budget_bytes: int | None = None
    ):
        info = inspect(str(path))
        self.config = stage_config(Path(path))  # parsed once, not once per layer and shard
        self.path, self.pad_id, self.dtype = Path(path), pad_id, dtype
        self.device = torch.device(device)
        self.n_layers, self.intermediate_size = info.n_layers, arch.of(self.config).width(self.config)
        self.hidden_size = info.hidden_size
        self.hidden_budget_bytes = hidden_budget_bytes
        cuda = self.device.type == "cuda"
        self._side = torch.cuda.Stream(self.device) if cuda else None  # the loader's copies
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cna-stream-load")
        self._lock = threading.Lock()
        self._live = 0
        self.peak_live_layers = 0
        self.spilled = False  # whether the last call kept its hidden states on the host

    @classmethod
    def load(cls, path: Path, *, dtype: str, gpus: int, hidden_budget_bytes: int | None = None) -> StreamBackend:
        """Reads only the config and tokenizer now; the weights are read layer by layer, once per shard."""
        device = devices(1, gpus)[0]
        return cls(
            path, load_tokenizer(path).pad_token_id, device=device, dtype=dtype, hidden_budget_bytes=hidden_budget_bytes
        )

    def made_by(self) -> dict[str, str]:
        return made_by("hf", self.name)

    def capture_parts(self, token_ids: Prompts, dtype: str, limits: Limits) -> tuple[list[Part], int]:
        """Every prompt's rows as one part [prompt, layer, neuron] covering all layers, and the float16 overflow."""
        check_store_dtype(dtype)
        out = np.empty((len(token_ids), self.n_layers, self.intermediate_size), dtype=STORE_DTYPES[dtype])
        cuda = self._side is not None
        plan = list(batches(token_ids, self.pad_id, limits.token_budget, limits.max_batch_size, pin=cuda))
        if not plan:
            return [(0, self.n_layers, out)], 0
        self.spilled = self._spills(plan)
        hidden = _Hidden(plan, self.device, self.spilled)
        masks = [b.attention_mask.to(self.device, non_blocking=True) for b in plan]
        filer = _Filer(out, plan, self._compute_stream())
        overflow = torch.zeros((), dtype=torch.int64, device=self.device)
        self._stream_layers(plan, masks, hidden, filer, dtype, overflow)
        filer.finish()
        return [(0, self.n_layers, out)], int(overflow.item())

    def _spills(self, plan: list[Batch]) -> bool:
        if self.hidden_budget_bytes is None:
            return False
        tokens = sum(b.input_ids.numel() for b in plan)
        return tokens * self.hidden_size * torch_dtype(self.dtype).itemsize > self.hidden_budget_bytes

    def _stream_layers(
        self, plan: list[Batch], masks: list[torch.Tensor], hidden: _Hidden, filer: _Filer, dtype: str, overflow: Any
    ) -> None:
        """Layer after layer over every micro-batch, the next layer loading meanwhile; at most two layers alive."""
        pending: Future | None = self._loader.submit(self._load, 0, None)
        try:
            for layer in range(self.n_layers):
                stage = self._take(pending)
                pending = None  # the future would keep the stage alive after its release
                try:
                    if layer + 1 < self.n_layers:
                        pending = self._loader.submit(self._load, layer + 1, _event(self._compute_stream()))
                    filer.file(layer, self._run_layer(stage, plan, masks, hidden, dtype, overflow))
                finally:
                    self._release()
                    del stage
        finally:
            if pending is not None:
                self._discard(pending)

    def _layer(self, layer: int) -> Stage:
        return load_stage(self.path, layer, layer + 1, device=self.device, dtype=self.dtype, config=self.config)

    def _compute_stream(self) -> Any:
        return None if self._side is None else torch.cuda.current_stream(self.device)

    def _load(self, layer: int, freed: Any) -> tuple[Stage, Any]:
        """Layer `layer` (with the embedding when 0), on the loader's thread and stream: its copies wait for `freed`,
        the compute stream's event after the previous layer, whose memory the allocator may hand out again."""
        with torch.cuda.stream(self._side) if self._side is not None else nullcontext():
            if freed is not None:
                self._side.wait_event(freed)
            stage = self._layer(layer)
            ready = _event(self._side)
        with self._lock:
            self._live += 1
            self.peak_live_layers = max(self.peak_live_layers, self._live)
        return stage, ready

    def _take(self, pending: Future) -> Stage:
        stage, ready = pending.result()
        if ready is not None:
            compute = self._compute_stream()
            compute.wait_event(ready)
            # The weights were allocated on the loader's stream and are read on this one. Without this, `del stage`
            # hands their blocks back to the loader stream's pool at once, while this stream may still be computing
            # with them, and the next layer's load can be copied into them (`freed` is recorded before this layer's
            # compute is queued): rows silently wrong, on CUDA only. record_stream keeps each block out of the pool
            # until the work queued here by the time of its release has run.
            for tensor in (*stage.parameters(), *stage.buffers()):
                tensor.record_stream(compute)
        return stage

    def _release(self) -> None:
        with self._lock:
            self._live -= 1

    def _discard(self, pending: Future) -> None:
        """A prefetched layer a failed call will not use: wait for its load, then let it go."""
        try:
            pending.result()
        except Exception:
            return
        self._release()

    @torch.inference_mode()
    def _run_layer(
        self, stage: Stage, plan: list[Batch], masks: list[torch.Tensor], hidden: _Hidden, dtype: str, overflow: Any
    ) -> torch.Tensor:
        """One layer over every micro-batch: its rows [prompts in plan order, neurons], in the store dtype."""
        n_rows = sum(len(b.indices) for b in plan)
        rows = torch.empty((n_rows, self.intermediate_size), dtype=stage.dtype, device=self.device)
        recorder = stage.recorder()
        start = 0
        try:
            for i, batch in enumerate(plan):
                with recorder.into(rows[start : start + len(batch.indices)].unsqueeze(1)):  # [rows, 1 layer, neurons]
                    hidden.put(i, stage(hidden.get(i), masks[i]))
                start += len(batch.indices)
        finally:
            recorder.close()
        return to_store(rows, dtype, overflow)

    def advise(self, mean_tokens: float, limits: Limits) -> Advice:
        """How many prompts a shard needs to keep the device compute-bound, measured here: one layer's load time
        (the real path: safetensors to the device) against its compute speed on batches of `mean_tokens` tokens."""
        layer = self.n_layers // 2  # a plain decoder layer (layer 0 also loads the embedding)
        warm = self._layer(layer)  # the first load pays imports and caches, not what a steady load costs
        del warm
        self._sync()
        start = time.perf_counter()
        stage = self._layer(layer)
        self._sync()
        load_s = time.perf_counter() - start
        weight_bytes = sum(p.numel() * p.element_size() for p in stage.parameters())
        tokens_per_s = self._speed(stage, max(1, round(mean_tokens)), limits)
        tokens = compute_bound_tokens(load_s, tokens_per_s)
        rows = max(1, math.ceil(tokens / max(mean_tokens, 1.0)))
        reason = (
            f"a layer ({weight_bytes / 2**20:.0f} MiB) loads in {load_s * 1e3:.1f} ms "
            f"({weight_bytes / load_s / 2**30:.2f} GiB/s) and computes {tokens_per_s:,.0f} tokens/s on {self.device}: "
            f"a shard needs >= {tokens} tokens (2x the break-even) = {rows} prompts of {mean_tokens:.0f} tokens"
        )
        return {"rows": rows, "tokens": tokens, "reason": reason}

    @torch.inference_mode()
    def _speed(self, stage: Stage, width: int, limits: Limits) -> float:
        """Tokens/s of one layer on synthetic hidden states shaped like the shard's batches (median of 3)."""
        rows = max(1, min(limits.max_batch_size, limits.token_budget // width))
        x = torch.randn((rows, width, self.hidden_size), dtype=stage.dtype, device=self.device)
        mask = torch.ones((rows, width), dtype=torch.int64, device=self.device)
        stage(x, mask)  # warm-up: kernels, allocator
        times = []
        for _ in range(3):
            self._sync()
            start = time.perf_counter()
            stage(x, mask)
            self._sync()
            times.append(time.perf_counter() - start)
        return rows * width / sorted(times)[1]

    def _sync(self) -> None:
        if self._side is not None:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._loader.shutdown(wait=True)
