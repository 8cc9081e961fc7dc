"""`bake` on object storage (moto's S3 server over HTTP): the memory bound and the server-side copies.

A checkpoint of three weight files (96 MiB each, no tensor over 4 MiB) is baked S3 to S3 in a subprocess whose
every s3fs read and copy is recorded and whose peak RSS is measured (resource.getrusage), against the same bake of
a tiny checkpoint of the same layout (the imports, the S3 client, the thread pool) run the same way. A file with no
circuit neuron is copied server-side and never read beyond its header; a rewritten file is read once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import DEFAULT_WORDS
from tests.test_bake import write_circuit

ROOT = Path(__file__).resolve().parents[1]
LAYERS_PER_FILE, FILES = 6, 3
PAIRS = [(1, 0), (1, 7), (13, 5)]  # layers 1 and 13: the first and third files; the second has none

RECORDER = r"""
import atexit, json, sys
import s3fs
from tests.record_reads import _record
reads, copies = [], []
_record(reads)
cp = s3fs.S3FileSystem._cp_file
async def cp_file(self, path1, path2, **kwargs):
    copies.append([str(path1), str(path2)])
    return await cp(self, path1, path2, **kwargs)
s3fs.S3FileSystem._cp_file = cp_file
import re
import cna_dist.commands.bake, torch
from cna_dist.cli import main
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
out = sys.argv[1]
def dump():
    peak = status("VmHWM")
    open(out, "w").write(json.dumps({"reads": reads, "copies": copies, "peak": peak, "start": start}))
