"""Direct chunk writes (cna_dist.store.chunks): the same objects zarr writes, read back through zarr, in parallel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from cna_dist.errors import RunFailure
from cna_dist.store import chunks
from cna_dist.store.activations import ActivationStore, ShardPlan
from tests.conftest import run_meta
from tests.helpers import write_shard


def make(root: Path, name: str, shape: tuple[int, ...], chunk_shape: tuple[int, ...], dtype: str) -> zarr.Array:
    return zarr.create_array(
        store=str(root),
        name=name,
        shape=shape,
        chunks=chunk_shape,
        dtype=dtype,
        fill_value=np.nan,
        compressors=[Crc32cCodec()],
    )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("threads", [1, 4])
def test_direct_chunks_are_the_bytes_zarr_writes(tmp_path: Path, dtype: str, threads: int) -> None:
    rng = np.random.default_rng(0)
    shape, chunk_shape = (10, 6, 5), (4, 2, 5)  # rows 8:10 fill a chunk in part: padded with the fill
    block = rng.standard_normal((6, 6, 5)).astype(dtype)
    ours = make(tmp_path, "ours", shape, chunk_shape, dtype)
    theirs = make(tmp_path, "theirs", shape, chunk_shape, dtype)
    assert chunks.direct_layout(ours)
    put = chunks.local_put(str(tmp_path / "ours"))
    written = chunks.write_block(ours, block, (4, 0, 0), put, threads)
    theirs[4:10] = block
    files = sorted(p.relative_to(tmp_path / "theirs") for p in (tmp_path / "theirs").rglob("c/**/*") if p.is_file())
    assert len(files) == 6 and written == sum((tmp_path / "theirs" / f).stat().st_size for f in files)
    for f in files:
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "theirs" / f).read_bytes(), f
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours"))[4:10], block)
    assert np.isnan(zarr.open_array(str(tmp_path / "ours"))[:4]).all()  # untouched rows: still the fill


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_chunk_past_the_last_layer_is_stored(tmp_path: Path, dtype: str) -> None:
    """18 layers in chunks of 16 (Gemma 3 270M in float32): the last layer chunk holds 2 layers and 14 of the fill
    (NaN), which is padding, not missing data; a NaN among the part's own values is still refused."""
    block = np.random.default_rng(1).standard_normal((4, 18, 5)).astype(dtype)
    ours = make(tmp_path, "ours", (4, 18, 5), (4, 16, 5), dtype)
    theirs = make(tmp_path, "theirs", (4, 18, 5), (4, 16, 5), dtype)
    chunks.write_block(ours, block, (0, 0, 0), chunks.local_put(str(tmp_path / "ours")), 2)
    theirs[:] = block
    for f in ("c/0/0/0", "c/0/1/0"):
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "theirs" / f).read_bytes(), f
    block[2, 17, 3] = np.nan
    with pytest.raises(chunks.NaNRows) as raised:
        chunks.write_block(ours, block, (0, 0, 0), chunks.local_put(str(tmp_path / "ours")), 1)
    assert raised.value.row == 2


def test_a_block_off_the_chunk_grid_is_refused(tmp_path: Path) -> None:
    arr = make(tmp_path, "a", (8, 2, 3), (4, 2, 3), "float32")
    with pytest.raises(ValueError, match="chunk edge"):
        chunks.write_block(arr, np.zeros((4, 2, 3), np.float32), (2, 0, 0), chunks.local_put(str(tmp_path / "a")), 2)


def test_other_layouts_go_through_zarr(tmp_path: Path) -> None:
    arr = zarr.create_array(store=str(tmp_path), name="z", shape=(4, 2), chunks=(2, 2), dtype="float32")
    assert not chunks.direct_layout(arr)  # zstd by default: not the store's plain layout


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_first_nan_row_by_bit_pattern(dtype: str) -> None:
    values = np.zeros((6, 3, 50), dtype)
    assert chunks.first_nan_row(values) is None
    values[4, 2, 49] = np.inf  # not NaN
    values[2, 0, 0] = -np.inf
    assert chunks.first_nan_row(values) is None
    values[5, 1, 7] = np.nan
    values[3, 2, 49] = -np.nan
    assert chunks.first_nan_row(values) == 3


