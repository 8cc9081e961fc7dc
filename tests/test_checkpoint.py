"""Checkpoints: config checks that name the URI and field, fingerprints, the per-node cache of remote copies,
the tokenizer's pad token, and the MLP layers the hooks attach to (loading and layer paths live in capture/hf.py)."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cna_dist.capture import hf
from cna_dist.demo.models import save_random_model
from cna_dist.errors import BadInput, RunFailure
from cna_dist.model import checkpoint as modelmod
from cna_dist.store import uri as urimod


def copy_without(src: Path, dst: Path, *drop: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def config_error(uri: str, field: str = "model.uri") -> str:
    with pytest.raises(BadInput) as info:
        modelmod.read_config(uri, field=field)
    assert info.value.source == uri and info.value.field == field
    assert str(info.value).startswith(f"{uri}: {field}: ")
    return str(info.value).removeprefix(f"{uri}: {field}: ")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CNA_DIST_CACHE", str(root))
    return root


# --- read_config / info_from_config ----------------------------------------------------------------------------


def test_read_config_of_a_checkpoint(tiny_llama: Path) -> None:
    config = modelmod.read_config(str(tiny_llama))
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 4
    assert modelmod.read_config(f"file://{tiny_llama}") == config


def test_read_config_missing_folder(tmp_path: Path) -> None:
    assert config_error(str(tmp_path / "absent")) == "model folder does not exist"
    assert config_error(str(tmp_path / "absent"), field="eval.model") == "model folder does not exist"


def test_read_config_no_config_json(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_without(tiny_llama, tmp_path / "m", "config.json")
    assert config_error(str(folder)) == "not a checkpoint folder: no config.json"


def test_read_config_bad_json(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_without(tiny_llama, tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama",')
    assert config_error(str(folder)).startswith("config.json is not valid JSON (")


def test_read_config_no_weights(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_without(tiny_llama, tmp_path / "m", "*.safetensors")
    assert config_error(str(folder)) == "not a checkpoint folder: no *.safetensors or *.bin weights"


def test_read_config_no_tokenizer_files(tiny_llama: Path, tmp_path: Path) -> None:
    folder = copy_without(tiny_llama, tmp_path / "m", "tokenizer*")
    assert config_error(str(folder)) == "not a checkpoint folder: no tokenizer files"


def test_read_config_accepts_bin_weights_and_sentencepiece(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mistral"}')
    (folder / "pytorch_model.bin").write_bytes(b"")
    (folder / "tokenizer.model").write_bytes(b"")
    assert modelmod.read_config(str(folder)) == {"model_type": "mistral"}


def test_info_from_config_of_the_tiny_models(tiny_llama: Path, tiny_qwen: Path) -> None:
    assert modelmod.inspect(str(tiny_llama)) == modelmod.ModelInfo("LlamaForCausalLM", "llama", 4, 64, 32)
    assert modelmod.inspect(str(tiny_qwen)) == modelmod.ModelInfo("Qwen2ForCausalLM", "qwen2", 3, 48, 32)


def test_info_from_config_without_architectures_uses_the_model_type() -> None:
    config = {"model_type": "qwen2", "num_hidden_layers": 80, "intermediate_size": 29568, "hidden_size": 8192}
    assert modelmod.info_from_config(config, "s3://b/q") == modelmod.ModelInfo("qwen2", "qwen2", 80, 29568, 8192)


@pytest.mark.parametrize("model_type", ["gpt2", None, "Llama"])
def test_info_from_config_unsupported_model_type(model_type: str | None) -> None:
    with pytest.raises(BadInput) as info:
        modelmod.info_from_config({"model_type": model_type}, "s3://b/m")
    assert info.value.source == "s3://b/m" and info.value.field == "model_type"
    known = "['gemma2', 'gemma3_text', 'granite', 'llama', 'mistral', 'mixtral', 'olmo2', 'olmoe', 'phi3', 'qwen2', "
    known += "'qwen2_moe', 'qwen3', 'qwen3_moe', 'smollm3']"
    assert f"unsupported model_type {model_type!r}; cna-dist knows {known}" in str(info.value)


@pytest.mark.parametrize("missing", ["num_hidden_layers", "intermediate_size", "hidden_size"])
def test_info_from_config_missing_key(missing: str) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 2, "intermediate_size": 8, "hidden_size": 4}
    del config[missing]
    with pytest.raises(BadInput) as info:
        modelmod.info_from_config(config, "/m")
    assert info.value.field == missing
    assert str(info.value) == f"/m: {missing}: config.json lacks {missing!r}"


@pytest.mark.parametrize("value", [None, "four"])
def test_info_from_config_non_integer_value(value: object) -> None:
    config = {"model_type": "llama", "num_hidden_layers": value, "intermediate_size": 8, "hidden_size": 4}
    with pytest.raises(BadInput) as info:
        modelmod.info_from_config(config, "/m")
    assert info.value.field == "num_hidden_layers"


# --- fingerprint -----------------------------------------------------------------------------------------------


def small(path: Path, seed: int = 7) -> Path:
    return save_random_model(path, arch="llama", n_layers=2, hidden_size=16, intermediate_size=24, seed=seed)


def test_fingerprint_same_model_same_print_changed_weight_other_print(tmp_path: Path, cache: Path) -> None:
    from safetensors.torch import load_file, save_file

    a = modelmod.fingerprint(str(small(tmp_path / "a")))
    b = modelmod.fingerprint(str(small(tmp_path / "b")))  # a second save of the same seeded model
    assert a == b and len(a) == 64 and int(a, 16) >= 0
    assert len(json.loads((cache / "file-hashes.json").read_text())) == 2  # one hash per (path, size, mtime)

    changed = copy_without(tmp_path / "b", tmp_path / "c")
    weights = changed / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name][0, 0] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert modelmod.fingerprint(str(changed)) != a

    other_config = copy_without(tmp_path / "b", tmp_path / "d")
    config = json.loads((other_config / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (other_config / "config.json").write_text(json.dumps(config))
    assert modelmod.fingerprint(str(other_config)) != a
    assert modelmod.fingerprint(str(small(tmp_path / "e", seed=8))) != a


def test_fingerprint_hashes_a_file_once_until_it_changes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    folder = small(tmp_path / "m")
    calls: list[str] = []
    real = modelmod._file_sha256

    def counting(fs: Any, path: str) -> str:
        calls.append(path)
        return real(fs, path)

    monkeypatch.setattr(modelmod, "_file_sha256", counting)
    first = modelmod.fingerprint(str(folder))
    assert calls == [str(folder / "model.safetensors")]
    assert modelmod.fingerprint(str(folder)) == first and len(calls) == 1  # from the cache file
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again, same content
    assert modelmod.fingerprint(str(folder)) == first and len(calls) == 2


# --- localize --------------------------------------------------------------------------------------------------


def test_localize_local_path_is_the_folder_itself(tiny_llama: Path, cache: Path) -> None:
    assert modelmod.localize(str(tiny_llama)) == tiny_llama
    assert modelmod.localize(f"file://{tiny_llama}") == tiny_llama
    assert not cache.exists()  # nothing copied, nothing hashed


def upload(folder: Path) -> str:
    uri = f"s3://cna/{uuid.uuid4().hex}/model"
    fs, path = urimod.filesystem(uri)
    fs.put(str(folder), path, recursive=True)
    return uri


def test_localize_s3_copies_once_and_loads(
    tiny_llama: Path, cache: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = upload(tiny_llama)
    fs, path = urimod.filesystem(uri)
    assert sorted(Path(p).name for p in fs.ls(path, detail=False)) == sorted(p.name for p in tiny_llama.iterdir())

    fp = modelmod.fingerprint(uri)
    stale = cache / "models" / f"{fp}.partial"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("an interrupted copy")

    local = modelmod.localize(uri)
    assert local == cache / "models" / fp
    assert (local / ".complete").read_text() == fp
    assert not stale.exists()
    assert {p.name for p in local.iterdir()} == {p.name for p in tiny_llama.iterdir()} | {".complete"}
    for source in tiny_llama.iterdir():
        assert (local / source.name).read_bytes() == source.read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in local.iterdir()}

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached copy was downloaded again")

    with monkeypatch.context() as patch:
        patch.setattr(type(fs), "get", no_download)
        patch.setattr(type(fs), "get_file", no_download)
        patch.setattr(modelmod.download, "copy", no_download)
        assert modelmod.localize(uri) == local
    assert {p.name: p.stat().st_mtime_ns for p in local.iterdir()} == mtimes

    model, tokenizer = hf.load(local, dtype="float32")
    original, _ = hf.load(tiny_llama, dtype="float32")
    assert model.config.num_hidden_layers == 4 and tokenizer.pad_token == "<pad>"
    for (name, p), (_, q) in zip(model.named_parameters(), original.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_localize_s3_changed_checkpoint_gets_a_fresh_copy(tmp_path: Path, cache: Path, s3_server: str) -> None:
    uri = upload(small(tmp_path / "m"))
    first = modelmod.localize(uri)
    fs, path = urimod.filesystem(uri)
    config = json.loads(fs.cat_file(path + "/config.json"))
    config["rms_norm_eps"] = 1e-6
    fs.pipe_file(path + "/config.json", json.dumps(config).encode())
    second = modelmod.localize(uri)
    assert second != first and first.is_dir() and second.is_dir()
    assert json.loads((second / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert json.loads((first / "config.json").read_text())["rms_norm_eps"] == 1e-5


def test_localize_recovers_from_a_copy_without_its_complete_marker(tmp_path: Path, cache: Path, s3_server: str) -> None:
    uri = upload(small(tmp_path / "m"))
    target = cache / "models" / modelmod.fingerprint(uri)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # renamed into place, then the process died
    assert modelmod.localize(uri) == target
    assert (target / ".complete").exists() and json.loads((target / "config.json").read_text())[
        "num_hidden_layers"
    ] == 2


@pytest.fixture
def s3_gets(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every ranged GET s3fs answers as (file name, start, end), and `hook(name, start, end, data) -> data` to fail,
    shorten or watch one. s3fs binds its sync methods when a filesystem object is made, and fsspec caches those
    objects, so the cache is emptied before (the copy's object gets the recording method) and after the test."""
    import s3fs

    state = SimpleNamespace(ranges=[], hook=None)
    real = s3fs.S3FileSystem._cat_file

    async def recording(self: Any, path: str, version_id: Any = None, start: Any = None, end: Any = None, **kw: Any):
        data = await real(self, path, version_id, start, end, **kw)
        if start is not None:
            name = Path(path).name
            data = state.hook(name, start, end, data) if state.hook else data
            state.ranges.append((name, start, end))
        return data

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", recording)
    s3fs.S3FileSystem.clear_instance_cache()
    yield state
    s3fs.S3FileSystem.clear_instance_cache()


