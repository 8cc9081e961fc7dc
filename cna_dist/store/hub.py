"""Models on the Hugging Face Hub: `hf://ORG/NAME[@REVISION]`, pinned to a commit once, read through the Hub's client.

The driver resolves the revision (a branch, a tag, or the repo's default branch) to a commit sha before any work
(`pin`), through huggingface_hub's own `HfApi.model_info`, and every later read names that sha
(`hf://ORG/NAME@<sha>`): config, tokenizer and weight files all come from one commit, so a branch moved during or
between runs never mixes two commits' rows, and the sha is part of the model's fingerprint. Files are read through
huggingface_hub's fsspec filesystem (`HfFileSystem`), which fsspec opens for `hf://`; the endpoint comes from
`HF_ENDPOINT` and the token from `HF_TOKEN` (the client reads it; cna-dist never prints or writes it).

`HF_HUB_OFFLINE=1`: nothing is asked of the Hub; the revision is resolved in the local HF cache
(`HF_HUB_CACHE`, `refs/<branch>` and `snapshots/<sha>/`) and the files are read from that snapshot folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cna_dist.errors import BadInput, RunFailure

SHA = re.compile(r"^[0-9a-f]{40}$")
REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
TRUE = ("1", "true", "yes", "on")


def is_hub(uri: str) -> bool:
    return uri.startswith("hf://")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def endpoint() -> str | None:
    """The Hub's address from HF_ENDPOINT, read at call time (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def split(uri: str, field: str = "model.uri") -> tuple[str, str | None, str]:
    """(ORG/NAME, revision or None, path inside the repo) of an `hf://` model URI; BadInput when it is not one.

    Datasets (`hf://datasets/ORG/NAME/...`) are files like any other fsspec URI, not models: refused here.
    """
    parts = uri.removeprefix("hf://").strip("/").split("/")
    name, at, revision = (parts[1] if len(parts) > 1 else "").partition("@")
    repo, path = f"{parts[0]}/{name}", "/".join(parts[2:])
    if not REPO.match(repo) or (at and not revision) or parts[0] in ("datasets", "spaces"):
        raise BadInput(
            f"{uri!r} is not a Hub model: expected hf://ORG/NAME or hf://ORG/NAME@REVISION", source=uri, field=field
        )
    return repo, (revision if at else None), path


def revision_of(uri: str) -> str | None:
    """The commit sha a pinned `hf://ORG/NAME@<sha>` URI names; None for any other URI."""
    if not is_hub(uri):
        return None
    try:
        _, revision, _ = split(uri)
    except BadInput:
        return None
    return revision if revision is not None and SHA.match(revision) else None


def pinned_uri(repo: str, sha: str, path: str = "") -> str:
    """`hf://ORG/NAME@<sha>`, and the checkpoint's folder inside the repo when it is not the repo's root."""
    return f"hf://{repo}@{sha}" + (f"/{path}" if path else "")


def pin(uri: str, revision: str | None, field: str = "model.uri") -> tuple[str, str]:
    """(pinned URI, commit sha) for a Hub model: `uri`'s own @REVISION, else `revision`, else the default branch.

    Online, the Hub answers (and a gated, private or missing repo, or a missing revision, is a BadInput naming
    what to set); offline, the local HF cache does. The model's config.json is read once here, so access is
    checked before any work starts.
    """
    repo, in_uri, path = split(uri, field)
    if in_uri is not None and revision is not None and in_uri != revision:
        raise BadInput(f"the URI names revision {in_uri!r} and model.revision {revision!r}", source=uri, field=field)
    wanted = in_uri or revision
    if offline():
        sha = _cached_sha(repo, wanted, uri, field, path)
    else:
        sha = _remote_sha(repo, wanted, uri, field)
        _check_readable(pinned_uri(repo, sha, path), repo, sha, uri, field)
    return pinned_uri(repo, sha, path), sha


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def _remote_sha(repo: str, wanted: str | None, uri: str, field: str) -> str:
    with _hub_errors(repo, wanted, uri, field):
        info = _api().model_info(repo, revision=wanted)
    if not info.sha or not SHA.match(info.sha):
        raise RunFailure(f"{uri}: the Hub gave no commit sha for {repo} at {wanted or 'its default branch'}")
    return info.sha


def _check_readable(pinned: str, repo: str, sha: str, uri: str, field: str) -> None:
    """Read config.json at the pinned commit: a gated repo answers 401/403 to file reads, not to model_info."""
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem(endpoint=endpoint())
    with _hub_errors(repo, sha, uri, field):
        try:
            fs.cat_file(pinned.removeprefix("hf://") + "/config.json")
        except FileNotFoundError:
            message = f"{repo} at {sha[:12]} has no config.json: not a model checkpoint"
            raise BadInput(message, source=uri, field=field) from None


@contextmanager
def _hub_errors(repo: str, revision: str | None, uri: str, field: str) -> Iterator[None]:
    """huggingface_hub's errors as BadInput naming the repo and what to set; a token's value is never shown."""
    try:
        yield
    except Exception as exc:
        message = _describe(exc, repo, revision)
        if message is None:
            raise
        raise BadInput(message, source=uri, field=field) from None


def _describe(exc: BaseException, repo: str, revision: str | None) -> str | None:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = os.environ.get("HF_ENDPOINT") or "the Hugging Face Hub"
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    if isinstance(exc, GatedRepoError):
        return (
            f"{repo} is a gated repository ({token}): set HF_TOKEN to a token of an account that has been "
            "granted access to it (ask for access on its Hub page)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r} on {where}: give a branch, tag or commit sha that exists"
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"repository {repo} not found on {where} ({token}): check ORG/NAME; a private repository needs HF_TOKEN "
            "set to a token that can read it"
        )
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return f"{repo}: the Hub refused access ({status}; {token}): set HF_TOKEN to a token that can read it"
    return None


# -- offline: the local HF cache ------------------------------------------------------------------------------------


def cache_root() -> Path:
    """huggingface_hub's cache folder, as it finds it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _repo_folder(repo: str) -> Path:
    return cache_root() / ("models--" + repo.replace("/", "--"))


def _cached_sha(repo: str, wanted: str | None, uri: str, field: str, path: str = "") -> str:
    folder = _repo_folder(repo)
    ref = wanted or "main"
    if SHA.match(ref):
        sha = ref
    else:
        ref_file = folder / "refs" / ref
        if not ref_file.is_file():
            raise BadInput(
                f"HF_HUB_OFFLINE=1 and the local HF cache ({cache_root()}) has no {repo} at {ref!r}: download it "
                "first (huggingface-cli download) or unset HF_HUB_OFFLINE",
                source=uri,
                field=field,
            )
        sha = ref_file.read_text().strip()
    if not (folder / "snapshots" / sha / path / "config.json").is_file():
        raise BadInput(
            f"HF_HUB_OFFLINE=1 and the local HF cache has no snapshot {sha[:12]} of {repo} with a config.json",
            source=uri,
            field=field,
        )
    return sha


def offline_folder(uri: str) -> str | None:
    """The local snapshot folder a pinned `hf://` URI reads from when HF_HUB_OFFLINE=1; None otherwise."""
    if not (is_hub(uri) and offline()):
        return None
    sha = revision_of(uri)
    if sha is None:
        return None
    repo, _, path = split(uri)
    folder = _repo_folder(repo) / "snapshots" / sha
    return str(folder / path) if path else str(folder)
