"""The example manifests in manifests/: they validate offline, the nightly list resolves, and the built-in
prompt sets load, have the documented counts and are exactly what manifests/prompts/build.py writes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cna_dist import manifest as manifestmod
from cna_dist.circuit import registry
from cna_dist.cli import main
from cna_dist.manifest import PromptSet
from cna_dist.prompts import sets as promptsmod

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
PROMPTS = MANIFESTS / "prompts"
BUILD = PROMPTS / "build.py"
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

NIGHTLY = MANIFESTS / "nightly.yaml"
JOB_MANIFESTS = sorted(p for p in MANIFESTS.glob("*.yaml") if p != NIGHTLY)
# Named by infra/rayjob-mine.yaml and infra/raycronjob-nightly.yaml / cronjob-nightly-fallback.yaml.
INFRA_REFERENCED = ["qwen2.5-72b-instruct-refusal.yaml", "nightly.yaml"]

PROMPT_COUNTS = {"harmful.jsonl": 128, "harmless.jsonl": 128, "diverse.jsonl": 128, "eval-harmful.jsonl": 32}

# (n_layers, intermediate_size) of the real checkpoints, by registry model slug: validate cannot check layer
# bounds or k offline because it does not open the remote config.json, so this test does it.
REAL_SHAPES = {
    "Qwen2.5-72B-Instruct": (80, 29568),
    "Llama-3.1-70B-Instruct": (80, 28672),
    "Qwen3-32B": (64, 25600),
    "gemma-3-27b-it-text": (62, 21504),
    "Qwen3-235B-A22B-Instruct-2507": (94, 128 * 1536),  # MoE: 128 experts x 1536 neurons a layer
}
# GPUs per replica: 4 x 80 GB for the 70B class, 2 for the 27-32B models, 8 for Qwen3-235B-A22B (~470 GB of bf16)
REAL_GPUS = {
    "Qwen2.5-72B-Instruct": 4,
    "Llama-3.1-70B-Instruct": 4,
    "Qwen3-32B": 2,
    "gemma-3-27b-it-text": 2,
    "Qwen3-235B-A22B-Instruct-2507": 8,
}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach S3 (or anything else over TCP/UDP) fails loudly instead of hanging or passing."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "offline-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "offline-test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)

    real_connect = socket.socket.connect

    def no_network(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"validate tried to open a network connection to {address!r}")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)


def test_the_example_manifests_are_there() -> None:
    names = {p.name for p in JOB_MANIFESTS}
    assert {"qwen2.5-72b-instruct-refusal.yaml", "llama-3.1-70b-instruct-refusal.yaml"} <= names
    for name in INFRA_REFERENCED:
        assert (MANIFESTS / name).is_file(), f"infra/ runs manifests/{name}"


@pytest.mark.parametrize("path", JOB_MANIFESTS, ids=lambda p: p.name)
def test_validates_offline(path: Path, offline: None) -> None:
    start = time.monotonic()
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - start < 30
    assert result.output.startswith(f"ok: {path}")
    assert "model not opened (remote)" in result.output
    assert "positive: 128, negative: 128, diverse: 128, eval: 32" in result.output
    m = manifestmod.load(path)
    assert f"not opened: {m.model.uri} (use --check-remote)" in result.output


@pytest.mark.parametrize("path", JOB_MANIFESTS, ids=lambda p: p.name)
def test_real_model_settings(path: Path) -> None:
    m = manifestmod.load(path)
    assert m.model.uri.startswith("s3://") and m.output.store.startswith("s3://")
    assert m.output.registry.startswith("s3://")
    assert m.model.revision is None  # unknown commit: never a made-up one
    assert m.model.dtype == "bfloat16" and m.model.max_memory_per_gpu == "76GiB"
    assert m.model.gpus_per_replica == REAL_GPUS[registry.model_slug(m.model.uri)]
    assert m.capture.dtype == "float16"
    assert m.select.top_fraction == 0.001 and m.select.top_k is None and m.select.exclude_layers == [0, 1]
    assert (m.universal.top_fraction, m.universal.threshold, m.universal.scope) == (0.001, 0.8, "global")
    for name, spec in [*m.prompt_sets().items(), ("eval", m.prompts.eval)]:
        assert spec is not None and Path(spec.uri).parent == PROMPTS, f"prompts.{name} is not a built-in set"
    # What validate checks once it can read config.json (--check-remote), done here with the known shapes.
    n_layers, width = REAL_SHAPES[registry.model_slug(m.model.uri)]
    assert max(m.select.exclude_layers) < n_layers
    k = m.select.k_for(n_layers, width)
    assert k == int(0.001 * n_layers * width) <= (n_layers - len(m.select.exclude_layers)) * width


def test_nightly_list() -> None:
    data = yaml.safe_load(NIGHTLY.read_text())
    assert list(data) == ["manifests"]
    entries = data["manifests"]
    assert entries and all(isinstance(e, str) for e in entries) and len(set(entries)) == len(entries)
    for entry in entries:
        target = NIGHTLY.parent / entry
        assert target.is_file(), f"nightly.yaml lists {entry}, which does not exist"
        manifestmod.load(target)
    assert {"qwen2.5-72b-instruct-refusal.yaml", "llama-3.1-70b-instruct-refusal.yaml"} <= set(entries)


def load_set(name: str) -> list[str]:
    return promptsmod.load(name, PromptSet(uri=str(PROMPTS / name))).texts


@pytest.mark.parametrize("name", sorted(PROMPT_COUNTS))
def test_builtin_prompt_set(name: str) -> None:
    texts = load_set(name)
    assert len(texts) == PROMPT_COUNTS[name]
    assert len(set(texts)) == len(texts), "duplicate prompts"
    assert all(t == " ".join(t.split()) for t in texts), "prompts are whitespace-normalised"


def test_builtin_sets_are_disjoint_and_small() -> None:
    sets = {name: set(load_set(name)) for name in PROMPT_COUNTS}
    assert not sets["eval-harmful.jsonl"] & sets["harmful.jsonl"], "eval prompts must be held out"
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], f"{a} and {b} share prompts"
    size = sum(p.stat().st_size for p in MANIFESTS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 200_000


def test_build_script_reproduces_the_committed_files(tmp_path: Path) -> None:
    out = tmp_path / "prompts"
    subprocess.run([sys.executable, "-B", str(BUILD), "--out", str(out)], check=True, capture_output=True, timeout=120)
    built = sorted(p.name for p in out.iterdir())
    committed = sorted(p.name for p in PROMPTS.iterdir() if p.is_file() and p.name != "build.py")
    assert built == committed
    for name in built:
        assert (out / name).read_bytes() == (PROMPTS / name).read_bytes(), f"{name} differs: rerun build.py"


@pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason=f"{SHARED_DATASETS} is absent (shared data sets)")
def test_no_prompt_is_copied_from_the_shared_datasets() -> None:
    """Their README forbids copying them into the tree: no built-in prompt holds one of their instructions."""

    def norm(text: str) -> str:
        return " ".join(text.lower().split()).rstrip(".?!")

    theirs = {
        norm(row["instruction"]) for f in sorted(SHARED_DATASETS.glob("*.json")) for row in json.loads(f.read_text())
    }
    ours = [norm(t) for name in PROMPT_COUNTS for t in load_set(name)]
    assert not set(ours) & theirs
    long_theirs = [t for t in theirs if len(t.split()) >= 6]
    assert not [t for t in long_theirs if any(t in o for o in ours)]