def fetched(ranges: list[tuple[str, int, int]], name: str) -> int:
    return sum(end - start for n, start, end in ranges if n == name)


def test_localize_s3_fetches_parallel_ranges_and_prints_the_throughput(
    tmp_path: Path, cache: Path, s3_server: str, s3_gets: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    folder = small(tmp_path / "m")
    uri = upload(folder)
    monkeypatch.setenv("CNA_DIST_DOWNLOAD_PART_SIZE", "4k")
    monkeypatch.setenv("CNA_DIST_DOWNLOAD_CONCURRENCY", "3")
    local = modelmod.localize(uri)
    size = (folder / "model.safetensors").stat().st_size
    weights = sorted((s, e) for n, s, e in s3_gets.ranges if n == "model.safetensors")
    assert weights == [(s, min(s + 4096, size)) for s in range(0, size, 4096)] and len(weights) > 20
    assert {p.name for p in local.iterdir()} == {p.name for p in folder.iterdir()} | {".complete"}
    for source in folder.iterdir():
        assert (local / source.name).read_bytes() == source.read_bytes(), source.name
    total = sum(p.stat().st_size for p in folder.iterdir())
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"copied model {local.name[:12]}: 6 files, {total / 1024:.1f} KiB in [0-9.]+ s \([0-9]+ MB/s\), resumed 0 B",
        line,
    ), line


