"""The 72B path for real: a model with a 72B model's row shape (80 x 29568, 4.7 MB per prompt in float16), mined
end to end with model, store and registry on S3, by a `cna-dist mine` process whose every S3 read is recorded; and
the largest mixture-of-experts row, Qwen3-235B-A22B's (94 x 128 experts x 1536 = 18.5M neurons, 37 MB a prompt)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from cna_dist import manifest as manifestmod
from cna_dist.circuit import file as circuitmod
from cna_dist.commands.mine import prepare
from cna_dist.demo.scale import MOE_SHAPES, SHAPES, save_moe_scale_model, save_scale_model, scale_prompts
from cna_dist.reduce import cna as r
from cna_dist.store import uri as urimod
from cna_dist.store.activations import ActivationStore
from cna_dist.validate import validate
from tests.conftest import write_jsonl

# Ray runs only in the `cna-dist mine` processes these tests start, on ports of its own: under pytest-xdist they
# run beside the tests that start Ray in the test process (tests/conftest.py)
pytestmark = pytest.mark.xdist_group("scale")
ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 96  # 450 MB of rows at the real shape: enough for a multi-chunk store and a working universal filter


def in_memory(store: ActivationStore, run_id: str, row_hashes: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Every set's rows read whole from the store, for the single-machine reduce."""
    run = store.open_run(store.load_meta(run_id), create=False)
    index = run.row_index()
    everything = np.asarray(run.array(mode="r")[:])  # one read of each chunk: a row alone would read 40 chunks
    return {name: everything[[index[h] for h in hashes]] for name, hashes in row_hashes.items()}


def header_bytes(model: Path) -> dict[str, int]:
    """Weight file name -> its safetensors header's size (8-byte length + JSON): all the driver may read of it."""
    sizes = {}
    for path in model.glob("*.safetensors"):
        with path.open("rb") as f:
            sizes[path.name] = 8 + int.from_bytes(f.read(8), "little")
    return sizes


def only_headers(fetched: list[list], model: Path) -> None:
    """Of each weight file the driver read its header (validate checks every entry), never a byte of tensor data."""
    limits = header_bytes(model)
    read: dict[str, int] = {}
    for path, n in fetched:
        if path.endswith((".safetensors", ".bin")):
            read[path.rsplit("/", 1)[-1]] = read.get(path.rsplit("/", 1)[-1], 0) + n
    assert read and set(read) <= set(limits), read
    assert all(n % limits[name] == 0 and n <= 2 * limits[name] for name, n in read.items()), (read, limits)


