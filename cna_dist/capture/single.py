"""Single-device capture: every layer's neurons (the input of mlp.down_proj for dense families) at the last real
token, batched by length under a token budget.

The forward is a one-stage run of `cna_dist.capture.stage.Stage` over the loaded model's own modules, the same code
pipeline stages and the stream engine run, and the rows come from the family's recorder (`cna_dist.model.arch`).
Rows are left-padded, so the last real token of every row sits at position -1 and the recorder gathers
`x[:, -1]` on the device. Position ids come from the attention mask so a padded row sees exactly the
positions it would see alone.

On CUDA nothing inside a batch waits for the GPU: inputs come from pinned memory, the attention mask is built
on the device as a 4D SDPA mask (transformers' own 2D-mask path reads the mask on the host to decide whether it
may skip it), the store-dtype conversion and the float16 overflow count run on the device, and each batch ends
with one asynchronous copy into a pinned host slot plus a CUDA event. The host waits on that event only after
it has queued the next batch, so the GPU computes batch k+1 while the host files away batch k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cna_dist.capture.plumbing import STORE_DTYPES, check_store_dtype, to_store
from cna_dist.capture.stage import Stage
from cna_dist.capture.trim import LastLayerTrim
from cna_dist.model import arch
from cna_dist.model.rows import LastTokenRows
from cna_dist.prompts.batching import Batch, batches

__all__ = [
    "STORE_DTYPES",
    "Capturer",
    "LastTokenRows",
    "Pending",
    "capture_with",
    "to_store",
]


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


class Capturer:
    """The model as one stage; its recorder's hooks registered once; each forward fills one device buffer
    [batch, layer, neuron]."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.stage = Stage.of_model(model)
        self.n_layers = self.stage.hi
        self.intermediate_size = self.stage.width
        self.device = self.stage.device
        self.cuda = self.device.type == "cuda"
        self._rows = self.stage.recorder()  # registered once, for the capturer's life
        self._trim = self._last_layer_trim()  # after _rows: the last row is recorded, then the forward stops
        self._slots: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._submitted = 0

    def _last_layer_trim(self) -> LastLayerTrim | None:
        """Nothing past the last layer's down_proj input (dense families; a MoE layer's rows are recorded from its
        experts' inputs, so it runs whole)."""
        if self.stage.family.model_type in arch.MOE:
            return None
        return LastLayerTrim(self.stage.family.neuron(self.stage.layers[-1]))

    def close(self) -> None:
        self._rows.close()
        if self._trim is not None:
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
        shape = (batch.input_ids.shape[0], self.n_layers, self.intermediate_size)
        buffer = torch.empty(shape, dtype=self.stage.dtype, device=self.device)
        with self._rows.into(buffer), self._trim.active() if self._trim is not None else nullcontext():
            self.stage(batch.input_ids, batch.attention_mask)
        return buffer

    @torch.inference_mode()
    def submit(self, batch: Batch, dtype: str, overflow: torch.Tensor) -> Pending:
        """Queue one batch without waiting for it: forward, store-dtype conversion, one copy to the host.

        Values beyond float16's range saturate and are added to `overflow` (a device counter,
        `cna_dist.capture.plumbing.to_store`). On CUDA the result lands in a pinned slot that the next-but-one
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
    check_store_dtype(dtype)
    out = np.empty((len(token_ids), capturer.n_layers, capturer.intermediate_size), dtype=STORE_DTYPES[dtype])
    overflow = torch.zeros((), dtype=torch.int64, device=capturer.device)
    pending: Pending | None = None

    def file(done: Pending) -> None:
        out[done.batch.indices] = done.result()
        if on_batch is not None:
            on_batch(done.batch)

    for batch in batches(token_ids, pad_id, token_budget, max_batch_size, pin=capturer.cuda):
        submitted = capturer.submit(batch, dtype, overflow)
        if pending is not None:
            file(pending)
        pending = submitted
    if pending is not None:
        file(pending)
    return out, capturer.read_count(overflow)