def test_localize_s3_resumes_a_failed_copy_fetching_only_the_missing_ranges(
    tmp_path: Path, cache: Path, s3_server: str, s3_gets: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    folder = small(tmp_path / "m")
    uri = upload(folder)
    monkeypatch.setenv("CNA_DIST_DOWNLOAD_PART_SIZE", "4096")
    monkeypatch.setenv("CNA_DIST_DOWNLOAD_CONCURRENCY", "1")

    def reset(name: str, start: int, end: int, data: bytes) -> bytes:
        if name == "model.safetensors" and start == 5 * 4096:
            raise ConnectionResetError("injected")
        return data

    s3_gets.hook = reset
    with pytest.raises(RunFailure, match=r"model.safetensors: fetching bytes 20480-24576 of [0-9]+ failed: injected"):
        modelmod.localize(uri)
    fp = modelmod.fingerprint(uri)
    partial = cache / "models" / f"{fp}.partial"
    assert not (cache / "models" / fp).exists() and not (partial / ".complete").exists()
    assert fetched(s3_gets.ranges, "model.safetensors") == 5 * 4096 and fetched(s3_gets.ranges, "config.json") > 0

    s3_gets.hook, s3_gets.ranges = None, []
    local = modelmod.localize(uri)
    size = (folder / "model.safetensors").stat().st_size
    assert fetched(s3_gets.ranges, "model.safetensors") == size - 5 * 4096
    assert fetched(s3_gets.ranges, "config.json") == 0  # copied before the failure and kept
    assert (local / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert not partial.exists() and (local / ".complete").read_text() == fp
    before = sum(p.stat().st_size for p in folder.iterdir() if p.name < "model.safetensors")  # copied in name order
    assert capsys.readouterr().err.strip().endswith(f"resumed {(5 * 4096 + before) / 1024:.1f} KiB")


def test_localize_s3_short_range_is_an_error_and_no_copy_is_complete(
    tmp_path: Path, cache: Path, s3_server: str, s3_gets: Any
) -> None:
    uri = upload(small(tmp_path / "m"))
    s3_gets.hook = lambda name, start, end, data: data[:-1] if name == "model.safetensors" else data
    with pytest.raises(RunFailure, match=r"model.safetensors: fetching bytes 0-[0-9]+ of [0-9]+ failed: got [0-9]+"):
        modelmod.localize(uri)
    fp = modelmod.fingerprint(uri)
    assert not (cache / "models" / fp).exists() and not (cache / "models" / f"{fp}.partial" / ".complete").exists()


def test_localize_s3_rechecks_the_sizes_on_disk_after_the_copy(
    tmp_path: Path, cache: Path, s3_server: str, s3_gets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = upload(small(tmp_path / "m"))
    fp = modelmod.fingerprint(uri)
    weights = cache / "models" / f"{fp}.partial" / "model.safetensors"
    monkeypatch.setenv("CNA_DIST_DOWNLOAD_CONCURRENCY", "1")

    def shrink(name: str, start: int, end: int, data: bytes) -> bytes:
        if name == "tokenizer_config.json":  # the last file: the weights are on disk by now
            with open(weights, "r+b") as f:
                f.truncate(1000)  # something else cut the file
        return data

    s3_gets.hook = shrink
    with pytest.raises(RunFailure, match=r"model.safetensors: 1000 bytes on disk, but .*/model.safetensors has"):
        modelmod.localize(uri)
    assert not (cache / "models" / fp).exists() and not weights.with_name(".complete").exists()
    s3_gets.hook = None
    assert (modelmod.localize(uri) / ".complete").exists()  # the cut file lost its parts and was fetched again


def test_localize_tokenizer_copies_no_weights_and_refuses_a_stale_fingerprint(
    tmp_path: Path, cache: Path, s3_server: str, s3_gets: Any
) -> None:
    uri = upload(small(tmp_path / "m"))
    with pytest.raises(RunFailure, match=r"the checkpoint changed since its fingerprint 000000000000 was taken"):
        modelmod.localize_tokenizer(uri, fp="0" * 64)
    assert s3_gets.ranges == [] and not list(cache.rglob("*.partial"))
    local = modelmod.localize_tokenizer(uri, fp=modelmod.fingerprint(uri))
    assert sorted(p.name for p in local.iterdir()) == [
        ".complete",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [r for r in s3_gets.ranges if r[0].endswith(modelmod.WEIGHT_SUFFIXES)]


# --- tokenizer and model ---------------------------------------------------------------------------------------


def test_load_tokenizer_sets_a_pad_token_when_missing(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from cna_dist.demo.tokenizer import build_tokenizer
    from cna_dist.demo.words import DEFAULT_WORDS

    tok = build_tokenizer(DEFAULT_WORDS)
    tok.pad_token = None
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").pad_token is None  # the copy really has none

    loaded = modelmod.load_tokenizer(tmp_path / "tok")
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id
    assert loaded.padding_side == "left"


def test_load_tokenizer_keeps_an_existing_pad_token(tiny_llama: Path) -> None:
    tok = modelmod.load_tokenizer(tiny_llama)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"


@pytest.mark.parametrize("which,n_layers,width", [("tiny_llama", 4, 64), ("tiny_qwen", 3, 48)])
def test_load_decoder_and_down_projs(which: str, n_layers: int, width: int, request: pytest.FixtureRequest) -> None:
    model, _ = hf.load(request.getfixturevalue(which), dtype="float32")
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert hf.decoder(model) is model.model
    projs = hf.down_projs(model)
    assert len(projs) == n_layers
    for layer, proj in zip(model.model.layers, projs, strict=True):
        assert proj is layer.mlp.down_proj
        assert isinstance(proj, torch.nn.Linear) and proj.in_features == width and proj.out_features == 32


def test_decoder_and_down_projs_refuse_other_shapes() -> None:
    with pytest.raises(BadInput, match="SimpleNamespace: no model.layers"):
        hf.decoder(SimpleNamespace(transformer=SimpleNamespace(h=[])))
    with pytest.raises(BadInput, match="SimpleNamespace: no model.layers"):
        hf.decoder(SimpleNamespace(model=SimpleNamespace()))
    no_mlp = SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(mlp=SimpleNamespace(c_proj=None))]))
    with pytest.raises(BadInput, match="SimpleNamespace: decoder layers have no mlp.down_proj"):
        hf.down_projs(no_mlp)


def test_torch_dtype() -> None:
    assert modelmod.torch_dtype("float16") is torch.float16
    assert modelmod.torch_dtype("bfloat16") is torch.bfloat16
    assert modelmod.torch_dtype("auto") is (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