def test_store_writes_in_threads_and_reads_back(tmp_path: Path) -> None:
    m = run_meta()
    run = ActivationStore(str(tmp_path / "store")).open_run(m)
    run.write_threads = 3
    hashes = [f"{i:064x}" for i in range(5)]
    (plan,) = run.plan(hashes)
    acts = np.random.default_rng(1).standard_normal((5, m.n_layers, m.intermediate_size)).astype(m.dtype)
    write_shard(run, plan, acts)
    got = np.concatenate([a for _, a in run.read_rows(np.arange(5), slice(0, m.n_layers))])
    np.testing.assert_array_equal(got, acts)
    acts[2, 1, 0] = np.nan
    with pytest.raises(RunFailure, match=f"row {plan.start + 2} hold NaN; the shard is not committed"):
        run.write_rows(ShardPlan(plan.shard, plan.start, hashes), acts, slice(0, m.n_layers))


def test_first_nan_row_on_every_float16_bit_pattern() -> None:
    patterns = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    numbers = patterns[~np.isnan(patterns)]
    assert chunks.first_nan_row(numbers.reshape(-1, 1)) is None
    for nan in patterns[np.isnan(patterns)]:
        assert chunks.first_nan_row(np.append(numbers, nan).reshape(-1, 1)) == len(numbers)


@pytest.mark.parametrize("block_bytes", [1, 100, 1 << 20])  # a row per block, two rows, the whole chunk
def test_chunks_stored_in_place_block_by_block_are_zarrs_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    monkeypatch.setattr(chunks, "BLOCK_BYTES", block_bytes)
    block = np.random.default_rng(2).standard_normal((8, 4, 6)).astype("float16")
    ours, theirs = (make(tmp_path, name, (8, 4, 6), (4, 2, 6), "float16") for name in ("ours", "theirs"))
    assert chunks.in_place(block[:4, 2:4], (4, 2, 6)) and not chunks.in_place(block[:3, 2:4], (4, 2, 6))
    chunks.write_block(ours, block, (0, 0, 0), chunks.local_put(str(tmp_path / "ours")), 2)
    theirs[:] = block
    files = sorted(p.relative_to(tmp_path / "theirs") for p in (tmp_path / "theirs").rglob("c/**/*") if p.is_file())
    assert len(files) == 4
    for f in files:
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "theirs" / f).read_bytes(), f


def test_a_nan_found_mid_chunk_leaves_no_file_of_that_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunks, "BLOCK_BYTES", 1)  # one row per block: rows 0..2 are checked before row 3
    block = np.ones((4, 4, 6), "float32")
    block[3, 3, 5] = np.nan  # chunk (0, 1): layers 2:4
    arr = make(tmp_path, "a", (4, 4, 6), (4, 2, 6), "float32")
    with pytest.raises(chunks.NaNRows, match="row 3 holds NaN"):
        chunks.write_block(arr, block, (0, 0, 0), chunks.local_put(str(tmp_path / "a")), 1)
    assert (tmp_path / "a" / "c" / "0" / "0" / "0").is_file()  # the chunk before it: stored, uncommitted
    assert not (tmp_path / "a" / "c" / "0" / "1" / "0").exists()


# -- reading ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_read_block_equals_zarrs_read(tmp_path: Path, dtype: str) -> None:
    """Whole chunks, a row-edge chunk (rows 8:10 of a 4-row chunk) and a layer-edge chunk (layer 6 of a 2-layer
    chunk), each block starting on a chunk edge, read straight into the block as zarr reads them."""
    shape, chunk_shape = (10, 7, 5), (4, 2, 5)
    arr = make(tmp_path, "a", shape, chunk_shape, dtype)
    arr[:] = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    get = chunks.local_get(str(tmp_path / "a"))
    for rows, layers in [(slice(0, 4), slice(0, 2)), (slice(4, 8), slice(0, 7)), (slice(8, 10), slice(2, 7))]:
        out = np.empty((rows.stop - rows.start, layers.stop - layers.start, 5), dtype)
        chunks.read_block(arr, out, (rows.start, layers.start, 0), get)
        np.testing.assert_array_equal(out, arr[rows, layers])


