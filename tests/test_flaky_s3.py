"""`mine` on a flaky object store: 503 SlowDown, 500, connections reset mid-body and stalls, made for real by a
proxy in front of moto (tests/faultproxy.py) that the model, the store and the registry are all reached through.

Transient faults are ridden out by the storage stack's retries (cna_dist/store/uri.py) and give the clean run's
circuit; persistent ones end the run with exit 1 naming the object, in bounded time; and a run cut short leaves
nothing that a later run trusts (no marker without its data): the rerun on a sound store gives the clean circuit.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cna_dist.circuit import file as circuitmod
from cna_dist.cli import main
from cna_dist.store import uri as urimod
from cna_dist.store.activations import ActivationStore
from cna_dist.store.lease import Lease
from cna_dist.store.objects import AlreadyExists, open_objects
from tests.conftest import DIVERSE, HARMFUL, HARMLESS, MINIMAL, run_meta, write_jsonl
from tests.faultproxy import Faults, serve_faults

# Persistent faults should end a test run soon: one retry per request in botocore (s3fs's own loop stays).
QUICK = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2}}}
# Stalls longer than this read timeout are cut and retried (the retry default stays: config_kwargs merge key by key).
STALLING = {"config_kwargs": {"read_timeout": 0.8}}
FORCED = {
    ("GET", ".safetensors"): "reset",  # the replica's model download, cut mid-body
    ("PUT", "/lease.json"): "reset",  # the lease's conditional create lands, its answer is lost
    ("PUT", "/acts/c/"): "drop",  # a chunk PUT cut before the store took it
    ("PUT", "/commits/"): "reset",  # a commit marker lands, its answer is lost
    ("GET", "/commits/"): "slowdown",
    ("GET", "/acts/c/"): "reset",  # a reduce read cut mid-body
    ("PUT", "/v1.json"): "reset",  # the registry version's conditional create lands, its answer is lost
}


@pytest.fixture(scope="module")
def s3_workspace(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, s3_server: str) -> Path:
    """The spec's minimal manifest with its model on S3 (copied in before any proxy starts), float32, 4-row shards."""
    root = tmp_path_factory.mktemp("flaky")
    write_jsonl(root / "prompts" / "harmful.jsonl", HARMFUL)
    write_jsonl(root / "prompts" / "harmless.jsonl", HARMLESS)
    write_jsonl(root / "prompts" / "diverse.jsonl", DIVERSE)
    model = f"s3://cna/{uuid.uuid4().hex}/tiny-instruct"
    fs, path = urimod.filesystem(model)
    fs.put(str(tiny_llama) + "/", path, recursive=True)
    data = yaml.safe_load(MINIMAL)
    data["model"] = {"uri": model}
    data["capture"] = {"dtype": "float32", "shard_rows": 4}
    (root / "manifest.yaml").write_text(yaml.safe_dump(data))
    return root / "manifest.yaml"


@pytest.fixture(autouse=True)
def own_model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run downloads the model afresh, so the download meets the proxy too."""
    monkeypatch.setenv("CNA_DIST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def clean(s3_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> circuitmod.Circuit:
    """The circuit mined straight from moto: what every flaky run must give."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNA_DIST_CACHE", str(tmp_path_factory.mktemp("cache")))
        circuit, _ = mined(outputs(s3_workspace, "clean"), tmp_path_factory.mktemp("clean") / "summary.json")
    return circuit


