"""The driver's planning reads each commit marker once per run handle, however often it plans and indexes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

from cna_dist.store import integrity
from cna_dist.store.activations import ActivationStore
from tests.conftest import run_meta
from tests.helpers import write_shard


def test_markers_are_read_once_and_again_only_when_changed(tmp_path: Path) -> None:
    m = run_meta(shard_rows=4)
    run = ActivationStore(str(tmp_path / "store")).open_run(m)
    hashes = [f"{i:064x}" for i in range(10)]
    for plan in run.plan(hashes):
        write_shard(run, plan, np.ones((len(plan.hashes), m.n_layers, m.intermediate_size), m.dtype))
    reads: list[str] = []
    cat = run.fs.cat_file
    run.fs.cat_file = lambda path, *a, **k: reads.append(path) or cat(path, *a, **k)
    try:
        assert sorted(run.committed()) == [0, 1, 2] and len(reads) == 3
        assert run.plan(hashes + [f"{99:064x}"])[0].shard == 3 and len(reads) == 3  # listed, not read again
        assert run.row_index()[hashes[9]] == 9 and len(reads) == 3
        marker = Path(run.commit_path(1))
        old = {k: v for k, v in json.loads(marker.read_text()).items() if k != integrity.CHECKSUM}
        marker.write_text(json.dumps(integrity.seal({**old, "writer": "someone else, later"})))  # a rewrite
        assert run.markers()[1]["writer"] == "someone else, later" and len(reads) == 4
        marker.unlink()
        assert sorted(run.committed()) == [0, 2] and len(reads) == 4
    finally:
        run.fs.cat_file = cat
    assert pickle.loads(pickle.dumps(run))._seen == {}  # a Run sent to replicas carries no cache
