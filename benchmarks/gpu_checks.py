"""Checks for CUDA ordering defects that cannot show on a CPU, where streams and events are no-ops.

Each check runs an engine against single-device capture of the same ragged prompts and exits non-zero on any
mismatch. On CUDA the timing that exposes each defect is forced with `torch.cuda._sleep` (a GPU busy-wait queued on
one stream) and host sleeps, and the whole run is repeated under PYTORCH_NO_CUDA_MEMORY_CACHING=1 (every free a
real cudaFree: a use-after-free in the caching allocator's stream pools disappears there, a missing stream wait
does not). What each check would have caught:

- stream:   the stream engine's layer weights, freed to the loader stream's pool while the compute stream still
            read them, then overwritten by the next layer's load (layer_stream.StreamBackend._take: record_stream).
            float32 and bfloat16, hidden states on the device and spilled to host, vs single-device rows.
- pipeline: two stages on one GPU, two calls at once; the stage weights loaded on the default stream and read on
            the workers' streams before the last copy landed (stage.load_stage: synchronize), and every row filed
            through the fixed pinned ring (pipeline: PinnedRing) rather than a new pinned buffer per micro-batch.
- overflow: the float16-overflow count of the pipeline equal to single-device's, with the caller's stream kept
            busy so a zero-fill queued there would land after the workers' additions (pipeline: counters filled
            on the worker streams).

    python benchmarks/gpu_checks.py                    # CUDA, both allocator modes (each in its own process)
    python benchmarks/gpu_checks.py --device cpu       # the same comparisons on the CPU (no delays): a smoke test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cna_dist.capture import stream as layer_stream  # noqa: E402
from cna_dist.capture.hf import HFBackend  # noqa: E402
from cna_dist.capture.pipeline import PipelineBackend  # noqa: E402
from cna_dist.capture.stream import StreamBackend  # noqa: E402
from cna_dist.prompts.batching import Limits  # noqa: E402

LIMITS = Limits(token_budget=512, max_batch_size=16)  # many micro-batches per call
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # of the largest |row value|: a wrong weight is off by O(1)


class Delays:
    """GPU busy-waits (torch.cuda._sleep cycles) calibrated to milliseconds; no-ops on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.cycles_per_ms = cuda, 0.0
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1_000_000)  # warm-up
            start.record()
            torch.cuda._sleep(10_000_000)
            end.record()
            end.synchronize()
            self.cycles_per_ms = 10_000_000 / max(start.elapsed_time(end), 1e-3)

    def gpu(self, ms: float) -> None:
        """Keep the current stream busy for `ms`: work queued behind it waits, other streams do not."""
        if self.cuda:
            torch.cuda._sleep(int(ms * self.cycles_per_ms))


def ragged(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, size=int(rng.integers(1, 97))).tolist() for _ in range(n)]


def build_model(root: Path, hot: bool) -> Path:
    """A small random Llama; `hot` scales one layer's up projection so float16 storage overflows in places."""
    from safetensors.torch import load_file, save_file

    from cna_dist.demo.models import save_random_model

    path = save_random_model(
        root / ("hot" if hot else "model"), n_layers=6, hidden_size=128, intermediate_size=512, n_heads=4, seed=3
    )
    if hot:
        tensors = load_file(path / "model.safetensors")
        tensors["model.layers.2.mlp.up_proj.weight"] *= 2e4
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def joined(parts: list) -> np.ndarray:
    return np.concatenate([rows for _, _, rows in sorted(parts, key=lambda p: p[0])], axis=1)


def compare(name: str, got: np.ndarray, want: np.ndarray, dtype: str, failures: list[str]) -> None:
    scale = float(np.abs(want.astype(np.float64)).max()) or 1.0
    err = float("inf")
    if got.shape == want.shape:
        err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) / scale
    ok = err <= TOLERANCE[dtype]
    print(
        f"  {'ok  ' if ok else 'FAIL'} {name}: max error {err:.2e} of the largest value (tolerance {TOLERANCE[dtype]})"
    )
    if not ok:
        failures.append(name)


def single_device(path: Path, dtype: str, calls: list[list[list[int]]], store: str, gpus: int) -> list[Any]:
    backend = HFBackend.load(path, dtype=dtype, trust_remote_code=False, gpus=gpus)
    try:
        return [backend.capture_parts(c, store, LIMITS) for c in calls]
    finally:
        backend.close() if hasattr(backend, "close") else None


