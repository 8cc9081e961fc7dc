"""Capture: the input of every mlp.down_proj at the last real token, batched by length under a token budget.

Rows are left-padded, so the last real token of every row sits at position -1 and the hook gathers
`x[:, -1]` on the device. Position ids come from the attention mask so a padded row sees exactly the
positions it would see alone.

On CUDA nothing inside a batch waits for the GPU: inputs come from pinned memory, the attention mask is built
on the device as a 4D SDPA mask (transformers' own 2D-mask path reads the mask on the host to decide whether it
may skip it), the store-dtype conversion and the float16 overflow count run on the device, and each batch ends
with one asynchronous copy into a pinned host slot plus a CUDA event. The host waits on that event only after
it has queued the next batch, so the GPU computes batch k+1 while the host files away batch k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cna_dist.model.batching import Batch, batches
from cna_dist.model.hf import decoder, device_mask_maker, down_projs
from cna_dist.model.prefix import SharedPrefix, shared_length, supported
from cna_dist.model.trim import LastLayerTrim

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
_TORCH_STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Pending:
    """One submitted batch: `host` is filled once `event` has completed (no event on CPU: already filled)."""

    batch: Batch
    host: torch.Tensor
    event: Any = None

    def result(self) -> np.ndarray:
        """Wait for this batch only (the one per-batch sync) and view its rows; valid until two submits later."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


