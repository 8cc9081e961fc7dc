"""A stand-in for the Hugging Face Hub on 127.0.0.1: the part of its HTTP API huggingface_hub's client uses.

Read from huggingface_hub 2.4's own source (hf_api.py, hf_file_system.py, utils/_http.py):
- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}`: `HfApi.model_info`, `{"id", "sha", ...}`;
- `GET /api/models/{repo}/tree/{rev}[/{path}]`: `list_repo_tree`, one page (no `Link` header), entries
  `{"type", "path", "size", "oid", "lfs": {"oid", "size", "pointerSize"}}` (weights are LFS files, as on the Hub);
- `GET|HEAD /{repo}/resolve/{rev}/{file}`: file bytes, a `Range: bytes=a-b` answered 206 with `Content-Range`;
  `ETag`, `X-Repo-Commit`, `Accept-Ranges` as the Hub sends them;
- errors as `hf_raise_for_status` reads them: 404 with `X-Error-Code: RepoNotFound | RevisionNotFound |
  EntryNotFound`, 401 (no or a bad token) / 403 (a token without access) with `X-Error-Code: GatedRepo` on a gated
  repo's files, 401 on a private repo's API.

Branches move (`move`), so a test can point `main` at a new commit between two runs. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    gated: bool = False
    private: bool = False
    default: str = "main"


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)  # tokens that may read gated and private repos
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", **flags: Any) -> str:
        """Add a commit holding `files` and point `branch` at it; its sha is a hash of the content and the parent."""
        repo = self.repos.setdefault(repo_id, Repo(**flags))
        parent = repo.branches.get(branch, "")
        digest = hashlib.sha1(parent.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.branches[branch] = sha
        return sha

    def move(self, repo_id: str, branch: str, sha: str) -> None:
        self.repos[repo_id].branches[branch] = sha

    def resolve(self, repo: Repo, rev: str) -> str | None:
        rev = unquote(rev)
        return rev if rev in repo.commits else repo.branches.get(rev)


def folder_files(path: Path) -> dict[str, bytes]:
    """A checkpoint folder's files by name (a flat folder, as save_pretrained writes it)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# Models are `ORG/NAME`, datasets `datasets/ORG/NAME` (the key a dataset is committed under, as hf:// names it).
API = re.compile(r"^/api/(?:models/|(datasets)/)([^/]+/[^/]+?)(?:/revision/([^/]+))?$")
TREE = re.compile(r"^/api/(?:models/|(datasets)/)([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
RESOLVE = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class Handler(BaseHTTPRequestHandler):
    hub: Hub

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._route(body=True)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ").strip() or None

    def _route(self, body: bool) -> None:
        path = urlsplit(self.path).path
        with self.hub.lock:
            self.hub.requests.append(
                {"method": self.command, "path": path, "range": self.headers.get("Range"), "token": self._token()}
            )
        for pattern, handler in ((TREE, self._tree), (API, self._info), (RESOLVE, self._file)):
            match = pattern.match(path)
            if match:
                kind, repo_id, *rest = match.groups()
                handler(f"{kind}/{repo_id}" if kind else repo_id, *rest, body=body)
                return
        self._error(404, "EntryNotFound", body)

    def _error(self, status: int, code: str | None, body: bool, message: str = "") -> None:
        payload = json.dumps({"error": message or code or "error"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _json(self, obj: Any, body: bool) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _repo(self, repo_id: str, rev: str | None, body: bool, *, files: bool) -> tuple[Repo, str] | None:
        """The repo and commit a request names, or None after answering the error the Hub gives."""
        repo = self.hub.repos.get(repo_id)
        allowed = self._token() in self.hub.tokens
        if repo is None or (repo.private and not allowed):
            self._error(401 if self._token() is None else 404, "RepoNotFound", body)
            return None
        sha = self.hub.resolve(repo, rev or repo.default)
        if sha is None:
            self._error(404, "RevisionNotFound", body)
            return None
        if files and repo.gated and not allowed:
            status = 401 if self._token() is None else 403
            self._error(status, "GatedRepo", body, "Access to this model is restricted")
            return None
        return repo, sha

    def _info(self, repo_id: str, rev: str | None, body: bool) -> None:
        found = self._repo(repo_id, rev, body, files=False)
        if found is None:
            return
        repo, sha = found
        siblings = [{"rfilename": name} for name in sorted(repo.commits[sha])]
        gated = "manual" if repo.gated else False
        self._json(
            {
                "id": repo_id.removeprefix("datasets/"),
                "sha": sha,
                "private": repo.private,
                "gated": gated,
                "siblings": siblings,
            },
            body,
        )

    def _tree(self, repo_id: str, rev: str, inner: str | None, body: bool) -> None:
        found = self._repo(repo_id, rev, body, files=False)
        if found is None:
            return
        repo, sha = found
        prefix = unquote(inner or "").strip("/")
        entries = []
        for name, data in sorted(repo.commits[sha].items()):
            if prefix and not name.startswith(prefix + "/"):
                continue
            entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries, body)

    def _file(self, repo_id: str, rev: str, name: str, body: bool) -> None:
        found = self._repo(repo_id, rev, body, files=True)
        if found is None:
            return
        repo, sha = found
        data = repo.commits[sha].get(unquote(name))
        if data is None:
            self._error(404, "EntryNotFound", body)
            return
        start, end, status = 0, len(data), 200
        wanted = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", "").strip())
        if wanted:
            start = int(wanted.group(1))
            end = min(len(data), int(wanted.group(2)) + 1) if wanted.group(2) else len(data)
            if start >= len(data):
                self._error(416, None, body)
                return
            status = 206
        etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else _git_oid(data)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", sha)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(data[start:end])


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """The stand-in, served from a thread of the test process on 127.0.0.1; `url` is what HF_ENDPOINT is set to."""

    def __init__(self, hub: Hub | None = None) -> None:
        self.hub = hub or Hub()
        handler = type("BoundHandler", (Handler,), {"hub": self.hub})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