def test_read_block_refuses_a_flipped_bit_and_a_wrong_size(tmp_path: Path) -> None:
    arr = make(tmp_path, "a", (4, 2, 5), (4, 2, 5), "float16")
    arr[:] = np.ones((4, 2, 5), "float16")
    obj = tmp_path / "a" / "c" / "0" / "0" / "0"
    good = obj.read_bytes()
    out = np.empty((4, 2, 5), "float16")
    flipped = bytearray(good)
    flipped[7] ^= 0x01
    obj.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="chunk c/0/0/0: stored and computed checksum do not match"):
        chunks.read_block(arr, out, (0, 0, 0), chunks.local_get(str(tmp_path / "a")))
    for wrong in (good[:-1], good + b"\0"):
        obj.write_bytes(wrong)
        with pytest.raises(ValueError, match=f"holds {len(wrong)} bytes, not the {len(good)}"):
            chunks.read_block(arr, out, (0, 0, 0), chunks.local_get(str(tmp_path / "a")))


def test_an_absent_chunk_reads_as_the_fill(tmp_path: Path) -> None:
    arr = make(tmp_path, "a", (8, 2, 5), (4, 2, 5), "float32")
    arr[:4] = np.ones((4, 2, 5), "float32")
    out = np.zeros((8, 2, 5), "float32")
    chunks.read_block(arr, out, (0, 0, 0), chunks.local_get(str(tmp_path / "a")))
    assert (out[:4] == 1).all() and np.isnan(out[4:]).all()


def test_short_reads_continue_where_they_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """readv may return fewer bytes than asked (a signal, a network file system): the rest is read after."""
    arr = make(tmp_path, "a", (4, 2, 5), (4, 2, 5), "float32")
    values = np.arange(40, dtype="float32").reshape(4, 2, 5)
    arr[:] = values
    real = chunks.os.readv

    def seven_bytes(fd: int, views: list) -> int:
        first = views[0][:7]
        return real(fd, [first])

    monkeypatch.setattr(chunks.os, "readv", seven_bytes)
    out = np.empty((4, 2, 5), "float32")
    chunks.read_block(arr, out, (0, 0, 0), chunks.local_get(str(tmp_path / "a")))
    np.testing.assert_array_equal(out, values)


def test_store_reads_blocks_straight_and_through_zarr_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Run.read_rows` reads blocks on the layer-chunk grid directly and others through zarr: the same values."""
    m = run_meta()
    run = ActivationStore(str(tmp_path / "store")).open_run(m)
    hashes = [f"{i:064x}" for i in range(5)]
    (plan,) = run.plan(hashes)
    acts = np.random.default_rng(4).standard_normal((5, m.n_layers, m.intermediate_size)).astype(m.dtype)
    write_shard(run, plan, acts)
    direct = []
    real = chunks.read_block
    monkeypatch.setattr(chunks, "read_block", lambda *a: direct.append(a[2]) or real(*a))
    rows = np.array([4, 0, 2])
    assert run.meta.layers_per_chunk == m.n_layers  # a small model: whole rows per chunk
    aligned = slice(0, m.n_layers)
    got = np.concatenate([a for _, a in run.read_rows(rows, aligned)])
    np.testing.assert_array_equal(got, acts[np.sort(rows), aligned])
    assert direct, "a block on the layer-chunk grid is read straight from its chunk objects"
    direct.clear()
    off_grid = slice(1, m.n_layers)
    got = np.concatenate([a for _, a in run.read_rows(rows, off_grid)])
    np.testing.assert_array_equal(got, acts[np.sort(rows), off_grid])
    assert not direct
    run.direct_reads = False
    got = np.concatenate([a for _, a in run.read_rows(rows, aligned)])
    np.testing.assert_array_equal(got, acts[np.sort(rows), aligned])
    assert not direct


def test_short_writes_continue_where_they_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """writev may store fewer bytes than given: the rest is written after, and the object is zarr's, byte for byte."""
    block = np.arange(80, dtype="float32").reshape(8, 2, 5)
    ours, theirs = (make(tmp_path, name, (8, 2, 5), (4, 2, 5), "float32") for name in ("ours", "theirs"))
    real = chunks.os.writev
    monkeypatch.setattr(chunks.os, "writev", lambda fd, views: real(fd, [views[0][:7]]))
    chunks.write_block(ours, block, (0, 0, 0), chunks.local_put(str(tmp_path / "ours")), 1)
    theirs[:] = block
    for f in ("c/0/0/0", "c/1/0/0"):
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "theirs" / f).read_bytes(), f
