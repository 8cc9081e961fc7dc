"""Manifest and validation: the spec's minimal manifest as written, and every bad input -> exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cna_dist import manifest as manifestmod
from cna_dist.cli import main
from tests.conftest import snapshot, stop_local_ray


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_minimal_manifest_is_accepted_as_written(workspace: Path) -> None:
    m = manifestmod.load(workspace)
    assert m.name == "refusal" and m.select.top_k == 40 and m.universal.scope == "global"
    assert m.capture.dtype == "float16"  # the default outside tools rely on
    assert m.model.uri == str(workspace.parent / "models" / "tiny-instruct")  # relative to the manifest's folder
    result = run("validate", str(workspace))
    assert result.exit_code == 0, result.output
    assert "ok:" in result.output and "positive: 5" in result.output


def edit(workspace: Path, change) -> None:
    data = yaml.safe_load(workspace.read_text())
    change(data)
    workspace.write_text(yaml.safe_dump(data))


BAD_MANIFESTS = [
    ("unknown-key", lambda d: d.update(colour="blue"), ["colour", "unknown key"]),
    ("nested-unknown-key", lambda d: d["select"].update(topk=3), ["select.topk", "unknown key"]),
    ("wrong-type", lambda d: d["select"].update(top_k="forty"), ["select.top_k", "'forty'"]),
    ("out-of-range", lambda d: d["universal"].update(threshold=1.5), ["universal.threshold", "1.5"]),
    ("bad-scope", lambda d: d["universal"].update(scope="everywhere"), ["universal.scope", "everywhere"]),
    ("both-k-and-fraction", lambda d: d["select"].update(top_fraction=0.01), ["select", "not both"]),
    ("negative-layer", lambda d: d["select"].update(exclude_layers=[-1]), ["select.exclude_layers", "-1"]),
    ("bad-name", lambda d: d.update(name="my circuit/1"), ["name", "my circuit/1"]),
    ("missing-output", lambda d: d.pop("output"), ["output", "missing"]),
    ("unknown-protocol", lambda d: d["output"].update(store="nosuchfs://bucket/x"), ["output.store", "nosuchfs"]),
    (
        "exclude-beyond-layers",
        lambda d: d["select"].update(exclude_layers=[0, 9]),
        ["select.exclude_layers", "[9]", "4 layers"],
    ),
    ("top-k-too-large", lambda d: d["select"].update(top_k=10**6), ["select.top_k", "1000000"]),
    (
        "missing-prompt-file",
        lambda d: d["prompts"]["positive"].update(uri="./prompts/nope.jsonl"),
        ["nope.jsonl", "does not exist"],
    ),
    ("model-not-checkpoint", lambda d: d["model"].update(uri="./prompts"), ["prompts", "model.uri", "config.json"]),
    ("model-missing", lambda d: d["model"].update(uri="./models/absent"), ["absent", "does not exist"]),
]


@pytest.fixture(scope="module", autouse=True)
def no_ray_up() -> None:
    """These tests check that bad input starts no Ray, so the suite's shared local Ray (if up) is stopped first."""
    stop_local_ray()


@pytest.mark.parametrize("name,change,needles", BAD_MANIFESTS, ids=[b[0] for b in BAD_MANIFESTS])
@pytest.mark.parametrize("command", ["validate", "mine"])
def test_bad_manifest_exit_2_names_the_fault_and_writes_nothing(
    workspace: Path, name, change, needles, command: str
) -> None:
    edit(workspace, change)
    before = snapshot(workspace.parent)
    result = run(command, str(workspace))
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    assert str(workspace) in result.output or name in ("model-not-checkpoint", "model-missing", "missing-prompt-file")
    assert snapshot(workspace.parent) == before
    assert not (workspace.parent / "out").exists()
    assert not ray_started()  # bad input is refused before any Ray start-up


def ray_started() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


BAD_PROMPT_FILES = [
    ("harmful.jsonl", "", ["harmful.jsonl", "no prompts"]),
    ("harmful.jsonl", '"ok"\n"fine"\n{"prompt": "x"\n', ["harmful.jsonl", "line 3", "invalid JSON"]),
    ("harmful.jsonl", '"ok"\n{"text": "x"}\n', ["line 2", "no field 'prompt'"]),
    ("harmful.jsonl", '"ok"\n42\n', ["line 2", "int"]),
    ("harmful.jsonl", '"ok"\n"   "\n', ["line 2", "empty prompt"]),
]


@pytest.mark.parametrize("file,content,needles", BAD_PROMPT_FILES)
def test_bad_prompt_file_names_file_and_line(workspace: Path, file: str, content: str, needles: list[str]) -> None:
    (workspace.parent / "prompts" / file).write_text(content)
    before = snapshot(workspace.parent)
    result = run("mine", str(workspace))
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    assert snapshot(workspace.parent) == before
    assert not ray_started()


def test_prompt_formats_and_field(workspace: Path) -> None:
    from cna_dist.prompts import sets as prompts

    root = workspace.parent / "prompts"
    (root / "a.json").write_text('[{"instruction": "one"}, {"instruction": "two"}]')
    (root / "b.txt").write_text("first line\n\nsecond line\n")
    (root / "c.jsonl").write_text('{"prompt": "p1"}\n"p2"\n')
    from cna_dist.manifest import PromptSet

    assert prompts.load("x", PromptSet(uri=str(root / "a.json"), field="instruction")).texts == ["one", "two"]
    assert prompts.load("x", PromptSet(uri=str(root / "b.txt"))).texts == ["first line", "second line"]
    loaded = prompts.load("x", PromptSet(uri=str(root / "c.jsonl")))
    assert loaded.texts == ["p1", "p2"] and len(loaded.sha256) == 64


def test_missing_manifest_and_bad_yaml(tmp_path: Path) -> None:
    result = run("validate", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 2 and "absent.yaml" in result.output
    (tmp_path / "m.yaml").write_text("name: [unclosed\n")
    result = run("validate", str(tmp_path / "m.yaml"))
    assert result.exit_code == 2 and "not valid YAML" in result.output


def test_read_only_registry_is_bad_input(workspace: Path) -> None:
    ro = workspace.parent / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        edit(workspace, lambda d: d["output"].update(registry=str(ro / "circuits")))
        result = run("validate", str(workspace))
        if result.exit_code == 0:
            pytest.skip("running as a user that can write anywhere (root)")
        assert result.exit_code == 2 and "output.registry" in result.output and "write permission" in result.output
    finally:
        ro.chmod(0o700)


def test_console_script_exit_code(workspace: Path) -> None:
    edit(workspace, lambda d: d.update(colour="blue"))
    proc = subprocess.run(
        [sys.executable, "-m", "cna_dist.cli", "validate", str(workspace)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "colour" in proc.stderr
