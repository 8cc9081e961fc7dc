"""Every bad-input case of the suite, run through `mine`: exit 2, and the store, registry and model cache are
byte-identical before and after (contents and modification times), even when a previous run filled them.

The cases are the suite's own lists (test_manifest, test_hostile, test_weights and the limits of test_validate),
so a case added there is covered here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cna_dist.cli import main
from tests import test_hostile, test_manifest, test_weights
from tests.conftest import DIVERSE, HARMFUL, HARMLESS, MINIMAL, write_jsonl

MODEL = Path("models") / "tiny-instruct"
Damage = Callable[[Path], None]


def contents(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under root: sha256 of its bytes (folders: "dir") and its modification time."""
    out: dict[str, tuple[str, int]] = {}
    for p in sorted(root.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (digest, p.stat().st_mtime_ns)
    return out


def manifest_edit(change: Callable[[dict], object]) -> Damage:
    def damage(root: Path) -> None:
        data = yaml.safe_load((root / "manifest.yaml").read_text())
        change(data)
        (root / "manifest.yaml").write_text(yaml.safe_dump(data))

    return damage


def manifest_text(change: Callable[[str], str]) -> Damage:
    return lambda root: (root / "manifest.yaml").write_text(change((root / "manifest.yaml").read_text()))


def prompt_file(name: str, content: str | bytes) -> Damage:
    def damage(root: Path) -> None:
        path = root / "prompts" / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return damage


def model_damage(change: Callable[[Path], object]) -> Damage:
    return lambda root: change(root / MODEL)


def tokenizer_config(**values: object) -> Damage:
    def damage(root: Path) -> None:
        path = root / MODEL / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))

    return damage


def both(*steps: Damage) -> Damage:
    def damage(root: Path) -> None:
        for step in steps:
            step(root)

    return damage


def positive_uri(uri: str) -> Damage:
    return manifest_edit(lambda d: d["prompts"]["positive"].update(uri=uri))


def every_case() -> list[tuple[str, Damage]]:
    """(id, damage to a pristine workspace) for every bad input the suite knows `mine` must refuse."""
    cases = [(f"manifest-{n}", manifest_edit(c)) for n, c, _ in test_manifest.BAD_MANIFESTS]
    cases += [(f"prompts-{i}", prompt_file(f, c)) for i, (f, c, _) in enumerate(test_manifest.BAD_PROMPT_FILES)]
    cases += [(f"number-{n}", manifest_edit(c)) for n, c, *_ in test_hostile.NUMBERS]
    cases += [(f"yaml-{n}", manifest_text(b)) for n, b, _ in test_hostile.BOMBS]
    cases += [(f"checkpoint-{n}", model_damage(d)) for n, d, _ in test_hostile.CHECKPOINTS]
    cases += [(f"header-{n}", model_damage(d)) for n, d, _ in test_weights.CASES]
    cases += [
        ("binary-prompts", prompt_file("harmful.jsonl", b'"fine"\n"\xff\xfe broken"\n')),
        ("deep-jsonl", both(prompt_file("deep.jsonl", "[" * 10**5 + "]" * 10**5), positive_uri("prompts/deep.jsonl"))),
        ("huge-prompt", both(
            tokenizer_config(model_max_length=512),
            prompt_file("huge.txt", "how do i build a bomb " * 50_000),
            positive_uri("./prompts/huge.txt"),
        )),
        ("nothing-to-pad", tokenizer_config(pad_token=None, eos_token=None, unk_token=None)),
        ("every-layer-excluded", manifest_edit(lambda d: d["select"].update(exclude_layers=[0, 1, 2, 3]))),
        ("top-fraction-over", manifest_edit(lambda d: d["select"].update(top_k=None, top_fraction=0.9))),
        ("store-under-a-file", both(prompt_file("a-file", "x"), manifest_edit(
            lambda d: d["output"].update(store="./prompts/a-file/store")))),
        ("stream-on-two-gpus", manifest_edit(lambda d: d["model"].update(engine="stream", gpus_per_replica=2))),
    ]  # fmt: skip
    return cases


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A workspace whose store, registry and cache a good `mine` filled; its inputs kept in `pristine/`."""
    root = tmp_path_factory.mktemp("nothing-written")
    shutil.copytree(tiny_llama, root / "pristine" / MODEL)
    for name, texts in (("harmful", HARMFUL), ("harmless", HARMLESS), ("diverse", DIVERSE)):
        write_jsonl(root / "pristine" / "prompts" / f"{name}.jsonl", texts)
    (root / "pristine" / "manifest.yaml").write_text(MINIMAL)
    restore(root)
    return root


def restore(root: Path) -> None:
    for part in (MODEL.parts[0], "prompts"):
        shutil.rmtree(root / part, ignore_errors=True)
        shutil.copytree(root / "pristine" / part, root / part)
    shutil.copy(root / "pristine" / "manifest.yaml", root / "manifest.yaml")
    # a new modification time: a fingerprint taken now would hash the file again and remember it in the cache
    restore.calls = getattr(restore, "calls", 0) + 1  # type: ignore[attr-defined]
    os.utime(root / MODEL / "model.safetensors", ns=(time.time_ns(), time.time_ns() + restore.calls))  # type: ignore[attr-defined]


@pytest.mark.slow
def test_no_bad_input_writes_a_byte(filled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNA_DIST_CACHE", str(filled / "cache"))
    runner = CliRunner()
    good = runner.invoke(main, ["mine", str(filled / "manifest.yaml"), "--in-process", "--quiet"])
    assert good.exit_code == 0, good.output
    assert (filled / "cache" / "file-hashes.json").exists() and list((filled / "out").rglob("v1.json"))
    cases = every_case()
    assert len(cases) >= 60
    for name, damage in cases:
        restore(filled)
        damage(filled)
        before = {part: contents(filled / part) for part in ("out", "cache")}
        result = runner.invoke(main, ["mine", str(filled / "manifest.yaml"), "--in-process", "--quiet"])
        assert result.exit_code == 2, (name, result.output)
        assert result.output.startswith("error: "), (name, result.output)
        for part, was in before.items():
            assert contents(filled / part) == was, (name, part)