def check_stream(path: Path, calls: list, gpus: int, delays: Delays, failures: list[str]) -> None:
    """Each layer's compute starts with a GPU busy-wait and each load with a host wait, so the next layer's weights
    are allocated after this layer's release and copied while this layer still computes: a block handed back too
    early is overwritten under the compute stream."""
    real_load, real_run = layer_stream.load_stage, StreamBackend._run_layer

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.03 if delays.cuda else 0)
        return real_load(*args, **kwargs)

    def slow_run(self: StreamBackend, *args: Any) -> Any:
        delays.gpu(15)
        return real_run(self, *args)

    layer_stream.load_stage, StreamBackend._run_layer = slow_load, slow_run
    try:
        for dtype in ("float32", "bfloat16"):
            want = single_device(path, dtype, calls, "float32", gpus)
            for spill in (False, True):
                backend = StreamBackend.load(path, dtype=dtype, gpus=gpus, hidden_budget_bytes=1 if spill else None)
                try:
                    for i, call in enumerate(calls):
                        got, _ = backend.capture_parts(call, "float32", LIMITS)
                        label = f"stream {dtype} {'spilled' if spill else 'on device'} call {i}"
                        compare(label, joined(got), joined(want[i][0]), dtype, failures)
                finally:
                    backend.close()
    finally:
        layer_stream.load_stage, StreamBackend._run_layer = real_load, real_run


def concurrently(fns: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def check_pipeline(path: Path, calls: list, gpus: int, delays: Delays, store: str, failures: list[str]) -> None:
    """Two stages on one device, two calls at once. The default stream is kept busy before the stages load (their
    copies queue behind it) and before each call (its counters' zero-fill would queue behind it)."""
    want = single_device(path, "float32", calls[:2], store, gpus)
    delays.gpu(200)
    backend = PipelineBackend.load(path, [(0, 3), (3, 6)], dtype="float32", gpus=gpus)
    try:

        def call(i: int) -> Callable[[], Any]:
            def run() -> Any:
                delays.gpu(100)
                return backend.capture_parts(calls[i], store, LIMITS)

            return run

        for repeat in range(3):
            results = concurrently([call(0), call(1)])
            for i, (parts, overflow) in enumerate(results):
                label = f"pipeline {store} repeat {repeat} call {i}"
                compare(label, joined(parts), joined(want[i][0]), "float32", failures)
                if store == "float16":
                    same = overflow == want[i][1]
                    print(f"  {'ok  ' if same else 'FAIL'} {label}: float16 overflow {overflow}, single {want[i][1]}")
                    if not same:
                        failures.append(f"{label} overflow")
        held = [w.ring.nbytes() for w in backend.workers if w.ring is not None]
        if held:
            biggest = max(b.input_ids.numel() for b in _plan(calls[:2], backend.pad_id))
            bound = len(backend.workers[0].ring.slots) * LIMITS.max_batch_size * 6 * 512 * 4
            ok = max(held) <= bound
            print(f"  {'ok  ' if ok else 'FAIL'} pinned ring: {held} bytes held per stage (bound {bound}; "
                  f"largest batch {biggest} tokens)")  # fmt: skip
            if not ok:
                failures.append("pinned ring")
    finally:
        backend.close()


def _plan(calls: list, pad_id: int) -> list:
    from cna_dist.prompts.batching import batches

    return [b for c in calls for b in batches(c, pad_id, LIMITS.token_budget, LIMITS.max_batch_size)]


def run_checks(device: str, prompts: int) -> int:
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for the CPU comparisons")
        return 2
    gpus = 1 if cuda else 0
    delays = Delays(cuda)
    mode = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1"
    print(f"device {device}; caching allocator {'off' if mode else 'on'}; {prompts} prompts per call")
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cna-gpu-checks-") as tmp:
        path, hot = build_model(Path(tmp), hot=False), build_model(Path(tmp), hot=True)
        vocab = int(__import__("json").loads((path / "config.json").read_text())["vocab_size"])
        calls = [ragged(vocab, prompts, seed) for seed in range(3)]
        print("stream engine vs single device:")
        check_stream(path, calls, gpus, delays, failures)
        print("pipeline (2 stages, one device, 2 concurrent calls) vs single device:")
        check_pipeline(path, calls, gpus, delays, "float32", failures)
        print("float16 overflow, pipeline vs single device:")
        check_pipeline(hot, calls, gpus, delays, "float16", failures)
    print(f"{len(failures)} failed: {failures}" if failures else "all checks passed")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--prompts", type=int, default=256, help="ragged prompts per call (1 to 96 tokens)")
    parser.add_argument(
        "--allocator", choices=["both", "current"], default="both", help="both: with and without caching (CUDA)"
    )
    args = parser.parse_args()
    if args.device == "cpu" or args.allocator == "current":
        return run_checks(args.device, args.prompts)
    codes = []
    for caching_off in (False, True):  # the allocator mode is read once, when CUDA starts: one process each
        env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NO_CUDA_MEMORY_CACHING"}
        if caching_off:
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        argv = [sys.executable, __file__, "--device", "cuda", "--prompts", str(args.prompts), "--allocator", "current"]
        codes.append(subprocess.run(argv, env=env, check=False).returncode)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
