"""The streamed reduce's bounded global thresholds: exact against the in-memory reduce, and its benchmark runs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cna_dist.core import reduce as r
from cna_dist.io import stream
from cna_dist.io.store import ActivationStore, Run
from tests.conftest import run_meta

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS, WIDTH = 5, 40


def make_run(tmp_path: Path, dtype: str) -> Run:
    meta = run_meta(N_LAYERS, WIDTH, dtype, fingerprint="e" * 64)
    return ActivationStore(str(tmp_path / "store")).open_run(meta)


def tied_store(tmp_path: Path, dtype: str, seed: int) -> tuple[Run, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Small integers, so |activation| ties everywhere, including at each prompt's threshold; rows span many chunks.

    The diverse rows are handed over shuffled and with one prompt twice, as a manifest with a duplicate would.
    """
    rng = np.random.default_rng(seed)
    sizes = {"positive": 13, "negative": 11, "diverse": 30}
    hashes = {name: [hashlib.sha256(f"{name}{i}".encode()).hexdigest() for i in range(n)] for name, n in sizes.items()}
    data = {h: rng.integers(-3, 4, (N_LAYERS, WIDTH)).astype(dtype) for hs in hashes.values() for h in hs}
    for h in hashes["diverse"][:26]:
        data[h][2, 5] = 5  # universal in 26 of 30 diverse prompts
        data[h][4, 0] = -5
    for h in hashes["positive"]:
        data[h][2, 5] += 1
        data[h][3, 9] += 2
    run = make_run(tmp_path, dtype)
    for plan in run.plan([h for hs in hashes.values() for h in hs]):
        run.write_shard(plan, np.stack([data[h] for h in plan.hashes]))
    index = run.row_index()
    diverse = list(rng.permutation(hashes["diverse"])) + [hashes["diverse"][3]]
    ordered = {**hashes, "diverse": diverse}
    rows = {name: np.array([index[h] for h in hs]) for name, hs in ordered.items()}
    acts = {name: np.stack([data[h] for h in hs]) for name, hs in ordered.items()}
    return run, rows, acts


@pytest.mark.slow  # ~1.7 s per case, ~10 s for the six
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("fraction", [0.005, 0.05, 0.3])  # n = 1, 10, 60: below, within and above one layer
def test_global_scope_equals_in_memory_with_heavy_ties(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, fraction: float
) -> None:
    run, rows, acts = tied_store(tmp_path, dtype, seed=int(fraction * 1000))
    expected = r.reduce_in_memory(acts, 7, [0], fraction, 0.8, "global")
    assert expected.universal.any()
    natural_cap = stream.group_cap
    for cap in (None, 1, 3):
        monkeypatch.setattr(stream, "group_cap", natural_cap if cap is None else lambda run, n, c=cap: c)
        for block in (None, 1, 2):
            got = stream.reduce_store(
                run,
                rows,
                k=7,
                exclude_layers=[0],
                universal_fraction=fraction,
                universal_threshold=0.8,
                universal_scope="global",
                layers_per_block=block,
            )
            np.testing.assert_array_equal(got.universal, expected.universal)
            np.testing.assert_array_equal(got.selected, expected.selected)
            np.testing.assert_array_equal(got.displaced, expected.displaced)
            np.testing.assert_allclose(got.delta, expected.delta, rtol=0, atol=1e-9)


def test_prompt_thresholds_are_each_prompts_nth_by_value_then_id(tmp_path: Path) -> None:
    run, rows, acts = tied_store(tmp_path, "float32", seed=3)
    n = 17
    values, ids = stream.prompt_thresholds(run, rows["diverse"], 2, n)
    for p, row in enumerate(acts["diverse"]):
        ranked = sorted((-abs(float(x)), i) for i, x in enumerate(row.reshape(-1)))
        assert (values[p], ids[p]) == (-ranked[n - 1][0], ranked[n - 1][1])


def test_threshold_groups_cover_every_prompt_once_within_cap() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 200, 300)  # duplicates and crowded chunks
    for cap in (1, 4, 16, 64):
        groups = stream.threshold_groups(rows, 16, cap)
        assert all(0 < g.size <= cap for g in groups)
        np.testing.assert_array_equal(np.sort(np.concatenate(groups)), np.arange(rows.size))
        for chunk in np.unique(rows // 16):
            in_chunk = np.flatnonzero(rows // 16 == chunk)
            holders = sum(bool(np.isin(in_chunk, g).any()) for g in groups)
            if in_chunk.size <= cap:
                assert holders == 1  # a chunk's prompts share one task unless they are more than cap


def test_driver_receives_one_threshold_per_prompt(tmp_path: Path) -> None:
    """The driver's memory for the global pass is 16 bytes per diverse prompt, not [prompts, n] per block."""
    run, rows, acts = tied_store(tmp_path, "float16", seed=5)
    returned: dict[str, list] = {}

    def recording(fn, args):
        out = stream.local_map(fn, args)
        returned.setdefault(fn.__name__, []).extend(out)
        return out

    stream.reduce_store(
        run,
        rows,
        k=5,
        exclude_layers=[],
        universal_fraction=0.3,
        universal_threshold=0.8,
        universal_scope="global",
        layers_per_block=1,
        mapper=recording,
    )
    parts = returned["prompt_thresholds"]
    assert sum(v.size + i.size for v, i in parts) == 2 * rows["diverse"].size
    assert "block_prompt_tops" not in returned


@pytest.mark.slow
def test_benchmark_prints_its_figures(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "reduce.py"),
        "--layers",
        "4",
        "--width",
        "64",
        "--rows",
        "48",
        "--repeats",
        "1",
        "--workers",
        "1",
        "--store",
        str(tmp_path / "store"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for line in (
        "budget live per task:",
        "budget RSS per task:",
        "budget driver:",
        "store size:",
        "plain read: ",
        "reduce: ",
        "ratio reduce/plain read throughput:",
        "task peak block_moments (1 tasks): RSS +",
        "task peak prompt_thresholds (1 tasks): RSS +",
        "task peak block_counts (1 tasks): RSS +",
        "driver peak (tracemalloc",
        "--- summary ---",
        "command: .venv/bin/python benchmarks/reduce.py --layers 4",
        "per-task peak RSS +",
        "driver peak ",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert out.count("GB/s") >= 4 and "FAIL" not in out
