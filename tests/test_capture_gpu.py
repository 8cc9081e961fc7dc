"""The GPU capture path: no host sync inside the batch loop, writes overlapped with compute, the GPU benchmark.

The sync check proper needs CUDA (`torch.cuda.set_sync_debug_mode("error")`) and is skipped without it; a
CPU stand-in catches the usual culprits (`.item()`, tensor truth values, `nonzero`, boolean indexing) by
watching the dispatched ops, so a regression shows up here too. (That the lm_head is never called is
tests/test_capture.py::test_capture_skips_lm_head.)
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cna_dist.capture import hf
from cna_dist.capture import single as cap
from cna_dist.runtime.replica import Replica, ReplicaSpec
from cna_dist.store.activations import ShardPlan, WrittenPart
from tests.helpers import capture

ROOT = Path(__file__).resolve().parents[1]
HOST_SYNC_OPS = {
    "_local_scalar_dense",
    "is_nonzero",
    "nonzero",
    "nonzero_static",
    "masked_select",
    "equal",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
}


def prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=int(k)).tolist() for k in rng.integers(1, 40, size=n)]


class HostSyncOps(TorchDispatchMode):
    """Records every dispatched op that reads a tensor's value back to the host (a sync on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_SYNC_OPS or (
            name == "index"
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
        ):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen"])
def test_capture_loop_reads_nothing_back_cpu(which: str, request: pytest.FixtureRequest) -> None:
    model, tokenizer = hf.load(request.getfixturevalue(which), dtype="float32")
    token_ids = prompts(model.config.vocab_size, 24)
    with cap.Capturer(model) as capturer:
        # the device-built 4D mask path is the one under test
        assert capturer.stage._mask(torch.ones((1, 3), dtype=torch.long)).dim() == 4
        with HostSyncOps() as ops:
            out, overflow = cap.capture_with(
                capturer, token_ids, tokenizer.pad_token_id, dtype="float16", token_budget=200, max_batch_size=8
            )
    assert ops.seen == []
    expected, n_over = capture(
        model, token_ids, tokenizer.pad_token_id, dtype="float16", token_budget=10**9, max_batch_size=1
    )
    assert overflow == n_over and out.shape == expected.shape
    np.testing.assert_allclose(out.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU: torch.cuda.set_sync_debug_mode only sees CUDA synchronisations"
)
def test_no_host_sync_inside_the_batch_loop_cuda(tiny_llama: Path) -> None:
    model, tokenizer = hf.load(tiny_llama, dtype="float32")
    token_ids = prompts(model.config.vocab_size, 32)
    cpu_out, cpu_over = capture(model, token_ids, tokenizer.pad_token_id, dtype="float32", max_batch_size=1)
    model.to("cuda")
    with cap.Capturer(model) as capturer:
        assert capturer.cuda and capturer.stage._mask(torch.ones((1, 3), dtype=torch.long, device="cuda")).dim() == 4
        cap.capture_with(capturer, token_ids[:4], tokenizer.pad_token_id)  # warm-up: handles, pools, pinned slots
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any implicit sync raises; CUDA event waits are not flagged
        try:
            out, overflow = cap.capture_with(
                capturer, token_ids, tokenizer.pad_token_id, dtype="float32", token_budget=160, max_batch_size=8
            )
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert overflow == cpu_over == 0
    scale = np.abs(cpu_out).max(axis=2, keepdims=True)
    assert (np.abs(out - cpu_out) / scale).max() < 1e-4  # TF32-free float32 on the GPU vs the CPU


class SlowRun:
    """A store stand-in whose writes take `write_s` and record when they ran (data, then marker)."""

    def __init__(self, write_s: float, n_layers: int = 4):
        self.write_s = write_s
        self.meta = SimpleNamespace(n_layers=n_layers, layers_per_chunk=n_layers)  # whole rows per chunk
        self.writes: dict[int, tuple[float, float]] = {}
        self.data: dict[int, np.ndarray] = {}
        self.markers: list[int] = []

    def write_rows(self, plan: ShardPlan, acts: np.ndarray, layers: slice) -> WrittenPart:
        start = time.perf_counter()
        time.sleep(self.write_s)
        self.data[plan.shard] = acts.copy()
        self.writes[plan.shard] = (start, time.perf_counter())
        return WrittenPart(plan.shard, layers.start, layers.stop, acts.nbytes)

    def commit(self, plan: ShardPlan, parts: list[WrittenPart], writer: str = "", made_by: dict | None = None) -> None:
        assert [(p.lo, p.hi) for p in parts] == [(0, self.data[plan.shard].shape[1])]
        self.markers.append(plan.shard)


