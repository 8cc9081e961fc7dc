"""A store and registry written before the renovation (tests/data/legacy-store-v1) are read after it.

The fixture was written by `cna-dist mine --in-process` at commit 1ccc5b6 with the manifest beside it; the model
is rebuilt here from the same seed, so its fingerprint (and with it the run id) is the one the store was made for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from cna_dist.cli import main

LEGACY = Path(__file__).parent / "data" / "legacy-store-v1"


def _copy(tmp_path: Path) -> Path:
    from cna_dist.demo.models import save_random_model

    root = tmp_path / "ws"
    shutil.copytree(LEGACY, root)
    save_random_model(root / "model", arch="llama", n_layers=4, hidden_size=32, intermediate_size=64, seed=1)
    return root


def test_legacy_store_is_reused_and_the_registry_says_unchanged(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    before = json.loads((root / "circuits/legacy/model/v1.json").read_text())
    summary = tmp_path / "summary.json"
    result = CliRunner().invoke(
        main, ["mine", str(root / "manifest.yaml"), "--in-process", "--quiet", "--summary", str(summary)]
    )
    assert result.exit_code == 0, result.output
    assert "unchanged, v1" in result.output
    s = json.loads(summary.read_text())
    assert (s["shards_captured"], s["shards_reused"], s["status"]) == (0, 4, "unchanged")
    assert sorted(p.name for p in (root / "circuits/legacy/model").iterdir()) == ["latest", "v1.json"]
    assert json.loads((root / "circuits/legacy/model/v1.json").read_text()) == before


def test_legacy_store_rows_and_circuit_read_as_written(tmp_path: Path) -> None:
    from cna_dist.circuit.file import load
    from cna_dist.store.activations import ActivationStore

    root = _copy(tmp_path)
    store = ActivationStore(str(root / "store"))
    (run_name,) = store.runs()
    meta = store.load_meta(run_name)
    assert meta is not None and (meta.n_layers, meta.intermediate_size, meta.dtype) == (4, 64, "float32")
    run = store.open_run(meta, create=False)
    committed = run.committed()
    assert sorted(committed) == [0, 1, 2, 3] and sum(len(r) for r in committed.values()) == 15
    rows = np.arange(15)
    seen = 0
    for _, acts in run.read_rows(rows, slice(0, 4)):
        assert acts.shape[1:] == (4, 64) and np.isfinite(acts).all()
        seen += acts.shape[0]
    assert seen == 15
    circuit = load(str(root / "circuits/legacy/model/v1.json"))
    assert (circuit.name, circuit.version, len(circuit.neurons)) == ("legacy", 1, 12)
    inspect = CliRunner().invoke(main, ["inspect", str(root / "store"), "--json"])
    assert inspect.exit_code == 0, inspect.output
    report = json.loads(inspect.output)["runs"][0]
    assert report["committed_shards"] == 4 and report["made_by"] == {"unrecorded": 4}  # markers from before
