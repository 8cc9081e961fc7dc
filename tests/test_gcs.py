"""gs:// through gcsfs against fake-gcs-server on 127.0.0.1 (tests/gcsserver.py): conditional create
(`ifGenerationMatch=0`), racing registry publishers, the run lease and its takeover, and `cna-dist mine` with a Hub
model, a parquet prompt table and the store and registry on GCS."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from cna_dist.cli import main
from cna_dist.store import objects
from cna_dist.store import uri as urimod
from tests import test_lease
from tests.conftest import DIVERSE, HARMFUL, HARMLESS, write_jsonl
from tests.gcsserver import gcs_emulator
from tests.hubserver import HubServer, folder_files
from tests.test_registry import check_race, race, racers

pytestmark = pytest.mark.gcs


@pytest.fixture(scope="module")
def gcs() -> Iterator[str]:
    with gcs_emulator() as url:
        yield url


def fresh(what: str) -> str:
    return f"gs://cna/{uuid.uuid4().hex}/{what}"


def test_conditional_create_never_overwrites(gcs: str) -> None:
    store = objects.open_objects(fresh("registry"))
    assert type(store) is objects.ConditionalPutObjects
    store.create_if_absent("a/v1.json", b"first")
    with pytest.raises(objects.AlreadyExists):
        store.create_if_absent("a/v1.json", b"second")
    assert store.get("a/v1.json") == b"first"
    store.create_if_absent("a/v1.json", b"first")  # a retried create that finds its own bytes: done, not a conflict
    store.put("a/latest", b"1")
    assert store.list("a") == ["latest", "v1.json"] and store.exists("a/v1.json") and not store.exists("a/v2.json")
    assert store.modified("a/v1.json") is not None
    store.delete("a/v1.json")
    assert not store.exists("a/v1.json")


def test_racing_publishers_each_get_their_own_version(gcs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six publishers at once: v1..v6, each circuit exactly once, nothing overwritten; GCS needs no claims."""

    def no_claims(*args: object, **kwargs: object) -> None:
        raise AssertionError("the claim protocol ran on GCS, which has conditional writes")

    monkeypatch.setattr(objects.ClaimObjects, "create_if_absent", no_claims)
    reg = fresh("circuits")
    circuits = racers()
    check_race(circuits, race(circuits, reg), reg)


LEASE_TESTS: list[Callable[[str], None]] = [
    test_lease.test_a_live_lease_makes_the_second_driver_wait_then_fail,
    test_lease.test_the_waiting_driver_gets_the_lease_when_it_is_released,
    test_lease.test_a_stale_heartbeat_is_taken_over_and_the_old_holder_notices,
    test_lease.test_an_unreadable_lease_is_stale_by_its_age,
]


@pytest.mark.parametrize("check", LEASE_TESTS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_run_lease_on_gcs(gcs: str, check: Callable[[str], None]) -> None:
    """The lease tests of test_lease.py, run against a lease object on GCS (takeover included)."""
    check(fresh("runs/r1/lease.json"))


def test_gs_options_keep_the_users(gcs: str) -> None:
    assert urimod.effective_options("gs://b/x", {"token": "anon"}) == {"token": "anon"}


# -- the whole path: Hub model, parquet prompts with categories, store and registry on GCS ---------------------------


def jbb_parquet(path: Path, goals: list[str]) -> None:
    """A table in JailbreakBench's JBB-Behaviors layout."""
    n = len(goals)
    columns = {
        "Index": list(range(1, n + 1)),
        "Goal": goals,
        "Target": ["Sure, here is"] * n,
        "Behavior": [f"b{i}" for i in range(n)],
        "Category": ["Physical harm", "Malware/Hacking", None, "Physical harm", "Economic harm"][:n],
        "Source": ["Original"] * n,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_mine_a_hub_model_with_parquet_prompts_into_gcs(
    gcs: str, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    root = fresh("out")
    with HubServer() as hub_server:
        monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
        sha = hub_server.hub.commit("acme/tiny-instruct", folder_files(tiny_llama))
        hub_server.hub.repos["acme/tiny-instruct"].branches["v1"] = sha
        hub_server.hub.commit("acme/tiny-instruct", folder_files(tiny_llama) | {"README.md": b"moved on"})
        jbb_parquet(tmp_path / "prompts" / "jbb.parquet", HARMFUL)
        (tmp_path / "prompts" / "harmless.csv").write_text("goal,target\n" + "".join(f"{t},ok\n" for t in HARMLESS))
        write_jsonl(tmp_path / "prompts" / "diverse.jsonl", DIVERSE)
        manifest = {
            "name": "refusal",
            "model": {"uri": "hf://acme/tiny-instruct@v1"},
            "prompts": {
                "positive": {"uri": "./prompts/jbb.parquet", "field": "Goal", "category_field": "Category"},
                "negative": {"uri": "./prompts/harmless.csv", "field": "goal"},
                "diverse": "./prompts/diverse.jsonl",
            },
            "select": {"top_k": 40, "exclude_layers": [0, 1]},
            "capture": {"dtype": "float32"},
            "output": {"store": f"{root}/store", "registry": f"{root}/circuits", "storage_options": {"token": "anon"}},
        }
        (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
        result = CliRunner().invoke(main, ["mine", str(tmp_path / "manifest.yaml"), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    uri = result.output.strip().splitlines()[-1]
    assert uri == f"{root}/circuits/refusal/tiny-instruct/v1.json"
    fs, path = urimod.filesystem(uri, {"token": "anon"})
    circuit = json.loads(fs.cat_file(path))
    assert circuit["model"]["revision"] == sha and circuit["model"]["uri"] == f"hf://acme/tiny-instruct@{sha}"
    assert circuit["prompts"]["positive"]["count"] == len(HARMFUL) and circuit["neurons"]
    assert circuit["provenance"]["store"] == f"{root}/store"
    run = json.loads(fs.cat_file(f"{path.split('/circuits/')[0]}/store/runs/{circuit['provenance']['run']}/run.json"))
    assert run["fingerprint"] == circuit["model"]["fingerprint"] and sha in run["model_uri"]


def test_a_model_and_a_prompt_table_on_gcs(
    gcs: str, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint folder on gs:// is fingerprinted by its listing (ETags) and copied in ranged reads, like S3's;
    a parquet table on gs:// is read in batches through gcsfs."""
    from cna_dist.manifest import PromptSet
    from cna_dist.model import checkpoint
    from cna_dist.prompts import sets as promptsmod

    monkeypatch.setenv("CNA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CNA_DIST_DOWNLOAD_PART_SIZE", "65536")
    model = fresh("models/tiny")
    fs, path = urimod.filesystem(model)
    fs.put(f"{tiny_llama}/", path, recursive=True)
    fp = checkpoint.fingerprint(model)
    folder = checkpoint.localize(model, fp=fp)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).read_bytes() == (tiny_llama / name).read_bytes()
    assert checkpoint.fingerprint(model) == fp
    fs.pipe_file(f"{path}/model.safetensors", (tiny_llama / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    assert checkpoint.fingerprint(model) != fp  # new bytes, new ETag, new fingerprint
    jbb_parquet(tmp_path / "jbb.parquet", HARMFUL)
    table = fresh("prompts/jbb.parquet")
    fs.put_file(str(tmp_path / "jbb.parquet"), table.removeprefix("gs://"))
    got = promptsmod.load("positive", PromptSet(uri=table, field="Goal", category_field="Category"))
    assert got.texts == HARMFUL and got.categories == [
        "Physical harm",
        "Malware/Hacking",
        "uncategorized",
        "Physical harm",
        "Economic harm",
    ]
