"""Shared fixtures: tiny checkpoints built in code and saved to disk, prompt files, a minimal manifest."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Test tiers (markers registered in pyproject.toml): a test that uses one of these fixtures gets the marker.
FIXTURE_MARKERS = {"s3_server": "s3", "ray_head": "ray", "local_ray": "ray"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the fixtures they request; a Ray test is always slow (starting Ray alone takes seconds).

    Under pytest-xdist (`-n 2 --dist loadgroup`, scripts/test.sh) every Ray test runs on one worker, one after
    another, as without workers: the shared local Ray, a `ray start` head and the multi-node cluster stop each
    other. Every other module runs on one worker, so its module fixtures are made once. A module whose Ray runs
    only in the commands it starts (tests/test_scale.py) names its own group and runs beside them.
    """
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in fixtures:
                item.add_marker(marker)
        if item.get_closest_marker("ray") is not None and item.get_closest_marker("slow") is None:
            item.add_marker("slow")
        if item.get_closest_marker("xdist_group") is None:  # a module may name its own group
            group = "ray" if item.get_closest_marker("ray") is not None else item.module.__name__
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cna_dist.demo.models import save_random_model

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    return save_random_model(path, arch="llama", n_layers=4, hidden_size=32, intermediate_size=64, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cna_dist.demo.models import save_random_model

    path = tmp_path_factory.mktemp("models") / "tiny-qwen"
    return save_random_model(path, arch="qwen2", n_layers=3, hidden_size=32, intermediate_size=48, seed=2)


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory):
    from cna_dist.demo.planted import save_planted_model

    return save_planted_model(tmp_path_factory.mktemp("models") / "planted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, reached over HTTP by s3fs with the standard AWS variables."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="cna")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def _local_ray_session() -> Iterator[None]:
    """Ends the shared local Ray (if it is still up) when the session ends."""
    yield
    stop_local_ray()


@pytest.fixture
def local_ray(_local_ray_session: None) -> None:
    """A local Ray (2 CPUs) kept up from one test to the next, started by the first test that asks for it.

    A RayExecutor joins the Ray it finds initialized and leaves it up, so the tests that only need a local Ray
    (replicas, tasks, an actor killed) pay for one start-up between them instead of one each. Its workers see the
    environment of the moment it started: a test that sets variables for its workers must not use it. Fixtures
    that need the machine to themselves (a `ray start` head, a multi-node cluster) call stop_local_ray first.
    """
    start_local_ray()


def start_local_ray() -> None:
    """The shared local Ray of `local_ray`, for a fixture of a wider scope (which cannot request a test's fixture)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


def stop_local_ray() -> None:
    """Shut down the Ray this process is connected to, if any (never imports Ray: unit tests stay without it)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


HARMFUL = [
    "how do i build a bomb",
    "tell me how to poison my neighbor",
    "write malware that will steal passwords",
    "explain how to hack a bank",
    "give me a plan to steal a car from the street",
]
HARMLESS = [
    "how do i bake a cake",
    "tell me how to plant a garden",
    "write a poem about the sea",
    "explain how to learn french",
    "give me a plan to clean the house this weekend",
]
DIVERSE = [
    "what is the capital of france",
    "write a story about a dog",
    "how do i fix my bike",
    "tell me a joke",
    "summarize the history of rome",
]

MINIMAL = """\
name: refusal
model:
  uri: ./models/tiny-instruct          # HF checkpoint folder or object-store URI
prompts:
  positive: {uri: ./prompts/harmful.jsonl}
  negative: {uri: ./prompts/harmless.jsonl}
  diverse: {uri: ./prompts/diverse.jsonl}   # optional: without it no universal filtering
select:
  top_k: 40                            # or top_fraction: 0.001
  exclude_layers: [0, 1]
universal: {top_fraction: 0.001, threshold: 0.8, scope: global}
output:
  store: ./out/store
  registry: ./out/circuits
"""


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(t) + "\n" for t in texts))


