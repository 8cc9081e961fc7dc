"""Every safetensors header entry is checked before anything loads: dtype, size against byte range, ranges that
tile the data. Through the CLI (validate and mine: exit 2 naming file and tensor, nothing written) and on a remote
checkpoint with --check-remote, where only the headers are read."""

from __future__ import annotations

import json
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cna_dist.errors import BadInput
from cna_dist.model import weights
from tests.test_hostile import refused

FILE = "model.safetensors"


@pytest.fixture
def own_model(workspace: Path, tiny_llama: Path) -> Path:
    """A copy of the tiny model the workspace's manifest points at, to damage."""
    link = workspace.parent / "models" / "tiny-instruct"
    link.unlink()
    shutil.copytree(tiny_llama, link)
    return link


def rewrite_header(model: Path, change: Callable[[dict, int], object], *, pad: bytes = b"") -> None:
    """Edit the JSON index of the model's safetensors file in place; the header length is rewritten, data kept."""
    raw = (model / FILE).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    index, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    change(index, len(data))
    text = json.dumps(index).encode()
    (model / FILE).write_bytes(struct.pack("<Q", len(text)) + text + data + pad)


def first(index: dict, suffix: str) -> dict:
    return next(v for k, v in index.items() if k.endswith(suffix))


def overlap(index: dict, _: int) -> None:
    """The down projection of layer 3 starts inside the tensor before it (same size: its end moves as much)."""
    entry = index["model.layers.3.mlp.down_proj.weight"]
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = [begin - 4, end - 4]


def gap(index: dict, _: int) -> None:
    """Bytes no tensor owns: the first tensor of the data shrinks by one row, its range with it."""
    entry = next(v for k, v in index.items() if k != "__metadata__" and v["data_offsets"][0] == 0)
    entry["shape"][0] -= 1
    entry["data_offsets"][1] -= 4 * (entry["shape"][1] if len(entry["shape"]) > 1 else 1)


HEADERS = [
    # the extra entry of a hostile checkpoint: 4 TiB claimed, no bytes held (the loader's message names nothing)
    ("extra-entry", lambda i, end: i.update({"model.layers.0.mlp.extra.weight": {
        "dtype": "F32", "shape": [1048576, 1048576], "data_offsets": [end, end]}}),
     ["model.layers.0.mlp.extra.weight", "[1048576, 1048576]", "4398046511104 bytes", "hold 0"]),
    ("unknown-dtype", lambda i, end: first(i, "norm.weight").update(dtype="F33"),
     ["unknown dtype 'F33'", "norm.weight"]),
    ("sub-byte-dtype", lambda i, end: first(i, "norm.weight").update(dtype="F4"), ["unknown dtype 'F4'"]),
    ("overlap", overlap, ["overlap", "model.layers.3.mlp.down_proj.weight"]),
    ("gap", gap, ["belong to no tensor"]),
    ("shape-not-ints", lambda i, end: first(i, "norm.weight").update(shape=[32.5]),
     ["shape [32.5]", "not a list of non-negative integers"]),
    ("shape-bool", lambda i, end: first(i, "norm.weight").update(shape=[True]), ["shape [True]"]),
    ("offsets-reversed", lambda i, end: first(i, "model.norm.weight").update(
        data_offsets=first(i, "model.norm.weight")["data_offsets"][::-1]), ["model.norm.weight", "data_offsets"]),
    ("no-dtype", lambda i, end: first(i, "model.norm.weight").pop("dtype"), ["lacks dtype, shape or data_offsets"]),
    ("past-the-end", lambda i, end: first(i, "model.norm.weight").update(data_offsets=[end, end + 128]),
     ["model.norm.weight"]),
]  # fmt: skip


