"""validate(): what it opens and returns, what it leaves to --check-remote, and the limits it checks against the
model (called directly; tests/test_manifest.py covers the CLI's exit codes and messages)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cna_dist import manifest as manifestmod
from cna_dist.errors import BadInput
from cna_dist.model.checkpoint import ModelInfo
from cna_dist.store import uri as urimod
from cna_dist.validate import check_writable, validate
from tests.conftest import DIVERSE, HARMFUL, HARMLESS, snapshot, write_jsonl


def edit(manifest: Path, change: Callable[[dict], object]) -> manifestmod.Manifest:
    data = yaml.safe_load(manifest.read_text())
    change(data)
    manifest.write_text(yaml.safe_dump(data))
    return manifestmod.load(manifest)


def refused(m: manifestmod.Manifest, field: str) -> str:
    with pytest.raises(BadInput) as info:
        validate(m)
    assert info.value.field == field and info.value.source == m.source
    return str(info.value).removeprefix(f"{m.source}: {field}: ")


def test_valid_workspace(workspace: Path) -> None:
    m = manifestmod.load(workspace)
    before = snapshot(workspace.parent)
    checked = validate(m)
    assert checked.manifest is m
    assert checked.model == ModelInfo("LlamaForCausalLM", "llama", 4, 64, 32)
    assert checked.skipped_remote == []
    assert sorted(checked.prompts) == ["diverse", "negative", "positive"]
    root = workspace.parent / "prompts"
    for name, file, texts in [
        ("positive", "harmful.jsonl", HARMFUL),
        ("negative", "harmless.jsonl", HARMLESS),
        ("diverse", "diverse.jsonl", DIVERSE),
    ]:
        p = checked.prompts[name]
        assert p.name == name and p.uri == str(root / file) and p.texts == texts
        assert p.sha256 == hashlib.sha256((root / file).read_bytes()).hexdigest()
    assert snapshot(workspace.parent) == before  # validation writes nothing
    assert not (workspace.parent / "out").exists()


def test_eval_set_is_loaded_and_diverse_is_optional(workspace: Path) -> None:
    write_jsonl(workspace.parent / "prompts" / "eval.jsonl", ["a held-out prompt"])

    def change(d: dict) -> None:
        d["prompts"]["eval"] = {"uri": "./prompts/eval.jsonl"}
        del d["prompts"]["diverse"]

    checked = validate(edit(workspace, change))
    assert sorted(checked.prompts) == ["eval", "negative", "positive"]
    assert checked.prompts["eval"].texts == ["a held-out prompt"]


def test_remote_uris_are_skipped_without_check_remote(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local_only = urimod.filesystem

    def filesystem(uri: str, storage_options: dict | None = None) -> Any:
        assert urimod.is_local(uri), f"opened {uri}"
        return local_only(uri, storage_options)

    monkeypatch.setattr(urimod, "filesystem", filesystem)

    def change(d: dict) -> None:
        d["model"]["uri"] = "s3://models/qwen2.5-72b-instruct"
        d["prompts"]["diverse"] = {"uri": "s3://prompts/diverse.jsonl"}
        d["prompts"]["eval"] = {"uri": "s3://prompts/eval.json"}
        d["output"] = {"store": "s3://out/store", "registry": "s3://out/circuits"}
        d["select"]["exclude_layers"] = [0, 1, 70]  # beyond the tiny models; the remote model is not read

    checked = validate(edit(workspace, change))
    assert checked.model is None
    assert checked.skipped_remote == [
        "s3://models/qwen2.5-72b-instruct",
        "s3://prompts/diverse.jsonl",
        "s3://prompts/eval.json",
    ]
    assert sorted(checked.prompts) == ["negative", "positive"]  # the local sets are still read


def test_check_remote_opens_the_s3_model_and_prompts(workspace: Path, tiny_llama: Path, s3_server: str) -> None:
    prefix = f"s3://cna/{uuid.uuid4().hex}"
    fs, path = urimod.filesystem(prefix + "/model")
    fs.put(str(tiny_llama), path, recursive=True)
    fs.pipe_file(urimod.filesystem(prefix + "/diverse.jsonl")[1], b'"one"\n"two"\n')

    def change(d: dict) -> None:
        d["model"]["uri"] = prefix + "/model"
        d["prompts"]["diverse"] = {"uri": prefix + "/diverse.jsonl"}

    m = edit(workspace, change)
    assert validate(m).skipped_remote == [prefix + "/model", prefix + "/diverse.jsonl"]
    checked = validate(m, check_remote=True)
    assert checked.skipped_remote == []
    assert checked.model == ModelInfo("LlamaForCausalLM", "llama", 4, 64, 32)
    assert checked.prompts["diverse"].texts == ["one", "two"]


def test_exclude_layers_beyond_the_model(workspace: Path) -> None:
    m = edit(workspace, lambda d: d["select"].update(exclude_layers=[0, 4, 9]))
    assert refused(m, "select.exclude_layers") == "[4, 9] beyond the model's 4 layers (0..3)"


def test_every_layer_excluded(workspace: Path) -> None:
    m = edit(workspace, lambda d: d["select"].update(exclude_layers=[3, 2, 1, 0]))
    assert refused(m, "select.exclude_layers") == "every layer is excluded"
    assert validate(edit(workspace, lambda d: d["select"].update(exclude_layers=[0, 1, 2]))).model is not None


def test_top_k_up_to_the_candidates(workspace: Path) -> None:
    # 4 layers x 64 neurons, layers 0 and 1 excluded: 128 candidates
    assert validate(edit(workspace, lambda d: d["select"].update(top_k=128))).model is not None
    m = edit(workspace, lambda d: d["select"].update(top_k=129))
    assert refused(m, "select.top_k") == "top_k 129 exceeds the 128 candidate neurons"
    m = edit(workspace, lambda d: d["select"].update(top_k=200, exclude_layers=[]))
    assert validate(m).model is not None  # 256 candidates without exclusions


def test_top_fraction_over_the_candidates_names_top_fraction(workspace: Path) -> None:
    def change(d: dict) -> None:
        del d["select"]["top_k"]
        d["select"]["top_fraction"] = 0.75  # k = 192 of 256 neurons, 128 candidates

    with pytest.raises(BadInput) as info:
        validate(edit(workspace, change))
    assert info.value.field == "select.top_fraction"


def test_check_writable_missing_folders_are_fine(tmp_path: Path) -> None:
    check_writable(str(tmp_path / "a" / "b" / "store"), "output.store", "m.yaml")
    assert not (tmp_path / "a").exists()  # checked, not created
    check_writable("s3://bucket/not/checked", "output.store", "m.yaml")  # remote: left to the run


@pytest.mark.parametrize("below", [(), ("store",), ("store", "deeper")])
def test_check_writable_under_a_file(tmp_path: Path, below: tuple[str, ...]) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(BadInput) as info:
        check_writable(str(blocker.joinpath(*below)), "output.store", "m.yaml")
    assert info.value.field == "output.store" and info.value.source == "m.yaml"
    assert str(info.value) == f"m.yaml: output.store: {blocker} is a file, not a folder"


def test_check_writable_read_only_folder(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: every folder is writable")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(BadInput) as info:
            check_writable(str(ro / "circuits" / "x"), "output.registry", "m.yaml")
        assert info.value.field == "output.registry"
        assert str(info.value) == f"m.yaml: output.registry: no write permission on {ro}"
    finally:
        ro.chmod(0o700)


def test_check_writable_without_permission_as_any_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same branch even as root: os.access is asked for write and search permission on the nearest folder."""
    asked: list[tuple[Path, int]] = []

    def access(path: Path, mode: int) -> bool:
        asked.append((Path(path), mode))
        return False

    monkeypatch.setattr("cna_dist.validate.os.access", access)
    with pytest.raises(BadInput) as info:
        check_writable(str(tmp_path / "circuits" / "x"), "output.registry", "m.yaml")
    assert str(info.value) == f"m.yaml: output.registry: no write permission on {tmp_path}"
    assert asked == [(tmp_path, os.W_OK | os.X_OK)]


def test_read_only_output_fails_validate(workspace: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: every folder is writable")
    ro = workspace.parent / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        m = edit(workspace, lambda d: d["output"].update(store=str(ro / "store")))
        assert refused(m, "output.store") == f"no write permission on {ro}"
    finally:
        ro.chmod(0o700)
