"""The activation store and the streamed reduce, on local disk and on S3 (moto's server over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cna_dist.errors import BadInput, RunFailure
from cna_dist.reduce import cna as r
from cna_dist.reduce import streamed
from cna_dist.store import chunks
from cna_dist.store.activations import ActivationStore
from tests.conftest import run_meta as meta
from tests.helpers import write_shard


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_server")
    import uuid

    return f"s3://cna/{uuid.uuid4().hex}/store"


def hashes(n: int, salt: str = "") -> list[str]:
    import hashlib

    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def fill(run, plans, data: dict[str, np.ndarray]) -> None:
    for plan in plans:
        write_shard(run, plan, np.stack([data[h] for h in plan.hashes]))


def test_streamed_reduce_equals_in_memory(store_uri: str) -> None:
    rng = np.random.default_rng(0)
    m = meta()
    sets = {"positive": hashes(13, "p"), "negative": hashes(11, "n"), "diverse": hashes(9, "d")}
    data = {
        h: rng.standard_normal((m.n_layers, m.intermediate_size)).astype(np.float32) for s in sets.values() for h in s
    }
    for h in sets["diverse"] + sets["positive"]:
        data[h][3, 7] += 30.0  # a universal neuron, stronger on the positive set
    for h in sets["positive"]:
        data[h][3, 7] += 3.0
        data[h][4, 2] += 2.0
    run = ActivationStore(store_uri).open_run(m)
    fill(run, run.plan([h for s in sets.values() for h in s]), data)
    index = run.row_index()
    rows = {k: np.array([index[h] for h in v]) for k, v in sets.items()}
    acts = {k: np.stack([data[h] for h in v]) for k, v in sets.items()}
    for scope in ("global", "per_layer"):
        expected = r.reduce_in_memory(acts, 6, [0, 1], 0.01, 0.8, scope)
        for block in (1, 2, 5):
            got = streamed.reduce_store(
                run,
                rows,
                k=6,
                exclude_layers=[0, 1],
                universal_fraction=0.01,
                universal_threshold=0.8,
                universal_scope=scope,
                layers_per_block=block,
            )
            np.testing.assert_array_equal(got.selected, expected.selected)
            np.testing.assert_allclose(got.delta, expected.delta, rtol=0, atol=1e-9)
            np.testing.assert_array_equal(got.universal, expected.universal)
            np.testing.assert_array_equal(got.displaced, expected.displaced)
    assert expected.universal[3, 7] and 3 * 40 + 7 in expected.displaced


def test_plan_skips_committed_rows_and_fills_free_slots(store_uri: str) -> None:
    m = meta()
    store = ActivationStore(store_uri)
    run = store.open_run(m)
    first = hashes(20)
    plans = run.plan(first)
    assert [p.shard for p in plans] == [0, 1, 2] and [len(p.hashes) for p in plans] == [8, 8, 4]
    zeros = np.zeros((m.n_layers, m.intermediate_size), np.float32)
    write_shard(run, plans[0], np.stack([zeros] * 8))
    write_shard(run, plans[2], np.stack([zeros] * 4))  # shard 1 "interrupted": never committed
    new = hashes(3, "new")
    again = store.open_run(m).plan(first + new)
    assert [p.shard for p in again] == [1, 3]  # the interrupted slot first, then a fresh one
    assert again[0].hashes == first[8:16] and again[1].hashes == new  # committed rows are never planned again


def test_missing_chunk_and_corrupt_marker_are_named(tmp_path: Path) -> None:
    m = meta(shard_rows=4)
    run = ActivationStore(str(tmp_path / "store")).open_run(m)
    plans = run.plan(hashes(8))
    for p in plans:
        write_shard(run, p, np.ones((4, m.n_layers, m.intermediate_size), np.float32))
    chunks = sorted((tmp_path / "store" / "runs" / run.id / "acts" / "c").rglob("*"))
    victim = [c for c in chunks if c.is_file()][-1]
    victim.unlink()
    with pytest.raises(RunFailure, match="missing data in .*acts chunk"):
        list(run.read_rows(np.arange(8), slice(0, m.n_layers)))
    (tmp_path / "store" / "runs" / run.id / "commits" / "00000000.json").write_text("{not json")
    with pytest.raises(RunFailure, match="corrupt commit marker .*00000000.json"):
        run.committed()


def test_truncated_chunk_is_an_error(tmp_path: Path) -> None:
    m = meta(shard_rows=4)
    run = ActivationStore(str(tmp_path / "store")).open_run(m)
    (plan,) = run.plan(hashes(4))
    write_shard(run, plan, np.ones((4, m.n_layers, m.intermediate_size), np.float32))
    chunk = next(c for c in (tmp_path / "store" / "runs" / run.id / "acts" / "c").rglob("*") if c.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(RunFailure, match="cannot read .*acts rows 0:"):
        list(run.read_rows(np.arange(4), slice(0, m.n_layers)))


def test_run_of_another_model_is_refused(tmp_path: Path) -> None:
    store = ActivationStore(str(tmp_path / "store"))
    run = store.open_run(meta())
    path = tmp_path / "store" / "runs" / run.id / "run.json"
    data = json.loads(path.read_text())
    data["fingerprint"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(RunFailure, match="written for another model"):
        store.open_run(meta())


def test_float16_default_and_chunking_for_real_sizes() -> None:
    from cna_dist.store.activations import chunking

    rows, layers, shard = chunking(80, 29568, 2)  # Qwen2.5-72B
    chunk_mb = rows * layers * 29568 * 2 / 2**20
    assert 1 <= chunk_mb <= 16 and shard % rows == 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_has_nan_matches_numpy_on_every_special_value(dtype: type) -> None:
    from cna_dist.store.activations import has_nan

    info = np.finfo(dtype)
    specials = np.array(
        [0.0, -0.0, 1.0, -np.inf, np.inf, info.max, -info.max, info.tiny, info.smallest_subnormal], dtype=dtype
    )
    assert not has_nan(specials)
    for i in range(specials.size):
        for nan in (np.nan, -np.nan):
            a = specials.copy()
            a[i] = nan
            assert has_nan(a) and np.isnan(a).any()
    bits = np.arange(2**16, dtype=np.uint16).view(np.float16)  # every float16 bit pattern
    assert has_nan(bits) and not has_nan(bits[~np.isnan(bits)])


def test_stage_writers_own_layer_ranges_and_the_shard_commits_once_all_are_in(tmp_path: Path) -> None:
    """A 72B-wide layer (29568 neurons) gives layer chunks of 2: two writers of one shard, one chunk range each."""
    store = ActivationStore(str(tmp_path / "store"))
    run = store.open_run(meta(n_layers=4, width=29568, dtype="float16", shard_rows=0))
    assert run.meta.layers_per_chunk == 2
    (plan,) = run.plan(hashes(5))
    acts = np.random.default_rng(1).standard_normal((5, 4, 29568)).astype(np.float16)
    with pytest.raises(RunFailure, match=r"layers 1:3 cut the store's layer chunks of 2"):
        run.write_rows(plan, acts[:, 1:3], slice(1, 3))
    with pytest.raises(RunFailure, match=r"do not match \(5, 2, 29568\)"):
        run.write_rows(plan, acts[:, :3], slice(0, 2))
    low = run.write_rows(plan, acts[:, 0:2], slice(0, 2))
    with pytest.raises(RunFailure, match=r"shard 0: written parts \[\(0, 2\)\] do not cover layers 0:4"):
        run.commit(plan, [low])
    assert run.committed() == {} and [p.shard for p in run.plan(hashes(5))] == [0]  # written, not committed: absent
    high = run.write_rows(plan, acts[:, 2:4], slice(2, 4))
    with pytest.raises(RunFailure, match="do not cover"):
        run.commit(plan, [low, low, high])  # a range twice is not a cover either
    run.commit(plan, [high, low], writer="stages", made_by={"backend": "hf", "engine": "pipeline", "library": "x"})
    assert run.committed() == {0: hashes(5)}
    marker = run.markers()[0]
    assert marker["layers"] == [[0, 2], [2, 4]] and marker["made_by"]["engine"] == "pipeline"
    assert marker["nbytes"] == acts.nbytes
    ((positions, got),) = list(run.read_rows(np.arange(5), slice(0, 4)))
    np.testing.assert_array_equal(got[np.argsort(positions)], acts)


def test_run_id_ignores_how_rows_were_made(tmp_path: Path) -> None:
    """Engines and backends are recorded per shard, never in the run id: identical values share one run."""
    from cna_dist.store.activations import run_id

    a, b = meta(), meta()
    assert run_id(a) == run_id(b)
    store = ActivationStore(str(tmp_path / "store"))
    run = store.open_run(a)
    (plan,) = run.plan(hashes(3))
    rows = np.zeros((3, a.n_layers, a.intermediate_size), np.float32)
    run.commit(plan, [run.write_rows(plan, rows, slice(0, a.n_layers))], made_by={"backend": "hf", "engine": "single"})
    assert store.open_run(b).id == run.id and store.open_run(b).committed() == {0: hashes(3)}


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (PermissionError("Access Denied"), BadInput),
        (FileNotFoundError("NoSuchBucket"), BadInput),
        (OSError(16, "Service Unavailable"), RunFailure),
    ],
)
def test_an_unwritable_store_is_bad_input_but_an_outage_is_a_run_failure(
    monkeypatch: pytest.MonkeyPatch, error: Exception, kind: type
) -> None:
    """No bucket or no right to write is the manifest's fault (exit 2); a store down after every retry is not."""
    store = ActivationStore("s3://no-such-bucket-here/store", {"anon": True})

    def refuse(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(store.fs, "pipe_file", refuse)
    with pytest.raises(kind, match="s3://no-such-bucket-here/store|activation store"):
        store.check_writable()


def test_local_stores_read_chunk_files_straight_object_stores_through_zarr(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rows either way; only a local store's chunk files are read by chunks.read_block."""
    m = meta()
    run = ActivationStore(store_uri).open_run(m)
    (plan,) = run.plan(hashes(5))
    acts = np.random.default_rng(5).standard_normal((5, m.n_layers, m.intermediate_size)).astype(m.dtype)
    write_shard(run, plan, acts)
    straight = []
    real = chunks.read_block
    monkeypatch.setattr(chunks, "read_block", lambda *a: straight.append(a[2]) or real(*a))
    got = np.concatenate([a for _, a in run.read_rows(np.array([3, 1]), slice(0, m.n_layers))])
    np.testing.assert_array_equal(got, acts[[1, 3]])
    assert bool(straight) == (not store_uri.startswith("s3://"))
