"""The pipeline engine on the CPU: stages as worker threads, rows equal to single-device capture, faults contained."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cna_dist.capture.hf import HFBackend
from cna_dist.capture.pipeline import PipelineBackend
from cna_dist.prompts.batching import Limits
from tests.conftest import ENGINE_LIMITS_ARGS, joined_parts

LIMITS = Limits(**ENGINE_LIMITS_ARGS)


@pytest.fixture(scope="module")
def reference(engine_reference: dict) -> dict:
    """Single-device rows (float32) of the same calls, per model."""
    return {
        which: (path, calls, [joined_parts(p) for p, _ in want["float32"]])
        for which, (path, calls, want) in engine_reference.items()
    }


SPLITS = {
    "tiny_llama": [
        [(0, 4)],
        [(0, 2), (2, 4)],
        [(0, 1), (1, 4)],
        [(0, 1), (1, 3), (3, 4)],
        [(0, 1), (1, 2), (2, 3), (3, 4)],
    ],
    "tiny_qwen": [[(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]],
}


@pytest.mark.parametrize("which, ranges", [(w, r) for w, splits in SPLITS.items() for r in splits])
def test_rows_equal_single_device_capture_exactly(reference: dict, which: str, ranges: list) -> None:
    path, calls, expected = reference[which]
    backend = PipelineBackend.load(path, ranges, dtype="float32", gpus=0)
    try:
        for call, want in zip(calls, expected, strict=True):  # several shards back to back
            parts, overflow = backend.capture_parts(call, "float32", LIMITS)
            assert [(lo, hi) for lo, hi, _ in parts] == ranges and overflow == 0
            assert np.array_equal(joined_parts(parts), want)
    finally:
        backend.close()


def test_two_calls_at_once_interleave_and_each_gets_its_own_rows(reference: dict) -> None:
    path, calls, expected = reference["tiny_llama"]
    backend = PipelineBackend.load(path, [(0, 2), (2, 4)], dtype="float32", gpus=0)
    got: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        got[i] = joined_parts(backend.capture_parts(calls[i], "float32", LIMITS)[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend.close()
    for i in range(3):
        assert np.array_equal(got[i], expected[i])


def test_micro_batches_of_different_stages_are_in_flight_at_the_same_time(reference: dict) -> None:
    path, calls, _ = reference["tiny_llama"]
    backend = PipelineBackend.load(path, [(0, 1), (1, 2), (2, 4)], dtype="float32", gpus=0)
    spans: list[tuple[int, float, float]] = []
    for index, stage in enumerate(backend.stages):
        real = stage.forward

        def slow(x, mask, real=real, index=index):  # 50 ms per micro-batch and stage: the overlap is visible
            start = time.perf_counter()
            out = real(x, mask)
            time.sleep(0.05)
            spans.append((index, start, time.perf_counter()))
            return out

        stage.forward = slow
    backend.capture_parts(calls[0], "float32", LIMITS)
    backend.close()
    overlapping = {(a[0], b[0]) for a in spans for b in spans if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]}
    assert (0, 1) in overlapping and (1, 2) in overlapping and (0, 2) in overlapping


def test_each_stage_holds_only_its_layers(tiny_llama: Path) -> None:
    full = HFBackend.load(tiny_llama, dtype="float32", trust_remote_code=False).model
    per_layer = sum(p.numel() for p in full.model.layers[0].parameters())
    embed = full.model.embed_tokens.weight.numel()
    backend = PipelineBackend.load(tiny_llama, [(0, 1), (1, 4)], dtype="float32", gpus=0)
    counts = [sum(p.numel() for p in stage.parameters()) for stage in backend.stages]
    backend.close()
    assert counts == [embed + per_layer, 3 * per_layer]


def test_a_stage_that_raises_fails_only_that_call(reference: dict) -> None:
    path, calls, expected = reference["tiny_llama"]
    backend = PipelineBackend.load(path, [(0, 2), (2, 4)], dtype="float32", gpus=0)
    stage = backend.stages[1]
    real, seen = stage.forward, []

    def flaky(x, mask):
        seen.append(x.shape[0])
        if len(seen) == 2:
            raise RuntimeError("device lost on micro-batch 2")
        return real(x, mask)

    stage.forward = flaky
    with pytest.raises(RuntimeError, match="device lost on micro-batch 2"):
        backend.capture_parts(calls[0], "float32", LIMITS)
    assert len(seen) == 2  # the call's remaining micro-batches were drained, not computed
    stage.forward = real
    assert np.array_equal(joined_parts(backend.capture_parts(calls[1], "float32", LIMITS)[0]), expected[1])
    assert all(worker.is_alive() for worker in backend.workers)  # usable for the next shard
    backend.close()
    assert not any(worker.is_alive() for worker in backend.workers)
