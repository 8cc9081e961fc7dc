"""fsspec URIs: protocol detection, resolving relative paths against the manifest's folder, opening and joining."""

from __future__ import annotations

from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from cna_dist.errors import BadInput
from cna_dist.store import uri as urimod


@pytest.mark.parametrize(
    "uri,protocol,local",
    [
        ("/data/prompts.jsonl", "file", True),
        ("prompts/harmful.jsonl", "file", True),
        ("./models/tiny", "file", True),
        ("~/models/tiny", "file", True),
        ("file:///data/store", "file", True),
        ("local:///data/store", "local", True),
        ("s3://bucket/models/qwen", "s3", False),
        ("gs://bucket/x", "gs", False),
        ("memory://scratch/x", "memory", False),
    ],
)
def test_protocol_of_and_is_local(uri: str, protocol: str, local: bool) -> None:
    assert urimod.protocol_of(uri) == protocol
    assert urimod.is_local(uri) is local


def test_resolve_relative_against_base() -> None:
    base = Path("/srv/jobs/refusal")
    assert urimod.resolve("./prompts/harmful.jsonl", base) == "/srv/jobs/refusal/prompts/harmful.jsonl"
    assert urimod.resolve("prompts/harmful.jsonl", base) == "/srv/jobs/refusal/prompts/harmful.jsonl"
    assert urimod.resolve("../shared/models/x", base) == "/srv/jobs/shared/models/x"  # normalised, no ".."
    assert urimod.resolve("a//b/./c/", base) == "/srv/jobs/refusal/a/b/c"


def test_resolve_relative_without_base_uses_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert urimod.resolve("out/store", None) == str(tmp_path / "out" / "store")


def test_resolve_absolute_file_url_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = Path("/elsewhere")
    assert urimod.resolve("/data/store", base) == "/data/store"
    assert urimod.resolve("file:///data/a/../store", base) == "/data/store"  # the protocol is dropped
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert urimod.resolve("~/models/tiny", base) == str(tmp_path / "home" / "models" / "tiny")  # not under base


@pytest.mark.parametrize(
    "uri",
    ["s3://bucket/a/../b", "gs://bucket/./x", "memory://scratch/rel", "https://example.org/p.jsonl"],
)
def test_resolve_leaves_urls_untouched(uri: str) -> None:
    assert urimod.resolve(uri, Path("/base")) == uri


def test_resolve_keeps_the_name_of_a_symlinked_folder(tmp_path: Path) -> None:
    (tmp_path / "real-model").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tmp_path / "real-model", target_is_directory=True)
    resolved = urimod.resolve("./models/tiny", tmp_path)
    assert resolved == str(tmp_path / "models" / "tiny")
    assert Path(resolved).resolve() == (tmp_path / "real-model").resolve()  # still reaches the same folder


@pytest.mark.parametrize("uri", ["/local/path", "rel/path", "file:///x", "s3://b/x", "memory://x"])
def test_check_protocol_accepts_known_protocols(uri: str) -> None:
    assert urimod.check_protocol(uri, source="m.yaml", field="output.store") is None


def test_check_protocol_names_field_source_and_protocol() -> None:
    with pytest.raises(BadInput) as info:
        urimod.check_protocol("nosuchfs://bucket/x", source="jobs/m.yaml", field="output.store")
    err = info.value
    assert err.field == "output.store" and err.source == "jobs/m.yaml"
    assert str(err).startswith("jobs/m.yaml: output.store: unknown storage protocol 'nosuchfs'")
    assert "'nosuchfs://bucket/x'" in str(err)


def test_filesystem_local_creates_missing_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet" / "there" / "f.bin"
    fs, path = urimod.filesystem(str(target))
    assert isinstance(fs, LocalFileSystem) and path == str(target)
    with fs.open(path, "wb") as f:
        f.write(b"abc")
    assert target.read_bytes() == b"abc"


def test_filesystem_file_url_and_explicit_auto_mkdir(tmp_path: Path) -> None:
    fs, path = urimod.filesystem(f"file://{tmp_path}/a/f.txt")
    assert isinstance(fs, LocalFileSystem) and path == f"{tmp_path}/a/f.txt"
    fs, path = urimod.filesystem(str(tmp_path / "b" / "f.txt"), {"auto_mkdir": False})  # the caller's choice wins
    with pytest.raises(FileNotFoundError):
        fs.open(path, "wb")
    assert not (tmp_path / "b").exists()


def test_filesystem_remote_protocol_and_path() -> None:
    fs, path = urimod.filesystem("memory://cna-test-uri/x/y.json")
    assert isinstance(fs, MemoryFileSystem) and path == "/cna-test-uri/x/y.json"
    s3, key = urimod.filesystem("s3://bucket/models/qwen")  # no request is made to build it
    assert "s3" in s3.protocol and key == "bucket/models/qwen"


def test_join_local_and_urls() -> None:
    assert urimod.join("/reg/circuits", "refusal", "v1.json") == "/reg/circuits/refusal/v1.json"
    assert urimod.join("relative/reg", "latest") == "relative/reg/latest"
    assert urimod.join("s3://bucket/reg", "refusal", "v1.json") == "s3://bucket/reg/refusal/v1.json"
    assert urimod.join("s3://bucket/reg/", "v2.json") == "s3://bucket/reg/v2.json"  # no double slash
    assert urimod.join("s3://bucket", "a") == "s3://bucket/a"
    assert urimod.join("file:///data/reg", "x") == "file:///data/reg/x"