@pytest.mark.ray
@pytest.mark.slow
def test_72b_shaped_mine_on_s3_reads_only_weight_headers_and_equals_the_in_memory_reduce(
    tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNA_DIST_CACHE", str(tmp_path / "cache"))
    base = f"s3://cna/{uuid.uuid4().hex}"
    fs, _ = urimod.filesystem(base)
    fs.put(str(save_scale_model(tmp_path / "q72", "qwen2")), f"{base[5:]}/model", recursive=True)
    s, fetched, manifest = mine_on_s3(tmp_path, base, "scale72", N_PROMPTS, {"dtype": "float16"}, seed=1)

    # the driver: config, tokenizer, metadata and weight headers only, never tensor data, and well under 1 GB
    only_headers(fetched, tmp_path / "q72")
    assert any(p.endswith("tokenizer.json") for p, _ in fetched)
    assert sum(n for _, n in fetched) < 10 << 20, sorted(fetched, key=lambda x: -x[1])[:5]
    assert s["driver_peak_mib"] < 1024, s

    # the circuit: k = 0.1% of 80 x 29568, equal to the single-machine reduce over the same rows
    n_layers, width = SHAPES["qwen2"]
    circuit = circuitmod.load(s["circuit"])
    assert len(circuit.neurons) == int(0.001 * n_layers * width) == 2365
    assert s["prompts_captured"] == N_PROMPTS
    m = manifestmod.load(manifest)
    prepared = prepare(m, validate(m, check_remote=True))
    acts = in_memory(ActivationStore(f"{base}/store"), s["run"], {k: e.row_hashes for k, e in prepared.sets.items()})
    expected = r.reduce_in_memory(acts, 2365, [0, 1], 0.001, 0.8, "global")
    assert expected.universal.any()  # the filter is at work: every prompt ends on the same template tokens
    got = [(n.layer, n.neuron) for n in circuit.neurons]
    assert got == [divmod(int(i), width) for i in expected.selected]
    assert sorted(map(tuple, circuit.universal)) == sorted(map(tuple, np.argwhere(expected.universal).tolist()))
    deltas = np.array([n.delta for n in circuit.neurons])
    np.testing.assert_allclose(deltas, expected.delta.reshape(-1)[expected.selected], rtol=0, atol=1e-9)


N_MOE_PROMPTS = 6  # 6 x 37 MB = 222 MB of rows: 2 per set, 3 shards of 2 rows, each its own row chunk


def mine_on_s3(
    tmp_path: Path, base: str, name: str, n_prompts: int, capture: dict, seed: int = 2
) -> tuple[dict, list, Path]:
    """Write the prompt sets and a manifest, run `cna-dist mine` under the S3 read recorder; (summary, the reads,
    manifest)."""
    sets = scale_prompts(n_prompts, seed=seed)
    for set_name, texts in sets.items():
        write_jsonl(tmp_path / f"{set_name}.jsonl", texts)
    manifest = {
        "name": name,
        "model": {"uri": f"{base}/model", "dtype": "float32"},
        "prompts": {set_name: {"uri": f"./{set_name}.jsonl"} for set_name in sets},
        "select": {"top_fraction": 0.001, "exclude_layers": [0, 1]},
        "universal": {"top_fraction": 0.001, "threshold": 0.8, "scope": "global"},
        "capture": capture,
        "output": {"store": f"{base}/store", "registry": f"{base}/circuits"},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    reads, summary = tmp_path / "reads.json", tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "tests.record_reads", str(reads), "mine", str(tmp_path / "m.yaml")]
    done = subprocess.run(
        [*cmd, "--summary", str(summary), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(summary.read_text()), json.loads(reads.read_text()), tmp_path / "m.yaml"


@pytest.mark.ray
@pytest.mark.slow
def test_235b_moe_shaped_mine_on_s3_equals_the_in_memory_reduce(
    tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNA_DIST_CACHE", str(tmp_path / "cache"))
    base = f"s3://cna/{uuid.uuid4().hex}"
    fs, _ = urimod.filesystem(base)
    fs.put(str(save_moe_scale_model(tmp_path / "q235", hidden_size=4)), f"{base[5:]}/model", recursive=True)
    capture = {"dtype": "float16", "max_batch_size": 4, "shard_rows": 2}
    s, fetched, manifest = mine_on_s3(tmp_path, base, "scale235", N_MOE_PROMPTS, capture)
    only_headers(fetched, tmp_path / "q235")
    assert s["driver_peak_mib"] < 2048, s

    n_layers, n_experts, width, top_k = MOE_SHAPES["qwen3_moe"]
    row = n_experts * width
    k = int(0.001 * n_layers * row)
    circuit = circuitmod.load(s["circuit"])
    assert len(circuit.neurons) == k == 18481 and s["prompts_captured"] == N_MOE_PROMPTS
    m = manifestmod.load(manifest)
    prepared = prepare(m, validate(m, check_remote=True))
    acts = in_memory(ActivationStore(f"{base}/store"), s["run"], {n: e.row_hashes for n, e in prepared.sets.items()})
    for rows in acts.values():  # exactly top-k experts of each layer carry values for each prompt
        assert ((rows.reshape(len(rows), n_layers, n_experts, width) != 0).any(-1).sum(-1) == top_k).all()
    expected = r.reduce_in_memory(acts, k, [0, 1], 0.001, 0.8, "global")
    assert [(n.layer, n.neuron) for n in circuit.neurons] == [divmod(int(i), row) for i in expected.selected]
    deltas = np.array([n.delta for n in circuit.neurons])
    np.testing.assert_allclose(deltas, expected.delta.reshape(-1)[expected.selected], rtol=0, atol=1e-9)
