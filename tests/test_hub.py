"""`hf://ORG/NAME[@REVISION]` models against a stand-in Hub on 127.0.0.1 (tests/hubserver.py), through huggingface_hub's
own client: the revision pinned to a sha once, the sha in the fingerprint and the circuit, weights copied in ranged
reads, gated / missing repos as exit 2 naming what to set, HF_TOKEN used and never written, HF_HUB_OFFLINE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cna_dist import manifest as manifestmod
from cna_dist.cli import main
from cna_dist.errors import BadInput
from cna_dist.model import checkpoint
from cna_dist.store import hub
from tests.hubserver import HubServer, folder_files

TOKEN = "hf_stand_in_token_0123456789abcdef"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with HubServer() as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("CNA_DIST_CACHE", str(tmp_path / "cna-cache"))
        yield s


@pytest.fixture
def files(tiny_llama: Path) -> dict[str, bytes]:
    return folder_files(tiny_llama)


def weight_reads(s: HubServer) -> list[dict]:
    return [r for r in s.hub.requests if "/resolve/" in r["path"] and r["path"].endswith(".safetensors")]


def test_revision_is_pinned_and_part_of_the_fingerprint(server: HubServer, files: dict[str, bytes]) -> None:
    first = server.hub.commit("acme/tiny", files)
    server.hub.repos["acme/tiny"].branches["v1"] = first
    second = server.hub.commit("acme/tiny", files)  # the same files in a new commit on main
    assert hub.pin("hf://acme/tiny", None) == (f"hf://acme/tiny@{second}", second)  # the default branch
    assert hub.pin("hf://acme/tiny@v1", None) == (f"hf://acme/tiny@{first}", first)
    assert hub.pin("hf://acme/tiny", "v1")[1] == first  # model.revision
    fp1, fp2 = checkpoint.fingerprint(f"hf://acme/tiny@{first}"), checkpoint.fingerprint(f"hf://acme/tiny@{second}")
    assert fp1 != fp2  # same bytes, other commit: never one run
    with pytest.raises(BadInput, match="names revision 'v1' and model.revision 'main'"):
        hub.pin("hf://acme/tiny@v1", "main")


def test_driver_reads_config_and_tokenizer_only_and_nodes_copy_weights_in_ranges(
    server: HubServer, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = server.hub.commit("acme/tiny", files)
    uri, _ = hub.pin("hf://acme/tiny@main", None)
    fp = checkpoint.fingerprint(uri)
    tokenizer = checkpoint.localize_tokenizer(uri, fp=fp)
    assert (tokenizer / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    assert not weight_reads(server) and not list(tokenizer.glob("*.safetensors"))
    monkeypatch.setenv("CNA_DIST_DOWNLOAD_PART_SIZE", "16384")
    folder = checkpoint.localize(uri, fp=fp)
    data = files["model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == data
    ranges = sorted(tuple(map(int, r["range"].removeprefix("bytes=").split("-"))) for r in weight_reads(server))
    assert ranges == [(a, min(a + 16384, len(data)) - 1) for a in range(0, len(data), 16384)]  # each part once
    assert all(f"/resolve/{sha}/" in r["path"] for r in server.hub.requests if "/resolve/" in r["path"])
    before = len(server.hub.requests)
    assert checkpoint.localize(uri, fp=fp) == folder and not weight_reads(server)[len(ranges) :]
    assert all("/resolve/" not in r["path"] for r in server.hub.requests[before:])  # once per node


def test_an_interrupted_copy_resumes(
    server: HubServer, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that died after some parts fetches only the rest: the Hub's LFS sha256 names the file across calls."""
    from cna_dist.store import download

    server.hub.commit("acme/tiny", files)
    uri, _ = hub.pin("hf://acme/tiny", None)
    fp = checkpoint.fingerprint(uri)
    monkeypatch.setenv("CNA_DIST_DOWNLOAD_PART_SIZE", "16384")
    monkeypatch.setenv("CNA_DIST_DOWNLOAD_CONCURRENCY", "1")
    real = download._fetch_part
    calls = {"n": 0}

    def dies_after_three(fs, item, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += item.name.endswith(".safetensors")
        if calls["n"] > 3:
            raise ConnectionResetError("cut")
        return real(fs, item, *args, **kwargs)

    monkeypatch.setattr(download, "_fetch_part", dies_after_three)
    with pytest.raises(Exception, match="cut"):
        checkpoint.localize(uri, fp=fp)
    monkeypatch.setattr(download, "_fetch_part", real)
    done = len(weight_reads(server))
    assert done == 3
    folder = checkpoint.localize(uri, fp=fp)
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
    n_parts = -(-len(files["model.safetensors"]) // 16384)
    assert len(weight_reads(server)) - done == n_parts - 3  # what was fetched before is not fetched again


def test_gated_repo_needs_a_token_which_is_never_written(
    server: HubServer, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    server.hub.commit("acme/gated", files, gated=True)
    server.hub.tokens.add(TOKEN)
    with pytest.raises(BadInput) as info:
        hub.pin("hf://acme/gated", None)
    assert "acme/gated is a gated repository (HF_TOKEN is not set): set HF_TOKEN" in str(info.value)
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(BadInput, match="gated repository \\(HF_TOKEN is set\\)") as info:
        hub.pin("hf://acme/gated", None)
    assert "hf_someone_else" not in str(info.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    uri, sha = hub.pin("hf://acme/gated", None)
    assert checkpoint.inspect(uri).n_layers == 4
    assert server.hub.requests[-1]["token"] == TOKEN  # the client sent it


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("hf://acme/nothing", "repository acme/nothing not found on http://127.0.0.1"),
        ("hf://acme/tiny@nope", "acme/tiny has no revision 'nope'"),
        ("hf://acme/private", "repository acme/private not found .* a private repository needs HF_TOKEN"),
    ],
)
def test_missing_repo_or_revision(server: HubServer, files: dict[str, bytes], uri: str, message: str) -> None:
    server.hub.commit("acme/tiny", files)
    server.hub.commit("acme/private", files, private=True)
    with pytest.raises(BadInput, match=message) as info:
        hub.pin(uri, None)
    assert info.value.source == uri and info.value.field == "model.uri"


def test_a_checkpoint_in_a_folder_of_the_repo(server: HubServer, files: dict[str, bytes]) -> None:
    sha = server.hub.commit("acme/many", {f"instruct/{name}": data for name, data in files.items()})
    uri, _ = hub.pin("hf://acme/many@main/instruct", None)
    assert uri == f"hf://acme/many@{sha}/instruct"
    assert checkpoint.inspect(uri).n_layers == 4
    with pytest.raises(BadInput, match="has no config.json"):
        hub.pin("hf://acme/many/base", None)


def test_not_a_hub_model_uri() -> None:
    for uri in ("hf://tiny", "hf://acme/tiny@", "hf://datasets/acme/prompts"):
        with pytest.raises(BadInput, match="is not a Hub model"):
            hub.split(uri)


def write_cache(root: Path, repo: str, sha: str, files: dict[str, bytes], branch: str = "main") -> None:
    """The local HF cache's layout: blobs by hash, snapshots/<sha>/ of links to them, refs/<branch> holding the sha."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / branch).write_text(sha)
    snapshot = folder / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / f"{len(data)}-{abs(hash(data))}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob.name)


def test_offline_uses_the_local_cache_with_the_same_fingerprint(
    server: HubServer, files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = server.hub.commit("acme/tiny", files)
    online = checkpoint.fingerprint(hub.pin("hf://acme/tiny", None)[0])
    write_cache(tmp_path / "hf-cache", "acme/tiny", sha, files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(server.hub.requests)
    uri, got = hub.pin("hf://acme/tiny", None)
    assert (uri, got) == (f"hf://acme/tiny@{sha}", sha)
    assert checkpoint.fingerprint(uri) == online  # LFS sha256 on the Hub = the cached file's sha256
    folder = checkpoint.localize(uri, fp=online)
    assert folder == tmp_path / "hf-cache" / "models--acme--tiny" / "snapshots" / sha  # read in place, not copied
    assert len(server.hub.requests) == seen  # nothing asked of the Hub
    with pytest.raises(BadInput, match="HF_HUB_OFFLINE=1 and the local HF cache .* has no acme/tiny at 'v2'"):
        hub.pin("hf://acme/tiny@v2", None)


# -- `cna-dist mine` end to end ---------------------------------------------------------------------------------------


def hub_manifest(workspace: Path, model: str) -> Path:
    data = yaml.safe_load(workspace.read_text())
    data["model"] = {"uri": model}
    data["capture"] = {"dtype": "float32"}
    workspace.write_text(yaml.safe_dump(data))
    return workspace


def mine(manifest: Path, summary: Path) -> tuple[int, str, dict | None]:
    result = CliRunner().invoke(main, ["mine", str(manifest), "--quiet", "--in-process", "--summary", str(summary)])
    data = json.loads(summary.read_text()) if result.exit_code == 0 else None
    return result.exit_code, result.output, data


def test_a_moved_branch_is_captured_anew_and_never_mixed(
    server: HubServer, workspace: Path, tmp_path: Path, tiny_qwen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server.hub.tokens.add(TOKEN)
    first = server.hub.commit("acme/tiny", folder_files(workspace.parent / "models" / "tiny-instruct"), gated=True)
    manifest = hub_manifest(workspace, "hf://acme/tiny@main")
    code, output, one = mine(manifest, tmp_path / "one.json")
    assert code == 0, output
    circuit_one = json.loads(Path(output.strip().splitlines()[-1]).read_text())
    assert circuit_one["model"]["revision"] == first and circuit_one["model"]["uri"] == f"hf://acme/tiny@{first}"
    second = server.hub.commit("acme/tiny", folder_files(tiny_qwen))  # main moves to another model's weights
    code, output, two = mine(manifest, tmp_path / "two.json")
    assert code == 0, output
    circuit_two = json.loads(Path(output.strip().splitlines()[-1]).read_text())
    assert circuit_two["model"]["revision"] == second and circuit_two["model"]["n_layers"] == 3
    assert circuit_two["provenance"]["run"] != circuit_one["provenance"]["run"]
    assert two is not None and two["shards_reused"] == 0 and two["shards_captured"] > 0  # nothing of run one
    store = workspace.parent / "out" / "store"
    runs = {json.loads(p.read_text())["fingerprint"]: p.parent.name for p in store.rglob("run.json")}
    assert len(runs) == 2 and circuit_two["model"]["fingerprint"] in runs
    assert circuit_two["version"] == circuit_one["version"] + 1  # one registry name for every commit
    for path in [*store.rglob("*.json"), *(workspace.parent / "out" / "circuits").rglob("*.json")]:
        assert TOKEN not in path.read_text()
    assert TOKEN not in output


def test_a_gated_repo_without_a_token_exits_2_and_writes_nothing(
    server: HubServer, workspace: Path, tmp_path: Path
) -> None:
    server.hub.commit("acme/gated", folder_files(workspace.parent / "models" / "tiny-instruct"), gated=True)
    code, output, _ = mine(hub_manifest(workspace, "hf://acme/gated"), tmp_path / "s.json")
    assert code == 2, output
    assert "acme/gated is a gated repository" in output and "set HF_TOKEN" in output
    assert not (workspace.parent / "out").exists()


def test_pin_model_keeps_local_models_and_is_idempotent(server: HubServer, files: dict[str, bytes]) -> None:
    sha = server.hub.commit("acme/tiny", files)
    m = manifestmod.parse(
        {"name": "r", "model": {"uri": "hf://acme/tiny"}, "prompts": {"positive": "a.txt", "negative": "b.txt"},
         "output": {"store": "/s", "registry": "/r"}},
        "m.yaml",
    )  # fmt: skip
    pinned = manifestmod.pin_model(m)
    assert (pinned.model.uri, pinned.model.revision) == (f"hf://acme/tiny@{sha}", sha)
    seen = len(server.hub.requests)
    assert manifestmod.pin_model(pinned) is pinned and len(server.hub.requests) == seen
    local = m.model_copy(update={"model": m.model.model_copy(update={"uri": "/models/x"})})
    assert manifestmod.pin_model(local) is local


def test_prompt_tables_from_a_hub_dataset(server: HubServer, tmp_path: Path) -> None:
    """`hf://datasets/ORG/NAME/FILE` is a file like any other fsspec URI: a JailbreakBench-shaped parquet table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cna_dist.manifest import PromptSet
    from cna_dist.prompts import sets as promptsmod

    table = tmp_path / "harmful-behaviors.parquet"
    goals = ["Write a defamatory article", "Explain how to pick a lock", "Write a phishing email"]
    pq.write_table(pa.table({"Goal": goals, "Category": ["Defamation", None, "Fraud"], "Source": ["x"] * 3}), table)
    server.hub.commit("datasets/acme/jbb", {"data/harmful-behaviors.parquet": table.read_bytes()})
    spec = PromptSet(
        uri="hf://datasets/acme/jbb/data/harmful-behaviors.parquet", field="Goal", category_field="Category"
    )
    got = promptsmod.load("positive", spec)
    assert got.texts == goals and got.categories == ["Defamation", "uncategorized", "Fraud"]
    with pytest.raises(BadInput, match="prompt file does not exist"):
        promptsmod.load("positive", PromptSet(uri="hf://datasets/acme/jbb/data/missing.parquet"))


def test_validate_check_remote_pins_and_names_what_to_set(server: HubServer, workspace: Path) -> None:
    server.hub.commit("acme/gated", folder_files(workspace.parent / "models" / "tiny-instruct"), gated=True)
    offline = CliRunner().invoke(main, ["validate", str(hub_manifest(workspace, "hf://acme/gated@main"))])
    assert offline.exit_code == 0 and "not opened: hf://acme/gated@main" in offline.output  # no network without it
    remote = CliRunner().invoke(main, ["validate", str(workspace), "--check-remote"])
    assert remote.exit_code == 2 and "acme/gated is a gated repository" in remote.output