def test_replica_overlaps_writes_with_the_next_compute(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two concurrent calls as Ray's max_concurrency=2 makes them: computes serialise, writes run beside them."""
    replica = Replica(ReplicaSpec(str(tiny_llama), dtype="float32", capture_dtype="float32"))
    vocab = replica.engine.model.config.vocab_size
    shards = {s: prompts(vocab, 6, seed=s) for s in range(4)}
    computes: list[tuple[float, float]] = []
    real = cap.capture_with

    def slow_capture(*args, **kwargs):  # compute 0.1 s, write 0.6 s: writes are the bottleneck
        start = time.perf_counter()
        result = real(*args, **kwargs)
        time.sleep(max(0.0, 0.1 - (time.perf_counter() - start)))
        computes.append((start, time.perf_counter()))
        return result

    monkeypatch.setattr(hf, "capture_with", slow_capture)
    run = SlowRun(write_s=0.6)
    todo = list(range(4))
    results = []
    lock = threading.Lock()

    def slot() -> None:  # one of the driver's two in-flight slots: the next shard when the last one returned
        while True:
            with lock:
                if not todo:
                    return
                s = todo.pop(0)
            results.append(replica.capture_shard(run, ShardPlan(s, 6 * s, [f"{s}"] * 6), shards[s]))

    threads = [threading.Thread(target=slot) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    computes.sort()
    for (_, end), (start, _) in zip(computes, computes[1:], strict=False):
        assert start >= end  # one compute at a time on the replica's devices
    first_write = min(run.writes.values())
    assert computes[1][0] < first_write[1]  # the second shard computed while the first was being written
    for s in range(4):  # every shard written whole, then committed; the data is the capture's
        expected, _ = real(replica.engine.capturer, shards[s], replica.engine.tokenizer.pad_token_id)
        np.testing.assert_array_equal(run.data[s], expected)
    assert sorted(run.markers) == [0, 1, 2, 3]
    by_shard = {r.shard: r for r in results}
    assert set(by_shard) == {0, 1, 2, 3}
    for r in results:
        assert r.rows == 6 and r.seconds >= r.compute_seconds + r.write_seconds - 1e-6
        assert r.compute_seconds >= 0.09 and r.write_seconds >= 0.59
    # A third shard only arrives when a write returns (0.6 s after its compute) while the other compute takes
    # 0.1 s: the devices sit idle about 0.5 s before it, and the replica reports that as idle_seconds.
    assert 0.25 < max(r.idle_seconds for r in results) < 0.8
    assert sum(r.queued_seconds for r in results) > 0.05  # a call waited behind the other's 0.1 s compute


def test_replica_lock_is_released_when_compute_fails(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replica = Replica(ReplicaSpec(str(tiny_llama), dtype="float32", capture_dtype="float32"))

    def boom(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(hf, "capture_with", boom)
    run = SlowRun(write_s=0.0)
    with pytest.raises(RuntimeError, match="device lost"):
        replica.capture_shard(run, ShardPlan(0, 0, ["x"]), [[5, 6]])
    assert run.markers == [] and not replica._compute_lock.locked()


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["--engine", "single"], ["--engine", "pipeline", "--stages", "2"]], ids=str)
def test_benchmark_smoke_on_cpu(tmp_path: Path, engine: list[str]) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "capture_gpu.py"),
            "--shape",
            "tiny",
            "--prompts",
            "16",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
            *engine,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for line in (
        "prompts:",
        "project ",
        "reference ",
        "== summary ==",
        "ratio (project / reference prompts/s):",
        "write overlap: GPU idle",
        "MFU n/a",
    ):
        assert line in text, (line, text)
    import json

    figures = json.loads(out.read_text())
    assert figures["project"]["prompts_per_s"] > 0 and figures["reference"]["prompts_per_s"] > 0
    assert figures["writes"]["shards"] >= 1 and figures["project"]["mfu"] is None
    assert figures["rel_max_abs_diff"] < 1e-3 and figures["engine"].startswith(engine[1])


def test_benchmark_shapes_are_the_real_ones() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import capture_gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model = capture_gpu.build_model("qwen2.5-7b", torch.device("meta"), torch.bfloat16)
    assert capture_gpu.non_embedding_params(model) == 6_525_621_760  # Qwen2.5-7B's published 6.53B
    assert model.config._attn_implementation == "sdpa"
    stage = capture_gpu.build_model("qwen2.5-72b-stage", torch.device("meta"), torch.bfloat16)
    assert stage.config.num_hidden_layers == 20 and stage.config.intermediate_size == 29568
