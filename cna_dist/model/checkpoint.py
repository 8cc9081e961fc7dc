"""Model checkpoints as files: check, read the config, fingerprint, localise to a node, load the tokenizer.

Loading the model itself is a backend's job (`cna_dist.model.hf`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cna_dist.errors import BadInput
from cna_dist.io import uri as urimod

SUPPORTED = {"llama", "qwen2", "mistral"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the pipeline needs to know about a checkpoint, read from config.json alone."""

    architecture: str
    model_type: str
    n_layers: int
    intermediate_size: int
    hidden_size: int


def cache_dir() -> Path:
    return Path(os.environ.get("CNA_DIST_CACHE", Path.home() / ".cache" / "cna-dist"))


def read_config(uri: str, storage_options: dict[str, Any] | None = None, field: str = "model.uri") -> dict:
    fs, path = urimod.filesystem(uri, storage_options)
    config_path = path.rstrip("/") + "/config.json"
    try:
        if not fs.isdir(path):
            raise BadInput("model folder does not exist", source=uri, field=field)
        with fs.open(config_path, "rb") as f:
            config = json.loads(f.read())
    except FileNotFoundError:
        raise BadInput("not a checkpoint folder: no config.json", source=uri, field=field) from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"config.json is not valid JSON ({exc.msg})", source=uri, field=field) from None
    names = [Path(p).name for p in fs.ls(path, detail=False)]
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise BadInput("not a checkpoint folder: no *.safetensors or *.bin weights", source=uri, field=field)
    if not any(n in names for n in TOKENIZER_FILES):
        raise BadInput("not a checkpoint folder: no tokenizer files", source=uri, field=field)
    return config


def info_from_config(config: dict, uri: str) -> ModelInfo:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise BadInput(
            f"unsupported model_type {model_type!r}; cna-dist knows {sorted(SUPPORTED)} "
            "(decoder layers at model.layers[i].mlp.down_proj)",
            source=uri,
            field="model_type",
        )
    sizes = {}
    for key in ("num_hidden_layers", "intermediate_size", "hidden_size"):
        if key not in config:
            raise BadInput(f"config.json lacks {key!r}", source=uri, field=key)
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInput(f"config.json has {key} = {value!r}, not a positive integer", source=uri, field=key)
        sizes[key] = value
    return ModelInfo(
        architecture=(config.get("architectures") or [model_type])[0],
        model_type=model_type,
        n_layers=sizes["num_hidden_layers"],
        intermediate_size=sizes["intermediate_size"],
        hidden_size=sizes["hidden_size"],
    )


def inspect(uri: str, storage_options: dict[str, Any] | None = None) -> ModelInfo:
    return info_from_config(read_config(uri, storage_options), uri)


def _file_sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Content hash of a checkpoint: config plus every weight file's hash (ETag on object stores).

    Local hashes are cached by (path, size, mtime) so a 145 GB checkpoint is read once per node.
    """
    fs, path = urimod.filesystem(uri, storage_options)
    cache_file = cache_dir() / "file-hashes.json"
    cache: dict[str, str] = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    digest = hashlib.sha256()
    with fs.open(path.rstrip("/") + "/config.json", "rb") as f:
        digest.update(json.dumps(json.loads(f.read()), sort_keys=True).encode())
    changed = False
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        name = entry["name"]
        if not name.endswith(WEIGHT_SUFFIXES):
            continue
        etag = entry.get("ETag") or entry.get("etag")
        if etag:
            file_hash = f"etag:{etag.strip(chr(34))}"
        else:
            key = f"{name}|{entry.get('size')}|{entry.get('mtime') or entry.get('created')}"
            if key not in cache:
                cache[key] = _file_sha256(fs, name)
                changed = True
            file_hash = cache[key]
        digest.update(f"{Path(name).name}:{entry.get('size')}:{file_hash}\n".encode())
    if changed:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    return digest.hexdigest()


def localize(uri: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local folder holding the checkpoint: the folder itself, or a per-node cached copy of a remote one.

    The copy is made once per node under a file lock and keyed by the remote fingerprint, so a changed
    checkpoint gets a fresh copy and concurrent replicas on one node wait for the first one's copy.
    """
    return _cached_copy(uri, storage_options, "models", lambda name: True)


def localize_tokenizer(uri: str, storage_options: dict[str, Any] | None = None, *, fp: str | None = None) -> Path:
    """A local folder with the checkpoint's config and tokenizer files and no weights: what the driver needs.

    The driver renders and tokenizes prompts but never runs the model, so for a remote checkpoint it copies every
    file except the weight files (a few MB of a 145 GB model); the replicas copy the rest on their nodes. `fp`: the
    checkpoint's fingerprint when the caller has it already (it costs a listing and a config read).
    """
    return _cached_copy(uri, storage_options, "tokenizers", lambda name: not name.endswith(WEIGHT_SUFFIXES), fp)


def _cached_copy(
    uri: str, storage_options: dict[str, Any] | None, kind: str, wanted: Any, fp: str | None = None
) -> Path:
    """The files `wanted(name)` picks of a remote checkpoint, copied once per node under a file lock."""
    if urimod.is_local(uri):
        return Path(urimod.filesystem(uri)[1])
    from filelock import FileLock

    fp = fp or fingerprint(uri, storage_options)
    target = cache_dir() / kind / fp
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / ".complete").exists():
            fs, path = urimod.filesystem(uri, storage_options)
            partial = target.with_name(target.name + ".partial")
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            for entry in fs.ls(path, detail=False):
                if wanted(Path(entry).name) and fs.isfile(entry):
                    fs.get(entry, str(partial / Path(entry).name))
            (partial / ".complete").write_text(fp)  # inside the copy: the rename publishes data and marker at once
            if target.exists():  # a copy renamed into place by an older version that died before its marker
                shutil.rmtree(target)
            partial.rename(target)
    return target


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