def outputs(manifest: Path, tag: str, storage_options: dict | None = None) -> Path:
    """The manifest with its store and registry on S3 under a fresh prefix (and `storage_options` for both)."""
    data = yaml.safe_load(manifest.read_text())
    root = f"s3://cna/{uuid.uuid4().hex}"
    data["output"] = {"store": f"{root}/store", "registry": f"{root}/circuits"}
    if storage_options:
        data["output"]["storage_options"] = storage_options
    path = manifest.with_name(f"manifest-{tag}-{uuid.uuid4().hex[:8]}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def mine(manifest: Path, summary: Path) -> tuple[int, str, dict | None]:
    result = CliRunner().invoke(main, ["mine", str(manifest), "--quiet", "--in-process", "--summary", str(summary)])
    return result.exit_code, result.output, json.loads(summary.read_text()) if summary.exists() else None


def mined(manifest: Path, summary: Path) -> tuple[circuitmod.Circuit, dict]:
    code, output, s = mine(manifest, summary)
    assert code == 0, output
    assert s is not None
    return circuitmod.load(output.strip().splitlines()[-1]), s


def same_circuit(a: circuitmod.Circuit, b: circuitmod.Circuit) -> None:
    assert a.pairs() == b.pairs()
    assert [n.delta for n in a.neurons] == [n.delta for n in b.neurons]
    assert a.universal == b.universal and a.inputs_sha256 == b.inputs_sha256


def timed(s3_server: str, faults: Faults, manifest: Path, summary: Path) -> tuple[int, str, float]:
    """`mine` through the flaky proxy: exit code, output, seconds taken."""
    t0 = time.monotonic()
    with serve_faults(s3_server, faults):
        code, output, _ = mine(manifest, summary)
    took = time.monotonic() - t0
    print(f"exit {code} after {took:.1f} s, {faults.requests} requests, faults {dict(faults.counts)}: {output}")
    return code, output, took


def run_folder(manifest: Path) -> tuple[object, str]:
    store = yaml.safe_load(manifest.read_text())["output"]["store"]
    fs, path = urimod.filesystem(store)
    (run,) = fs.ls(f"{path}/runs", detail=False)
    return fs, run


@pytest.mark.slow
def test_transient_faults_give_the_clean_circuit(
    s3_workspace: Path, s3_server: str, clean: circuitmod.Circuit, tmp_path: Path
) -> None:
    """Capture writes, markers, reduce reads, publish, the lease and the model download all meet faults, and retry."""
    manifest = outputs(s3_workspace, "flaky", STALLING)
    faults = Faults(
        seed=7, error_share=0.1, drop_share=0.05, reset_share=0.05, delay_share=0.03, delay_s=1.5, forced=dict(FORCED)
    )
    t0 = time.monotonic()
    with serve_faults(s3_server, faults):
        circuit, summary = mined(manifest, tmp_path / "flaky.json")
    print(f"flaky run: {time.monotonic() - t0:.1f} s, {faults.requests} requests, faults {dict(faults.counts)}")
    same_circuit(circuit, clean)
    # A version whose answer was lost is still this run's publication, not "unchanged" and not a v2.
    assert (summary["status"], summary["version"], summary["shards_captured"]) == ("published", 1, 4)
    assert faults.forced_hit == set(FORCED)
    assert {"slowdown", "internal", "drop", "reset", "delay"} <= set(faults.counts)
    assert faults.injected() >= 20
    fs, run = run_folder(manifest)
    assert not fs.exists(f"{run}/lease.json")  # released, though its create's answer was lost


@pytest.mark.slow
def test_a_persistent_fault_fails_the_run_naming_the_object_and_a_rerun_trusts_nothing_half_done(
    s3_workspace: Path, s3_server: str, clean: circuitmod.Circuit, tmp_path: Path
) -> None:
    """Shard 2's marker cannot be written: exit 1 naming it; its chunk (torn here by hand) is captured again."""
    manifest = outputs(s3_workspace, "marker", QUICK)
    marker = "commits/00000002.json"
    code, output, took = timed(s3_server, Faults(outage_match=marker), manifest, tmp_path / "a.json")
    fs, run = run_folder(manifest)
    assert code == 1 and f"cannot write the commit marker s3://{run}/{marker}" in output
    assert "reduce your request rate" in output and took < 90
    assert not fs.exists(f"{run}/{marker}")
    chunk = f"{run}/acts/c/2/0/0"  # shard 2's rows (4 rows a shard and a chunk): written, never committed
    fs.pipe_file(chunk, fs.cat_file(chunk)[:100])  # as a store without atomic PUTs could leave it
    circuit, summary = mined(manifest, tmp_path / "rerun.json")
    same_circuit(circuit, clean)
    assert (summary["shards_captured"], summary["shards_reused"]) == (1, 3)


@pytest.mark.slow
@pytest.mark.parametrize("start", ["/acts/c/", "/circuits/"])
def test_an_outage_ends_the_run_with_exit_1_in_bounded_time(
    s3_workspace: Path, s3_server: str, clean: circuitmod.Circuit, tmp_path: Path, start: str
) -> None:
    """Every request 503 from the first chunk write (or the first registry write) on: exit 1 naming an object, soon;
    a later run recovers."""
    manifest = outputs(s3_workspace, "down", QUICK)
    code, output, took = timed(s3_server, Faults(outage_from=start), manifest, tmp_path / "a.json")
    fs, run = run_folder(manifest)
    registry = yaml.safe_load(manifest.read_text())["output"]["registry"]
    named = f"s3://{run}/acts" if start == "/acts/c/" else f"{registry}/refusal/tiny-instruct/v1.json"
    assert code == 1 and named in output and took < 90
    if start == "/acts/c/":
        # The lease could not be released in the outage. A real rerun is a new process, and the lease names the old,
        # exited one, so it is taken at once; here the holder is this very process, alive, so the test clears it.
        assert fs.exists(f"{run}/lease.json")
        fs.rm(f"{run}/lease.json")
    circuit, _ = mined(manifest, tmp_path / "rerun.json")
    same_circuit(circuit, clean)


def test_s3_retry_defaults_and_the_users_storage_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults fill what the user left out, key by key inside config_kwargs; a user's `retries` replaces them whole."""
    for name in urimod.RETRY_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    defaults = {**urimod.S3_CONFIG, "retries": urimod.S3_RETRIES}
    assert urimod.effective_options("s3://b/x") == {"config_kwargs": defaults}
    user = {"key": "k", "config_kwargs": {"read_timeout": 1, "retries": {"mode": "adaptive", "max_attempts": 2}}}
    merged = urimod.effective_options("s3://b/x", user)
    assert merged["key"] == "k"
    assert merged["config_kwargs"] == {
        "connect_timeout": 5,
        "read_timeout": 1,
        "retries": user["config_kwargs"]["retries"],
    }
    assert user["config_kwargs"] == {"read_timeout": 1, "retries": {"mode": "adaptive", "max_attempts": 2}}  # untouched
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # botocore reads it when no retries are configured
    assert "retries" not in urimod.effective_options("s3://b/x")["config_kwargs"]
    assert urimod.effective_options("/tmp/x") == {"auto_mkdir": True}
    assert urimod.effective_options("gs://b/x", {"token": "t"}) == {"token": "t"}


def test_zarr_and_every_other_s3_object_get_the_same_settings(s3_server: str) -> None:
    """The store's zarr array opens its own filesystem: with the retries and timeouts of `filesystem`."""
    store = f"s3://cna/{uuid.uuid4().hex}/store"
    run = ActivationStore(store, {"config_kwargs": {"read_timeout": 7}}).open_run(run_meta())
    want = {"connect_timeout": 5, "read_timeout": 7, "retries": urimod.S3_RETRIES}
    assert run.array().store.fs.config_kwargs == want
    assert run.fs.config_kwargs == want
    assert run.fs.s3.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}


def test_a_create_whose_answer_was_lost_is_still_its_writers(s3_server: str) -> None:
    """The conditional PUT lands, its answer is cut, the retry meets it (412): the writer wrote it, not a rival."""
    root = f"s3://cna/{uuid.uuid4().hex}"
    faults = Faults(forced={("PUT", "/v1.json"): "reset", ("PUT", "/lease.json"): "reset"})
    with serve_faults(s3_server, faults):
        objects = open_objects(root)
        objects.create_if_absent("r/v1.json", b"mine")
        with pytest.raises(AlreadyExists):
            objects.create_if_absent("r/v1.json", b"a rival's")
        lease = Lease(f"{root}/run/lease.json", wait_s=5, poll_s=0.5).acquire()  # not a wait on itself
        lease.release()
    assert faults.forced_hit == set(faults.forced)
    assert open_objects(root).get("r/v1.json") == b"mine" and not open_objects(root).exists("run/lease.json")
