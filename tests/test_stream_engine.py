"""The layer-streaming engine on the CPU: rows equal to single-device capture, at most two layers alive, small RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from cna_dist.capture import stream
from cna_dist.capture.stream import StreamBackend
from cna_dist.prompts.batching import Limits
from tests.conftest import ENGINE_LIMITS_ARGS, joined_parts

LIMITS = Limits(**ENGINE_LIMITS_ARGS)


@pytest.fixture(scope="module")
def reference(engine_reference: dict) -> dict:
    return engine_reference


@pytest.mark.parametrize("budget", [None, 1], ids=["on-device", "spilled"])
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen"])
def test_rows_equal_single_device_capture_exactly(reference: dict, which: str, budget: int | None) -> None:
    path, calls, want = reference[which]
    backend = StreamBackend.load(path, dtype="float32", gpus=0, hidden_budget_bytes=budget)
    try:
        for dtype in ("float32", "float16"):
            for call, (parts_want, overflow_want) in zip(calls, want[dtype], strict=True):  # shards back to back
                parts, overflow = backend.capture_parts(call, dtype, LIMITS)
                assert backend.spilled == (budget is not None)
                assert overflow == overflow_want
                got = joined_parts(parts)
                assert got.dtype == joined_parts(parts_want).dtype
                assert np.array_equal(got, joined_parts(parts_want))
    finally:
        backend.close()
    assert backend.peak_live_layers <= 2


def test_a_large_budget_keeps_hidden_states_on_the_device(reference: dict) -> None:
    path, calls, want = reference["tiny_llama"]
    backend = StreamBackend.load(path, dtype="float32", gpus=0, hidden_budget_bytes=1 << 30)
    parts, _ = backend.capture_parts(calls[0], "float32", LIMITS)
    backend.close()
    assert not backend.spilled and np.array_equal(joined_parts(parts), joined_parts(want["float32"][0][0]))


def test_at_most_two_layers_are_alive(reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted on the stage objects themselves (finalizers), not on the backend's own bookkeeping."""
    path, calls, _ = reference["tiny_llama"]
    real = stream.load_stage
    lock = threading.Lock()
    live: set[int] = set()
    loads: list[tuple[int, int]] = []  # (layer, stages alive just after it loaded)

    def counted(*args, **kwargs):
        stage = real(*args, **kwargs)
        with lock:
            live.add(id(stage))
            weakref.finalize(stage, live.discard, id(stage))
            loads.append((stage.lo, len(live)))
        return stage

    monkeypatch.setattr(stream, "load_stage", counted)
    backend = StreamBackend.load(path, dtype="float32", gpus=0)
    for call in calls:
        backend.capture_parts(call, "float32", LIMITS)
    backend.close()
    assert [layer for layer, _ in loads] == list(range(4)) * len(calls)  # every layer once per shard, in order
    assert max(alive for _, alive in loads) <= 2
    assert 1 <= backend.peak_live_layers <= 2 and backend._live == 0  # 2 whenever a prefetch beat the compute
    assert not live  # nothing kept after the calls


