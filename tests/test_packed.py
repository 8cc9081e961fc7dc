"""Packed token ids and plans by position: a shard's ids gathered by array operations equal the dict's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cna_dist.errors import RunFailure
from cna_dist.prompts.packed import PackedIds
from cna_dist.runtime.calls import shard_ids
from cna_dist.store.activations import ActivationStore, ShardPlan
from tests.conftest import run_meta


def test_take_gathers_ragged_rows_in_the_order_asked() -> None:
    lists = [[5], [1, 2, 3], [], [7, 8], [9, 10, 11, 12]]
    packed = PackedIds.from_lists(lists)
    assert len(packed) == 5 and packed.to_lists() == lists
    assert packed.lengths().tolist() == [1, 3, 0, 2, 4]
    assert packed.take(np.array([4, 0, 2, 1, 1])).to_lists() == [[9, 10, 11, 12], [5], [], [1, 2, 3], [1, 2, 3]]
    assert packed.take(np.array([], dtype=np.int64)).to_lists() == []


def test_plans_carry_the_first_position_of_each_missing_hash(tmp_path: Path) -> None:
    run = ActivationStore(str(tmp_path / "store")).open_run(run_meta(shard_rows=4))
    hashes = [f"{i:064x}" for i in (0, 1, 2, 1, 3, 4, 0, 5)]  # 1 and 0 repeat: planned once, at their first place
    lists = [[i, i + 100] for i in range(len(hashes))]
    plans = run.plan(hashes)
    assert [p.hashes for p in plans] == [[f"{i:064x}" for i in (0, 1, 2, 3)], [f"{i:064x}" for i in (4, 5)]]
    assert [p.positions.tolist() for p in plans] == [[0, 1, 2, 4], [5, 7]]
    packed = PackedIds.from_lists(lists)
    for plan in plans:  # each row's ids: those at the hash's first place in the list planned
        assert shard_ids(packed, plan).to_lists() == [lists[hashes.index(h)] for h in plan.hashes]


def test_packed_ids_without_positions_are_refused() -> None:
    with pytest.raises(RunFailure, match="shard 3: packed token ids need the plan's positions"):
        shard_ids(PackedIds.from_lists([[1]]), ShardPlan(3, 0, ["a" * 64]))