class LastTokenRows:
    """Forward pre-hooks on down_proj modules: inside `into(buffer)`, each forward writes module k's input at the last
    position (left padding puts every row's last real token there) into buffer[:, k], on the device.

    Single-device capture, pipeline stages and the stream engine all record rows through this one mechanism.
    """

    def __init__(self, projs: Sequence[torch.nn.Module]):
        self.buffer: torch.Tensor | None = None
        self._handles = [p.register_forward_pre_hook(self._hook(k)) for k, p in enumerate(projs)]

    def _hook(self, k: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if self.buffer is not None:
                self.buffer[:, k].copy_(args[0][:, -1], non_blocking=True)

        return hook

    @contextmanager
    def into(self, buffer: torch.Tensor) -> Iterator[torch.Tensor]:
        self.buffer = buffer
        try:
            yield buffer
        finally:
            self.buffer = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Capturer:
    """Hooks registered once on every down_proj; each forward fills one device buffer [batch, layer, neuron]."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.decoder = decoder(model)
        self.projs = down_projs(model)
        self.n_layers = len(self.projs)
        self.intermediate_size = self.projs[0].in_features
        self.device = self.decoder.embed_tokens.weight.device
        self.cuda = self.device.type == "cuda"
        self._attention_mask = device_mask_maker(model)
        self._rows = LastTokenRows(self.projs)  # registered once, for the capturer's life
        self._trim = LastLayerTrim(self.decoder.layers[-1].mlp, self.projs[-1])  # after _rows: records, then stops
        self._prefix: SharedPrefix | None = None  # set by capture_with while its prompts share one
        self._slots: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._submitted = 0

    def close(self) -> None:
        self._rows.close()
        self._trim.close()

    def __enter__(self) -> Capturer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slot(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """One of two pinned host buffers, alternating per batch, grown on demand (reused: pinning is slow)."""
        key = (self._submitted % 2, dtype)
        slot = self._slots.get(key)
        if slot is None or slot.shape[0] < rows:
            slot = torch.empty((rows, self.n_layers, self.intermediate_size), dtype=dtype, pin_memory=True)
            self._slots[key] = slot
        return slot[:rows]

    @torch.inference_mode()
    def _run(self, batch: Batch) -> torch.Tensor:
        """The decoder stack only (no lm_head) on one batch; returns the filled device buffer, model dtype."""
        ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        if self._prefix is not None:
            inputs = self._prefix.inputs(mask)
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            inputs = {"attention_mask": self._attention_mask(mask), "position_ids": positions, "use_cache": False}
        dtype = self.projs[0].weight.dtype
        buffer = torch.empty((ids.shape[0], self.n_layers, self.intermediate_size), dtype=dtype, device=self.device)
        with self._rows.into(buffer), self._trim.active():
            self.decoder(input_ids=ids, **inputs)
        return buffer

    @torch.inference_mode()
    def submit(self, batch: Batch, dtype: str, overflow: torch.Tensor) -> Pending:
        """Queue one batch without waiting for it: forward, store-dtype conversion, one copy to the host.

        Values beyond float16's range saturate and are added to `overflow` (a device counter) exactly as
        `to_store_dtype` would count them. On CUDA the result lands in a pinned slot that the next-but-one
        submit reuses, so read it (Pending.result) before then.
        """
        values = to_store(self._run(batch), dtype, overflow)
        if not self.cuda:
            return Pending(batch, values.cpu())
        host = self._slot(values.shape[0], values.dtype)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._submitted += 1
        return Pending(batch, host, event)

    def read_count(self, counter: torch.Tensor) -> int:
        """A device counter's value through a pinned copy and an event: the same kind of wait as a batch's."""
        if not self.cuda:
            return int(counter.numpy())
        host = torch.empty((), dtype=counter.dtype, pin_memory=True)
        host.copy_(counter, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        event.synchronize()
        return int(host.numpy())

    def forward(self, batch: Batch) -> torch.Tensor:
        """Activations [rows, layers, neurons] on the host, in the model's dtype (synchronous convenience)."""
        return self._run(batch).to("cpu")


def to_store(values: torch.Tensor, dtype: str, overflow: torch.Tensor) -> torch.Tensor:
    """The store dtype on the values' device; beyond float16's range saturates and is added to `overflow`."""
    values = values.float()
    if dtype == "float16":
        overflow += (values.abs() > FLOAT16_MAX).sum()
        values = values.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return values.to(_TORCH_STORE_DTYPES[dtype])


def to_store_dtype(acts: torch.Tensor, dtype: str) -> tuple[np.ndarray, int]:
    """Convert to the stored dtype; values beyond float16's range saturate and are counted, never inf."""
    values = acts.float().numpy()
    overflow = 0
    if dtype == "float16":
        over = np.abs(values) > FLOAT16_MAX
        overflow = int(over.sum())
        if overflow:
            values = np.clip(values, -FLOAT16_MAX, FLOAT16_MAX)
    return values.astype(STORE_DTYPES[dtype]), overflow


def capture_with(
    capturer: Capturer,
    token_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    dtype: str = "float32",
    token_budget: int = 8192,
    max_batch_size: int = 64,
    on_batch: Callable[[Batch], None] | None = None,
) -> tuple[np.ndarray, int]:
    """All prompts' activations [prompt, layer, neuron] in prompt order, plus the float16 overflow count.

    Batch k+1 is queued before batch k is waited for and filed, so the host's copy into `out` overlaps the
    GPU's next forward; the overflow count is read once, at the end. On CUDA the only waits are those events:
    the loop runs clean under `torch.cuda.set_sync_debug_mode("error")`.
    """
    if dtype not in STORE_DTYPES:
        raise ValueError(f"capture dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    out = np.empty((len(token_ids), capturer.n_layers, capturer.intermediate_size), dtype=STORE_DTYPES[dtype])
    overflow = torch.zeros((), dtype=torch.int64, device=capturer.device)
    pending: Pending | None = None

    def file(done: Pending) -> None:
        out[done.batch.indices] = done.result()
        if on_batch is not None:
            on_batch(done.batch)

    shared = shared_length(token_ids) if supported(getattr(capturer.model, "config", None)) else 0
    if shared:  # computed once; every batch runs only the rest (cna_dist.model.prefix)
        capturer._prefix = SharedPrefix(capturer.decoder, token_ids[0][:shared], capturer.device)
        token_ids = [ids[shared:] for ids in token_ids]
    try:
        for batch in batches(token_ids, pad_id, token_budget, max_batch_size, pin=capturer.cuda):
            submitted = capturer.submit(batch, dtype, overflow)
            if pending is not None:
                file(pending)
            pending = submitted
        if pending is not None:
            file(pending)
    finally:
        capturer._prefix = None
    return out, capturer.read_count(overflow)


def capture(
    model: torch.nn.Module, token_ids: Sequence[Sequence[int]], pad_id: int, **kwargs: Any
) -> tuple[np.ndarray, int]:
    """capture_with on hooks registered for this call only; replicas keep one Capturer for their lifetime."""
    with Capturer(model) as capturer:
        return capture_with(capturer, token_ids, pad_id, **kwargs)
