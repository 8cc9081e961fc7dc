"""The streamed reduce's bounded global thresholds: exact against the in-memory reduce, and its benchmark runs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cna_dist.reduce import cna as r
from cna_dist.reduce import streamed
from cna_dist.store.activations import ActivationStore, Run
from tests.conftest import run_meta
from tests.helpers import write_shard

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
        write_shard(run, plan, np.stack([data[h] for h in plan.hashes]))
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
    natural_cap = streamed.group_cap
    for cap in (None, 1, 3):
        monkeypatch.setattr(streamed, "group_cap", natural_cap if cap is None else lambda run, n, c=cap: c)
        for block in (None, 1, 2):
            got = streamed.reduce_store(
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


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("block", [1, 2, 5])
def test_group_top_counts_count_each_prompts_top_n_by_value_then_id(tmp_path: Path, dtype: str, block: int) -> None:
    """Heavy ties, zeros of both signs: each prompt's top set is its n first in (-|value|, id) order, nothing else."""
    run, rows, acts = tied_store(tmp_path, dtype, seed=3)
    acts["diverse"][0, 1, :] = -0.0  # -0.0 ranks with 0.0, by id
    acts["diverse"][0, 0, :] = 0.0
    rewrite(run, rows["diverse"][0], acts["diverse"][0])
    n = 17
    ids, counts = streamed.group_top_counts(run, rows["diverse"], block, n)
    expected = np.zeros(N_LAYERS * WIDTH, dtype=np.int64)
    for row in acts["diverse"]:
        ranked = sorted((-abs(float(x)), i) for i, x in enumerate(row.reshape(-1)))
        expected[[i for _, i in ranked[:n]]] += 1
    got = np.zeros_like(expected)
    got[ids] = counts
    np.testing.assert_array_equal(got, expected)


def rewrite(run: Run, row: int, values: np.ndarray) -> None:
    """Overwrite one stored row in place (a test-only edit of committed data)."""
    arr = run.array()
    arr[row] = values


def test_a_nan_in_a_diverse_row_is_an_error_naming_the_row(tmp_path: Path) -> None:
    run, rows, acts = tied_store(tmp_path, "float16", seed=4)
    bad = acts["diverse"][2].copy()
    bad[3, 7] = np.nan
    rewrite(run, rows["diverse"][2], bad)
    with pytest.raises(ValueError, match=rf"store rows \[{rows['diverse'][2]}\] hold NaN"):
        streamed.group_top_counts(run, rows["diverse"], 2, 5)


def test_prompt_groups_cover_every_prompt_once_within_cap() -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 200, 300)  # duplicates and crowded chunks
    for cap in (1, 4, 16, 64):
        groups = streamed.prompt_groups(rows, 16, cap)
        assert all(0 < g.size <= cap for g in groups)
        np.testing.assert_array_equal(np.sort(np.concatenate(groups)), np.arange(rows.size))
        for chunk in np.unique(rows // 16):
            in_chunk = np.flatnonzero(rows // 16 == chunk)
            holders = sum(bool(np.isin(in_chunk, g).any()) for g in groups)
            if in_chunk.size <= cap:
                assert holders == 1  # a chunk's prompts share one task unless they are more than cap


def test_driver_folds_one_bounded_result_at_a_time(tmp_path: Path) -> None:
    """The driver takes each task's result as the mapper yields it: at most [prompts, n] (id, count) pairs per group
    task, never all of them at once, and every row is read once."""
    run, rows, acts = tied_store(tmp_path, "float16", seed=5)
    held: list[int] = []
    reads: list[int] = []
    original = run.read_blocks

    def counting(rows_, blocks, prefetch=1):
        for item in original(rows_, blocks, prefetch):
            reads.append(item[1].size)
            yield item

    run.read_blocks = counting  # type: ignore[method-assign]

    def streaming(fn, args):
        for a in args:
            out = fn(*a)
            if fn is streamed.group_top_counts:
                held.append(out[0].size)
                assert out[0].size <= a[1].size * a[3]
            yield out
            if fn is streamed.group_top_counts:
                held.pop()  # the driver has folded it: the next result comes only now

    streamed.reduce_store(
        run,
        rows,
        k=5,
        exclude_layers=[],
        universal_fraction=0.3,
        universal_threshold=0.8,
        universal_scope="global",
        layers_per_block=1,
        mapper=streaming,
    )
    assert held == []
    total = sum(v.size for v in rows.values())
    assert sum(reads) == total * N_LAYERS  # each row of each layer block read once


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
        "zarr read: ",
        "ratio reduce/plain read throughput:",
        "ratio reduce/zarr read throughput:",
        "reduce through zarr: ",
        "reduce / reduce through zarr throughput:",
        "task peak block_moments (1 tasks): RSS +",
        "task peak group_top_counts (1 tasks): RSS +",
        "driver peak (tracemalloc",
        "--- summary ---",
        "command: .venv/bin/python benchmarks/reduce.py --layers 4",
        "per-task peak RSS +",
        "driver peak ",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert out.count("GB/s") >= 8 and "FAIL" not in out


@pytest.mark.parametrize("case", ["random", "ties", "sample_misleads", "short"])
def test_candidates_hold_every_key_of_the_rows_top_n(case: str) -> None:
    """Not yet full, the candidates must include the row's whole top n (by key, then position): whatever the
    sample guesses, including a row built so that the sample sees only the largest keys (the fallback)."""
    rng = np.random.default_rng(7)
    n, size = 20, 8192
    if case == "random":
        row = rng.integers(0, 60000, size).astype(np.uint16)
    elif case == "ties":
        row = rng.integers(0, 3, size).astype(np.uint16)
    elif case == "sample_misleads":
        row = np.zeros(size, np.uint16)
        stride = size // (8 * n)
        row[::stride] = 5  # every sampled key is large; only 52 keys are, fewer than the sample's 2n/stride rank
        row[1] = 9
        row[: 3 * stride : stride] = 7
    else:
        row, n = rng.integers(0, 5, 15).astype(np.uint16), 20
    keep = streamed._candidates(row, -1, n)
    top = sorted(range(row.size), key=lambda i: (-int(row[i]), i))[:n]
    assert set(top) <= set(keep.tolist())
    assert keep.size < row.size or case in ("ties", "short")
    full = streamed._candidates(row, int(row[top[-1]]), n)
    assert set(top) <= set(full.tolist())


def test_group_top_counts_on_wide_rows_use_the_sampled_floor(tmp_path: Path) -> None:
    """Rows wide enough (a block of 2 x 2048 neurons, n = 9) for the sampled floor, with ties: still exact."""
    meta = run_meta(4, 2048, "float16", fingerprint="f" * 64)
    run = ActivationStore(str(tmp_path / "store")).open_run(meta)
    rng = np.random.default_rng(11)
    data = rng.integers(-40, 41, (24, 4, 2048)).astype(np.float16)
    data[5] = 0.0
    hashes = [hashlib.sha256(f"w{i}".encode()).hexdigest() for i in range(24)]
    for plan in run.plan(hashes):
        write_shard(run, plan, data[[hashes.index(h) for h in plan.hashes]])
    index = run.row_index()
    rows = np.array([index[h] for h in hashes])
    n = 9
    ids, counts = streamed.group_top_counts(run, rows, 2, n)
    expected = np.zeros(4 * 2048, dtype=np.int64)
    for row in data:
        flat = np.abs(row.astype(np.float64)).reshape(-1)
        expected[np.lexsort((np.arange(flat.size), -flat))[:n]] += 1
    got = np.zeros_like(expected)
    got[ids] = counts
    np.testing.assert_array_equal(got, expected)