atexit.register(dump)
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS from here on: the bake, not the imports
start = status("VmRSS")
sys.argv = ["cna-dist", *sys.argv[2:]]
main()
"""


def save_layout(path: Path, hidden: int, inter: int) -> Path:
    """A Llama-named checkpoint of FILES weight files, LAYERS_PER_FILE layers each, random float32."""
    rng = np.random.default_rng(0)
    n_layers = LAYERS_PER_FILE * FILES
    path.mkdir(parents=True)
    weight_map = {}
    for f in range(FILES):
        tensors = {}
        for layer in range(f * LAYERS_PER_FILE, (f + 1) * LAYERS_PER_FILE):
            p = f"model.layers.{layer}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[p + f"self_attn.{name}.weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32)
            tensors[p + "mlp.gate_proj.weight"] = rng.standard_normal((inter, hidden), dtype=np.float32)
            tensors[p + "mlp.up_proj.weight"] = rng.standard_normal((inter, hidden), dtype=np.float32)
            tensors[p + "mlp.down_proj.weight"] = rng.standard_normal((hidden, inter), dtype=np.float32)
        name = f"model-{f + 1:05d}-of-{FILES:05d}.safetensors"
        save_file(tensors, path / name)
        weight_map.update(dict.fromkeys(tensors, name))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": n_layers,
        "hidden_size": hidden,
        "intermediate_size": inter,
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    build_tokenizer(DEFAULT_WORDS).save_pretrained(path)
    return path


def upload(local: Path, uri: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for f in sorted(local.iterdir()):
        fs.put_file(str(f), f"{uri.removeprefix('s3://')}/{f.name}")


def remote_circuit(tmp_path: Path, local: Path, uri: str, name: str) -> Path:
    """A circuit on the remote copy (its ETag fingerprint), model.uri pointing at it."""
    from cna_dist.model import checkpoint

    path = write_circuit(tmp_path / f"{name}.json", local, PAIRS, LAYERS_PER_FILE * FILES, _width(local))
    doc = json.loads(path.read_text())
    doc["model"]["uri"], doc["model"]["fingerprint"] = uri, checkpoint.fingerprint(uri)
    path.write_text(json.dumps(doc))
    return path


def _width(local: Path) -> int:
    return json.loads((local / "config.json").read_text())["intermediate_size"]


def bake_recorded(tmp_path: Path, circuit: Path, out: str, name: str) -> dict:
    record = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CNA_DIST_DOWNLOAD_CONCURRENCY": "2"}
    env["CNA_DIST_DOWNLOAD_PART_SIZE"] = "4m"
    env["MALLOC_ARENA_MAX"] = "1"
    env["CNA_DIST_CACHE"] = str(tmp_path / "cache")
    args = ["bake", "--circuit", str(circuit), "--multiplier", "0.5", "--out", out]
    proc = subprocess.run(
        [sys.executable, "-c", RECORDER, str(record), *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == out
    return json.loads(record.read_text())


@pytest.mark.slow
def test_remote_bake_streams_and_copies_server_side(s3_server: str, tmp_path: Path) -> None:
    import s3fs

    big = save_layout(tmp_path / "big", hidden=512, inter=2048)
    small = save_layout(tmp_path / "small", hidden=16, inter=64)
    upload(big, "s3://cna/models/big")
    upload(small, "s3://cna/models/small")
    baseline = bake_recorded(
        tmp_path, remote_circuit(tmp_path, small, "s3://cna/models/small", "cs"), "s3://cna/baked/small", "small"
    )
    got = bake_recorded(
        tmp_path, remote_circuit(tmp_path, big, "s3://cna/models/big", "cb"), "s3://cna/baked/big", "big"
    )

    files = sorted(f.name for f in big.glob("*.safetensors"))
    sizes = {f: (big / f).stat().st_size for f in files}
    read = {f: sum(n for p, n in got["reads"] if p.endswith(f"models/big/{f}")) for f in files}
    copied = {p1.rsplit("/", 1)[-1] for p1, _ in got["copies"]}
    # the file without a circuit neuron: copied server-side, only its header read
    assert files[1] in copied and read[files[1]] < 64 << 10
    # the rewritten files: read once, not copied
    for f in (files[0], files[2]):
        assert f not in copied
        assert sizes[f] <= read[f] < sizes[f] + (64 << 10)
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= copied

    largest = 2048 * 512 * 4  # bytes of the largest tensor (4 MiB)
    extra = (got["peak"] - got["start"]) - (baseline["peak"] - baseline["start"])
    model_bytes = sum(sizes.values())
    print(
        f"bake RSS {got['start'] / 2**20:.0f} -> peak {got['peak'] / 2**20:.0f} MiB, tiny model's bake "
        f"{baseline['start'] / 2**20:.0f} -> {baseline['peak'] / 2**20:.0f} MiB, "
        f"extra {extra / 2**20:.1f} MiB; model {model_bytes / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB"
    )
    # Bound: the largest tensor twice (read buffer, bytes written), the reads in flight twice (2 x 4 MiB, each also
    # buffered by the HTTP client), the 5 MiB upload parts (one being filled, two in flight, each of those also
    # held by the HTTP client) and 8 MiB slack: 57 MiB. One whole weight file (96 MiB) would not fit.
    assert extra < 2 * largest + 2 * 2 * (4 << 20) + 5 * (5 << 20) + (8 << 20)
    assert extra < sizes[files[0]]

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert fs.info(f"cna/baked/big/{files[1]}")["ETag"] == fs.info(f"cna/models/big/{files[1]}")["ETag"]
    local = tmp_path / "baked-first.safetensors"
    fs.get_file(f"cna/baked/big/{files[0]}", str(local))
    with safe_open(big / files[0], "pt") as a, safe_open(local, "pt") as b:
        for name in a.keys():
            x, y = a.get_tensor(name), b.get_tensor(name)
            if name == "model.layers.1.mlp.down_proj.weight":
                x[:, [0, 7]] *= 0.5
            assert torch.equal(x, y), name
    rec = json.loads(fs.cat_file("cna/baked/big/cna-bake.json"))
    assert rec["multiplier"] == 0.5 and rec["source"]["uri"] == "s3://cna/models/big"
    assert not fs.exists("cna/baked/big/.cna-bake-partial")


@pytest.mark.slow
def test_remote_bake_killed_and_rerun(s3_server: str, tmp_path: Path) -> None:
    """A bake killed (SIGKILL) after its first weight file leaves no loadable-looking folder; the same command
    run again writes only what is missing, and the result is the one an uninterrupted bake writes."""
    import signal
    import time

    import s3fs

    local = save_layout(tmp_path / "model", hidden=256, inter=2048)
    upload(local, "s3://cna/models/k")
    circuit = remote_circuit(tmp_path, local, "s3://cna/models/k", "ck")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CNA_DIST_DOWNLOAD_PART_SIZE": "1m"}
    env["CNA_DIST_CACHE"] = str(tmp_path / "cache")
    env["CNA_DIST_DOWNLOAD_CONCURRENCY"] = "1"  # slow enough to be killed in the middle
    fs = s3fs.S3FileSystem()

    def command(out: str) -> list[str]:
        return [sys.executable, "-m", "cna_dist.cli", "bake", "--circuit", str(circuit), "--multiplier", "2"] + [
            "--out",
            out,
        ]

    proc = subprocess.Popen(command("s3://cna/baked/k"), env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            fs.invalidate_cache()
            if fs.glob("cna/baked/k/.cna-bake-partial/*/*.done"):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the bake finished before it could be killed"
    fs.invalidate_cache()
    left = {p.rsplit("/", 1)[-1] for p in fs.ls("cna/baked/k")}
    assert not left & {"config.json", "cna-bake.json", "README.md", "model.safetensors.index.json"}

    inspect = subprocess.run(
        [sys.executable, "-m", "cna_dist.cli", "inspect", "s3://cna/baked/k"], env=env, cwd=ROOT, capture_output=True
    )
    assert inspect.returncode == 1 and b"unfinished bake" in inspect.stdout

    rerun = subprocess.run(command("s3://cna/baked/k"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    finished_before = int(rerun.stderr.split(" finished before")[0].rsplit(" ", 1)[-1])
    assert finished_before >= 1
    fresh = subprocess.run(command("s3://cna/baked/fresh"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("cna/baked/fresh"))
    assert names == sorted(p.rsplit("/", 1)[-1] for p in fs.ls("cna/baked/k"))
    for name in names:
        if name not in ("cna-bake.json", "README.md"):
            assert fs.cat_file(f"cna/baked/k/{name}") == fs.cat_file(f"cna/baked/fresh/{name}"), name
