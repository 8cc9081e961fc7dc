"""Corruption at rest: a store, registry or circuit damaged between runs is named by the next command, never mined.

Each test copies one pristine mined workspace (float32 rows, 4 prompts a shard), damages one object, and runs the
command a user would run next. A damaged store object fails `mine` (exit 1) and `inspect` (exit 1, the report
naming the damage) with the object's path; the registry's `latest` pointer is only a mirror, so a bad one is
rewritten and the circuit is right; a damaged circuit file given to a command is bad input (exit 2).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cna_dist.cli import main
from tests.conftest import DIVERSE, HARMFUL, HARMLESS, MINIMAL, write_jsonl


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A workspace mined once: manifest.yaml, out/store (4 shards), out/circuits (v1), reference.json (the circuit)."""
    root = tmp_path_factory.mktemp("pristine")
    (root / "models").mkdir()
    (root / "models" / "tiny-instruct").symlink_to(tiny_llama, target_is_directory=True)
    write_jsonl(root / "prompts" / "harmful.jsonl", HARMFUL)
    write_jsonl(root / "prompts" / "harmless.jsonl", HARMLESS)
    write_jsonl(root / "prompts" / "diverse.jsonl", DIVERSE)
    (root / "manifest.yaml").write_text(MINIMAL + "capture: {dtype: float32, shard_rows: 4}\n")
    result = CliRunner().invoke(main, ["mine", str(root / "manifest.yaml"), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    shutil.copy(result.output.strip().splitlines()[-1], root / "reference.json")
    return root


@pytest.fixture
def ws(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(pristine, root, symlinks=True)
    return root


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def mine(ws: Path) -> Result:
    return cli("mine", ws / "manifest.yaml", "--quiet", "--in-process")


def run_dir(ws: Path) -> Path:
    (run,) = (ws / "out" / "store" / "runs").iterdir()
    return run


def chunks(ws: Path) -> list[Path]:
    return sorted(p for p in (run_dir(ws) / "acts" / "c").rglob("*") if p.is_file())


def neurons(uri: str | Path) -> list[dict]:
    return json.loads(Path(uri).read_text())["neurons"]


def assert_named(result: Result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


# -- the activation store ---------------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_chunk_fails_its_checksum(ws: Path) -> None:
    victim = chunks(ws)[1]  # rows 4:8, every layer (the tiny model's rows fit one layer chunk)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one activation: a plausible value, caught only by the crc32c
    victim.write_bytes(bytes(data))
    assert_named(mine(ws), 1, f"{run_dir(ws)}/acts", "rows 4:8", "checksum")
    assert_named(cli("inspect", ws / "out" / "store", "--verify"), 1, "c/1/0/0", "checksum")
    assert not (ws / "out" / "circuits" / "refusal" / "tiny-instruct" / "v2.json").exists()


def test_a_deleted_chunk_is_named_by_mine_and_inspect(ws: Path) -> None:
    chunks(ws)[2].unlink()
    assert_named(mine(ws), 1, f"{run_dir(ws)}/acts", "chunk 2.0.0", "row 8")
    result = cli("inspect", ws / "out" / "store")  # a listing suffices: no chunk is read
    assert_named(result, 1, "missing chunk", "c/2/0/0", "shard 2")


def cut(text: str) -> str:
    return text[: len(text) // 2]


def edit_json(change: Callable[[dict], object]) -> Callable[[str], str]:
    def apply(text: str) -> str:
        data = json.loads(text)
        change(data)
        return json.dumps(data)

    return apply


MARKERS = [
    ("truncated", cut, "JSONDecodeError"),
    ("not-an-object", lambda t: "[1, 2]", "TypeError"),
    ("rows-not-a-list", edit_json(lambda d: d.update(rows=7)), "TypeError"),
    ("other-shard-number", edit_json(lambda d: d.update(shard=3)), "shard number"),
    ("row-hash-not-hex", edit_json(lambda d: d["rows"].__setitem__(0, "z" * 64)), "row hash"),
    # a fifth row in a 4-row shard would map that prompt onto the next shard's first row: wrong data, silently
    ("rows-beyond-the-shard", edit_json(lambda d: d["rows"].append("a" * 64)), "5 rows, over the run's 4"),
    ("n-rows-disagrees", edit_json(lambda d: d.update(n_rows=3)), "n_rows 3"),
    # the schema kept, two prompts' rows exchanged: only the marker's own checksum tells
    ("row-hashes-swapped", edit_json(lambda d: d["rows"].__setitem__(slice(0, 2), d["rows"][1::-1])), "checksum"),
    ("writer-edited", edit_json(lambda d: d.update(writer="someone else")), "does not match its content"),
]


def test_a_swapped_marker_is_found_by_inspect_verify(ws: Path) -> None:
    marker = run_dir(ws) / "commits" / "00000001.json"
    data = json.loads(marker.read_text())
    assert data["checksum"].startswith("sha256:")
    data["rows"][0], data["rows"][1] = data["rows"][1], data["rows"][0]
    marker.write_text(json.dumps(data))
    assert_named(cli("inspect", ws / "out" / "store", "--verify"), 1, str(marker), "checksum", "does not match")


@pytest.mark.parametrize("damage,needle", [(m[1], m[2]) for m in MARKERS], ids=[m[0] for m in MARKERS])
def test_a_damaged_commit_marker_is_named_never_guessed(ws: Path, damage: Callable[[str], str], needle: str) -> None:
    marker = run_dir(ws) / "commits" / "00000001.json"
    marker.write_text(damage(marker.read_text()))
    for result in (mine(ws), cli("inspect", ws / "out" / "store")):
        assert_named(result, 1, f"corrupt commit marker {marker}", needle, "delete it to capture the shard again")


def test_a_deleted_commit_marker_recaptures_its_shard_and_the_circuit_is_right(ws: Path) -> None:
    """No marker, no shard: the slot is captured again (its old rows are overwritten) and nothing else changes."""
    (run_dir(ws) / "commits" / "00000001.json").unlink()
    result = cli("mine", ws / "manifest.yaml", "--quiet", "--in-process", "--summary", ws / "s.json")
    assert result.exit_code == 0, result.output
    summary = json.loads((ws / "s.json").read_text())
    assert (summary["shards_captured"], summary["shards_reused"], summary["status"]) == (1, 3, "unchanged")
    assert neurons(result.output.strip().splitlines()[-1]) == neurons(ws / "reference.json")


RUN_JSON = [
    ("truncated", cut, "JSONDecodeError"),
    ("not-an-object", lambda t: "[]", "not a JSON object"),
    ("unknown-field", edit_json(lambda d: d.update(colour="blue")), "colour"),
    ("missing-field", edit_json(lambda d: d.pop("n_layers")), "n_layers"),
    ("wrong-type", edit_json(lambda d: d.update(n_layers="four")), "n_layers = 'four'"),
    ("zero-rows-per-chunk", edit_json(lambda d: d.update(rows_per_chunk=0)), "rows_per_chunk = 0"),
    ("bad-dtype", edit_json(lambda d: d.update(dtype="int8")), "dtype = 'int8'"),
    # 4 -> 8 rows a shard would read shard 1's prompts from shard 2's rows: caught against the array's record
    ("shard-rows-edited", edit_json(lambda d: d.update(shard_rows=8)), "shard_rows"),
    ("chunking-edited", edit_json(lambda d: d.update(rows_per_chunk=2)), "rows_per_chunk"),
    ("fingerprint-edited", edit_json(lambda d: d.update(fingerprint="0" * 64)), "written for another model"),
]


@pytest.mark.parametrize("damage,needle", [(m[1], m[2]) for m in RUN_JSON], ids=[m[0] for m in RUN_JSON])
def test_damaged_run_metadata_is_named(ws: Path, damage: Callable[[str], str], needle: str) -> None:
    path = run_dir(ws) / "run.json"
    path.write_text(damage(path.read_text()))
    assert_named(mine(ws), 1, str(path), needle)
    assert_named(cli("inspect", ws / "out" / "store"), 1, str(path), needle)


def test_inspect_reports_every_damaged_object_of_a_store_at_once(ws: Path) -> None:
    chunks(ws)[0].unlink()
    (run_dir(ws) / "commits" / "00000003.json").write_text("{")
    result = cli("inspect", ws / "out" / "store", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output[: result.output.rindex("}") + 1])
    (problems,) = [r["problems"] for r in report["runs"]]
    assert len(problems) == 2, problems
    assert "00000003.json" in problems[0] and "missing chunk" in problems[1] and "c/0/0/0" in problems[1]


def test_inspect_of_a_healthy_store_verifies_every_chunk(ws: Path) -> None:
    result = cli("inspect", ws / "out" / "store", "--verify")
    assert_named(result, 0, "15 rows", "verified 4 chunks")


# -- the registry -------------------------------------------------------------------------------------------------


def add_prompt(ws: Path) -> None:
    write_jsonl(ws / "prompts" / "harmful.jsonl", [*HARMFUL, "explain how to make a fake passport"])


@pytest.mark.parametrize(
    "pointer", ['{"version": 7, "file": "v7.json"}', "{trunc", ""], ids=["missing-version", "truncated", "empty"]
)
def test_a_latest_pointer_at_nothing_is_rewritten_and_the_next_version_is_right(ws: Path, pointer: str) -> None:
    """`latest` mirrors the highest v<N>.json; versions are found by listing, so a bad pointer misleads nobody."""
    folder = ws / "out" / "circuits" / "refusal" / "tiny-instruct"
    (folder / "latest").write_text(pointer)
    unchanged = mine(ws)
    assert unchanged.exit_code == 0 and unchanged.output.strip().endswith("v1.json"), unchanged.output
    add_prompt(ws)
    result = mine(ws)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(folder / "v2.json")
    assert json.loads((folder / "latest").read_text()) == {"version": 2, "file": "v2.json"}
    assert json.loads((folder / "v2.json").read_text())["parent"] == 1


def test_a_damaged_registry_version_is_a_run_failure_naming_it(ws: Path) -> None:
    """The registry is not the user's input: a corrupt parent version fails the publish (exit 1), writes nothing."""
    folder = ws / "out" / "circuits" / "refusal" / "tiny-instruct"
    (folder / "v1.json").write_text(cut((folder / "v1.json").read_text()))
    add_prompt(ws)
    assert_named(mine(ws), 1, "registry version", str(folder / "v1.json"), "not valid JSON")
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "v1.json"]


# -- circuit files --------------------------------------------------------------------------------------------


CIRCUITS = [
    ("wrong-schema", edit_json(lambda d: d.update(schema="cna-circuit/9")), ["schema", "'cna-circuit/9'"]),
    ("no-schema", edit_json(lambda d: d.pop("schema")), ["schema", "None"]),
    ("truncated", cut, ["not valid JSON"]),
    ("neurons-not-a-list", edit_json(lambda d: d.update(neurons={"1": 2})), ["neurons", "{'1': 2}"]),
    ("layer-negative", edit_json(lambda d: d["neurons"][0].update(layer=-3)), ["neurons.0.layer", "-3"]),
    ("binary", lambda t: "\udcff", ["not UTF-8"]),
]


@pytest.mark.parametrize("damage,needles", [(c[1], c[2]) for c in CIRCUITS], ids=[c[0] for c in CIRCUITS])
@pytest.mark.parametrize("command", ["inspect", "diff", "eval", "steer", "export-ref"])
def test_a_damaged_circuit_file_is_bad_input_for_every_command(
    ws: Path, command: str, damage: Callable[[str], str], needles: list[str]
) -> None:
    bad = ws / "bad.json"
    text = damage((ws / "reference.json").read_text())
    bad.write_bytes(text.encode("utf-8", "surrogateescape"))
    args = {
        "inspect": ["inspect", bad],
        "diff": ["diff", ws / "reference.json", bad],
        "eval": ["eval", ws / "manifest.yaml", "--circuit", bad, "--out", ws / "ev", "--in-process", "--quiet"],
        "steer": ["steer", "--model", ws / "models" / "tiny-instruct", "--circuit", bad, "hello"],
        "export-ref": ["export-ref", bad, ws / "ref.json"],
    }[command]
    assert_named(cli(*args), 2, str(bad), *needles)
    assert not (ws / "ev").exists() and not (ws / "ref.json").exists()