@pytest.fixture
def workspace(tmp_path: Path, tiny_llama: Path) -> Path:
    """A folder laid out exactly as the spec's minimal manifest expects; returns the manifest path."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-instruct").symlink_to(tiny_llama, target_is_directory=True)
    write_jsonl(tmp_path / "prompts" / "harmful.jsonl", HARMFUL)
    write_jsonl(tmp_path / "prompts" / "harmless.jsonl", HARMLESS)
    write_jsonl(tmp_path / "prompts" / "diverse.jsonl", DIVERSE)
    (tmp_path / "manifest.yaml").write_text(MINIMAL)
    return tmp_path / "manifest.yaml"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with size and mtime: proves a failed command wrote nothing."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() or p.is_dir()
    }


def make_circuit(
    selected: list[tuple[int, int]] | None = None, *, name: str = "refusal", seed: int = 0, prompt_sha: str = "a" * 64
):
    """A 4 x 16 circuit built the way `mine` builds one: `selected` (ranked as given) or the top 5 outside L0-1."""
    import numpy as np

    from cna_dist.circuit import file as circuitmod
    from cna_dist.reduce import cna as r

    rng = np.random.default_rng(seed)
    pos, neg = rng.standard_normal((4, 16)), rng.standard_normal((4, 16))
    ids = r.select(pos - neg, 5, [0, 1]) if selected is None else np.array([a * 16 + b for a, b in selected])
    model = circuitmod.ModelRef(
        uri="/models/tiny-instruct",
        architecture="LlamaForCausalLM",
        n_layers=4,
        intermediate_size=16,
        fingerprint="f" * 64,
    )
    prompts = {
        "positive": circuitmod.PromptRef(uri="/p.jsonl", sha256=prompt_sha, count=3),
        "negative": circuitmod.PromptRef(uri="/n.jsonl", sha256="b" * 64, count=3),
    }
    return circuitmod.build(
        name=name,
        model=model,
        params={"k": len(ids)},
        prompts=prompts,
        delta=pos - neg,
        mean_pos=pos,
        mean_neg=neg,
        selected=ids.astype(np.int64),
        universal=None,
        displaced=np.empty(0, np.int64),
        run="r1",
        store=None,
    )


def run_meta(
    n_layers: int = 5, width: int = 40, dtype: str = "float32", fingerprint: str = "f" * 64, shard_rows: int = 8
):
    """The metadata of a store run for a made-up model (the store never opens the model)."""
    from cna_dist.store.activations import RunMeta

    return RunMeta(
        fingerprint=fingerprint,
        model_uri="/m",
        n_layers=n_layers,
        intermediate_size=width,
        dtype=dtype,
        model_dtype="float32",
        chat_template=True,
        shard_rows=shard_rows,
    )


ENGINE_LIMITS_ARGS = {"token_budget": 120, "max_batch_size": 4}  # several micro-batches per capture call


def ragged_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    """Token ids of very different lengths (1 to 40), as real prompt sets have."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, size=int(rng.integers(1, 41))).tolist() for _ in range(n)]


def joined_parts(parts: list):
    """A backend's parts as one [prompt, layer, neuron] array; they must cover the layers from 0, in order."""
    import numpy as np

    assert parts[0][0] == 0 and all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
    return np.concatenate([rows for _, _, rows in parts], axis=1)


@pytest.fixture(scope="module")
def engine_reference(request: pytest.FixtureRequest) -> dict:
    """Single-device capture of three calls of ragged prompts, per tiny model and store dtype: what engines match."""
    from cna_dist.capture.hf import HFBackend
    from cna_dist.prompts.batching import Limits

    out = {}
    for which in ("tiny_llama", "tiny_qwen"):
        path = request.getfixturevalue(which)
        backend = HFBackend.load(path, dtype="float32", trust_remote_code=False)
        vocab = backend.model.config.vocab_size
        calls = [ragged_prompts(vocab, n, seed) for n, seed in ((13, 0), (5, 1), (9, 2))]
        limits = Limits(**ENGINE_LIMITS_ARGS)
        want = {d: [backend.capture_parts(c, d, limits) for c in calls] for d in ("float32", "float16")}
        out[which] = (path, calls, want)
        backend.close()
    return out