def test_the_next_layer_loads_while_this_one_computes(reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    path, calls, _ = reference["tiny_llama"]
    real_load, real_run = stream.load_stage, StreamBackend._run_layer
    loads: dict[int, tuple[float, float]] = {}
    runs: dict[int, tuple[float, float]] = {}

    def slow_load(p, lo, hi, **kwargs):  # 50 ms per load and per layer's compute: the overlap is visible
        start = time.perf_counter()
        stage = real_load(p, lo, hi, **kwargs)
        time.sleep(0.05)
        loads[lo] = (start, time.perf_counter())
        return stage

    def slow_run(self, stage, *args):
        start = time.perf_counter()
        rows = real_run(self, stage, *args)
        time.sleep(0.05)
        runs[stage.lo] = (start, time.perf_counter())
        return rows

    monkeypatch.setattr(stream, "load_stage", slow_load)
    monkeypatch.setattr(StreamBackend, "_run_layer", slow_run)
    backend = StreamBackend.load(path, dtype="float32", gpus=0)
    backend.capture_parts(calls[0], "float32", LIMITS)
    backend.close()
    for layer in range(3):
        (run_start, run_end), (load_start, load_end) = runs[layer], loads[layer + 1]
        assert load_start < run_end and run_start < load_end  # layer+1 loaded during layer's compute


def test_a_failing_layer_fails_the_call_and_the_next_call_works(
    reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, calls, want = reference["tiny_llama"]
    backend = StreamBackend.load(path, dtype="float32", gpus=0)
    real = stream.load_stage

    def broken(p, lo, hi, **kwargs):
        if lo == 2:
            raise RuntimeError("disk gone")
        return real(p, lo, hi, **kwargs)

    monkeypatch.setattr(stream, "load_stage", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        backend.capture_parts(calls[0], "float32", LIMITS)
    monkeypatch.setattr(stream, "load_stage", real)
    parts, _ = backend.capture_parts(calls[0], "float32", LIMITS)
    backend.close()
    assert backend._live == 0 and np.array_equal(joined_parts(parts), joined_parts(want["float32"][0][0]))


def test_empty_call_and_the_backend_interface(tiny_llama: Path) -> None:
    backend = StreamBackend.load(tiny_llama, dtype="float32", gpus=0)
    try:
        parts, overflow = backend.capture_parts([], "float16", LIMITS)
        assert overflow == 0 and parts[0][2].shape == (0, 4, 64) and parts[0][2].dtype == np.float16
        made = backend.made_by()
        assert made["engine"] == "stream" and made["backend"] == "hf" and made["library"].startswith("transformers ")
        assert (backend.n_layers, backend.intermediate_size, backend.concurrent) == (4, 64, False)
        assert backend.name == "stream" and not hasattr(backend, "generate")  # captures only: no generator stub
        with pytest.raises(ValueError, match="capture dtype"):
            backend.capture_parts([[5]], "bfloat16", LIMITS)
    finally:
        backend.close()


_BUILD = """
import sys
from cna_dist.demo.models import save_random_model
save_random_model(sys.argv[1], arch="llama", n_layers=24, hidden_size=1024, intermediate_size=4096,
                  n_heads=8, n_kv_heads=4, seed=3)
"""

_MEASURE = """
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import numpy as np, torch
import transformers.models.llama.modeling_llama  # the code the engine runs, imported before the baseline
from transformers import AutoConfig, AutoTokenizer
from cna_dist.prompts.batching import Limits
from cna_dist.capture.stream import StreamBackend
after_imports = status("VmRSS")
backend = StreamBackend.load(sys.argv[1], dtype="float32", gpus=0)
after_load = status("VmRSS")
rng = np.random.default_rng(0)
ids = [rng.integers(5, 50, size=int(rng.integers(1, 41))).tolist() for _ in range(16)]
parts, _ = backend.capture_parts(ids, "float32", Limits(token_budget=256, max_batch_size=8))
backend.close()
figures = {"after_imports": after_imports, "after_load": after_load, "peak": status("VmHWM")}
print(json.dumps({**figures, "shape": list(parts[0][2].shape)}))
"""


@pytest.mark.slow
def test_a_fresh_process_stays_far_below_the_checkpoint_size(tmp_path: Path) -> None:
    """A ~1.5 GB float32 checkpoint streams through a process whose peak RSS grows by under a third of it."""
    path = tmp_path / "llama-1.5g"
    subprocess.run([sys.executable, "-c", _BUILD, str(path)], check=True)  # the 1.5 GB model never lives here
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], check=True, capture_output=True, text=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["after_imports"]
    mib = {k: round(v / 2**20) for k, v in figures.items() if k != "shape"}
    print(f"checkpoint {weights / 2**20:.0f} MiB, RSS {mib} MiB, peak growth {growth / 2**20:.0f} MiB")
    assert figures["shape"] == [16, 24, 4096]
    assert weights > 1.4e9
    assert growth < weights / 3


def test_advice_measures_load_and_speed(reference: dict) -> None:
    path, _, _ = reference["tiny_llama"]
    backend = StreamBackend.load(path, dtype="float32", gpus=0)
    advice = backend.advise(17.0, LIMITS)
    backend.close()
    assert advice["tokens"] >= 1 and advice["rows"] == -(-advice["tokens"] // 17)
    assert "loads in" in advice["reason"] and "tokens/s on cpu" in advice["reason"]
