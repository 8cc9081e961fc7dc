"""Model checkpoints as files: check, read the config, fingerprint, localise to a node, load the tokenizer.

Loading the model itself is a backend's job (`cna_dist.capture.hf`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cna_dist.errors import BadInput, RunFailure
from cna_dist.model import arch, cache
from cna_dist.store import download, hub
from cna_dist.store import uri as urimod

SUPPORTED = set(arch.FAMILIES)  # model_types cna-dist captures: cna_dist.model.arch knows each one
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the pipeline needs to know about a checkpoint, read from config.json alone."""

    architecture: str
    model_type: str
    n_layers: int
    intermediate_size: int  # neurons per layer (`arch.Family.width`): the MLP's intermediate_size in dense families
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
    family = arch.check_config(config, uri)  # a known family (else BadInput naming model_type and the known ones)
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
        intermediate_size=family.width(SimpleNamespace(**config)),  # neurons per layer: intermediate_size if dense
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
    """Content hash of a checkpoint: config plus every weight file's hash (ETag on object stores, the listed sha256
    of an LFS file on the Hub), and a pinned Hub model's commit sha.

    Local hashes are cached by (path, size, mtime) so a 145 GB checkpoint is read once per node.
    """
    fs, path = urimod.filesystem(uri, storage_options)
    return _fingerprint_of(fs, _listing(fs, path), fs.cat_file(path.rstrip("/") + "/config.json"), hub.revision_of(uri))


def _listing(fs: Any, path: str) -> list[dict[str, Any]]:
    """The checkpoint folder's entries, fresh from the store (a long-lived filesystem object caches listings)."""
    fs.invalidate_cache(path)
    return sorted(fs.ls(path, detail=True), key=lambda e: e["name"])


def _fingerprint_of(fs: Any, entries: list[dict[str, Any]], config: bytes, revision: str | None = None) -> str:
    """The fingerprint of a listing and the bytes of its config.json (so a copy can be checked against it).

    `revision`: a Hub commit sha, hashed in, so two commits never share a run even where their files agree. An LFS
    file's listed sha256 is the hash of its bytes, the value a local copy of it hashes to, so a model read from the
    local HF cache (HF_HUB_OFFLINE=1) has the fingerprint it has on the Hub.
    """
    cache_file = cache_dir() / "file-hashes.json"
    cache: dict[str, str] = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    digest = hashlib.sha256(json.dumps(json.loads(config), sort_keys=True).encode())
    if revision:
        digest.update(f"revision:{revision}\n".encode())
    changed = False
    for entry in entries:
        name = entry["name"]
        if not name.endswith(WEIGHT_SUFFIXES):
            continue
        identity = download.content_identity(entry)
        if identity:
            file_hash = identity.removeprefix("sha256:")
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


def localize(uri: str, storage_options: dict[str, Any] | None = None, *, fp: str | None = None) -> Path:
    """A local folder holding the checkpoint: the folder itself, or a per-node cached copy of a remote one.

    The copy is made once per node under a file lock and keyed by the remote fingerprint, so a changed
    checkpoint gets a fresh copy and concurrent replicas on one node wait for the first one's copy. Files are
    fetched as parallel byte ranges and an interrupted copy resumes (`cna_dist.store.download`; concurrency and part
    size from CNA_DIST_DOWNLOAD_CONCURRENCY and CNA_DIST_DOWNLOAD_PART_SIZE). `fp`: the fingerprint the copy must
    have (a run's), else the checkpoint's current one.
    """
    return _cached_copy(uri, storage_options, "models", lambda name: True, fp)


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
    """The files `wanted(name)` picks of a remote checkpoint, copied once per node under a file lock.

    The copy is made in `<fp>.partial` (kept across failures so the next call resumes it), checked against the
    fingerprint, marked `.complete` inside and renamed into place, so a reader sees a whole copy or none.
    """
    if urimod.is_local(uri) or hub.offline_folder(uri):  # a folder here already (HF_HUB_OFFLINE: the HF cache's)
        return Path(urimod.filesystem(uri)[1])
    from filelock import FileLock

    fp = fp or fingerprint(uri, storage_options)
    target = cache_dir() / kind / fp
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / ".complete").exists():
            partial = target.with_name(target.name + ".partial")
            stats = _copy_checked(uri, storage_options, wanted, fp, partial)
            (partial / ".complete").write_text(fp)  # inside the copy: the rename publishes data and marker at once
            if target.exists():  # a copy renamed into place by an older version that died before its marker
                shutil.rmtree(target)
            partial.rename(target)
            print(f"copied {kind.rstrip('s')} {fp[:12]}: {stats.describe()}", file=sys.stderr)
        cache.used(target)  # held while this process lives; LRU copies beyond CNA_DIST_CACHE_MAX_BYTES evicted
    return target


def _copy_checked(
    uri: str, storage_options: dict[str, Any] | None, wanted: Any, fp: str, partial: Path
) -> download.Stats:
    """Copy the wanted files of the listing whose fingerprint is `fp` into `partial`; any other listing, or a copy
    whose config.json does not give `fp` back, is a RunFailure and leaves no copy marked complete."""
    settings = download.Settings.from_env()
    fs, path = urimod.filesystem(uri, _with_connections(uri, storage_options, settings.concurrency))
    try:
        entries = _listing(fs, path)
        config = fs.cat_file(path.rstrip("/") + "/config.json")
    except OSError as exc:  # after the storage stack's retries: name what could not be read
        raise RunFailure(f"cannot list {uri} or read its config.json: {type(exc).__name__}: {exc}") from exc
    now = _fingerprint_of(fs, entries, config, hub.revision_of(uri))
    if now != fp:
        raise RunFailure(f"{uri}: the checkpoint changed since its fingerprint {fp[:12]} was taken (now {now[:12]})")
    files = [download.remote(e) for e in entries if e.get("type") == "file" and wanted(Path(e["name"]).name)]
    stats = download.copy(fs, files, partial, key=fp, settings=settings)
    if _fingerprint_of(fs, entries, (partial / "config.json").read_bytes(), hub.revision_of(uri)) != fp:
        shutil.rmtree(partial)
        raise RunFailure(f"{uri}: the copied config.json does not match fingerprint {fp[:12]}; copy discarded")
    return stats


def _with_connections(uri: str, storage_options: dict[str, Any] | None, concurrency: int) -> dict[str, Any]:
    """s3fs (botocore) keeps at most 10 connections unless told otherwise: as many as ranges in flight."""
    options = dict(storage_options or {})
    if urimod.protocol_of(uri) in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", max(concurrency, 10))
        options["config_kwargs"] = config
    return options


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # padding is masked: any real token pads, eos (or unk) by convention
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise BadInput("the tokenizer has no pad, eos or unk token to pad batches with", source=str(path))
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left"
    return tokenizer


def judge_tokenizer(uri: str, storage_options: dict[str, Any], trust_remote_code: bool, *, field: str) -> Any:
    """A judge checkpoint's config checked and its tokenizer loaded (copied first when remote), or BadInput naming
    `field`: what eval needs before any generation, and what validate checks of a local judge."""
    read_config(uri, storage_options, field=field)
    try:
        return load_tokenizer(localize_tokenizer(uri, storage_options), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot load the judge's tokenizer: {exc}", source=uri, field=field) from None