def truncated_header(model: Path) -> None:
    """The JSON index cut short, its length rewritten to match: a file whose header was cut and patched."""
    raw = (model / FILE).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    cut = raw[8 : 8 + length // 2]
    (model / FILE).write_bytes(struct.pack("<Q", len(cut)) + cut + raw[8 + length :])


def duplicate_name(model: Path) -> None:
    raw = (model / FILE).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + length].decode()
    entry = json.dumps(json.loads(text)["model.norm.weight"])
    doubled = text.rstrip()[:-1] + f', "model.norm.weight": {entry}}}'
    (model / FILE).write_bytes(struct.pack("<Q", len(doubled)) + doubled.encode() + raw[8 + length :])


def header_damage() -> list[tuple[str, Callable[[Path], None], list[str]]]:
    """Every hostile header as (id, damage(model folder), what the message names besides the file)."""
    cases: list[tuple[str, Callable[[Path], None], list[str]]] = [
        (name, lambda m, c=change: rewrite_header(m, c), needles) for name, change, needles in HEADERS
    ]
    cases.append(("truncated-header", truncated_header, ["not valid JSON"]))
    cases.append(("duplicate-name", duplicate_name, ["'model.norm.weight' is listed twice"]))
    return cases


CASES = header_damage()


@pytest.mark.parametrize("damage,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["validate", "mine"])
def test_every_header_entry_is_checked_before_anything_loads(
    workspace: Path,
    own_model: Path,
    command: str,
    damage,
    needles: list[str],
) -> None:
    damage(own_model)
    refused(workspace, command, str(own_model / FILE), *needles)


def test_the_untouched_header_passes_and_names_every_tensor(tiny_llama: Path) -> None:
    import fsspec
    from safetensors import safe_open

    fs = fsspec.filesystem("file")
    path = str(tiny_llama / FILE)
    shapes = weights.header(fs, path, fs.size(path), path)
    with safe_open(path, "pt") as f:
        assert shapes == {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict


def test_a_tensor_in_two_files_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    json_config = json.loads((tiny_llama / "config.json").read_text())
    shutil.copytree(tiny_llama, tmp_path / "m")
    shutil.copy(tmp_path / "m" / FILE, tmp_path / "m" / "model-2.safetensors")
    with pytest.raises(BadInput, match="is also in .*model-2.safetensors") as info:
        weights.check(str(tmp_path / "m"), json_config)
    assert info.value.field == "model.uri"


@pytest.mark.s3
def test_check_remote_reads_only_the_headers(
    tiny_llama: Path, tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote checkpoint's headers are checked with two ranged reads per file: never a byte of tensor data."""
    import s3fs

    from cna_dist.store import uri as urimod

    uri = f"s3://cna/{uuid.uuid4().hex}/model"
    fs, path = urimod.filesystem(uri)
    fs.put(str(tiny_llama), path, recursive=True)
    raw = (tiny_llama / FILE).read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    reads: list[tuple[str, int]] = []
    real = fs.cat_file

    def recording(rpath, *args, **kwargs):  # type: ignore[no-untyped-def]
        data = real(rpath, *args, **kwargs)
        reads.append((str(rpath), len(data)))
        return data

    assert urimod.filesystem(uri)[0] is fs  # one cached filesystem object: what check() uses is what we watch
    monkeypatch.setattr(fs, "cat_file", recording)
    monkeypatch.setattr(s3fs.S3FileSystem, "_open", lambda *a, **k: pytest.fail("opened a file"))
    config = json.loads((tiny_llama / "config.json").read_text())
    assert weights.check(uri, config) == 1
    assert reads == [(f"{path}/{FILE}", 8), (f"{path}/{FILE}", header_end - 8)]
    monkeypatch.undo()
    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_llama, hostile)
    rewrite_header(hostile, HEADERS[0][1])
    fs.put(str(hostile / FILE), f"{path}/{FILE}")
    with pytest.raises(BadInput) as info:
        weights.check(uri, config)
    assert info.value.source == f"{uri}/{FILE}" and "model.layers.0.mlp.extra.weight" in str(info.value)
