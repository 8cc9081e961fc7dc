"""The nightly refresh: mine every manifest of a list, each in its own process, and report what happened.

Each manifest runs as `cna-dist mine` in a child process, so a crash, an out-of-memory kill or a bad manifest
ends only that one; the others still publish. Inside a Ray job the children inherit RAY_ADDRESS and join the
job's cluster. Unchanged inputs publish nothing ("unchanged, vN"), so a quiet night costs almost nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from cna_dist.errors import BadInput
from cna_dist.io import uri as urimod

STATUS_BY_EXIT = {0: None, 2: "bad_input"}


def load_list(path: Path) -> list[Path]:
    """The manifests named by a nightly list (`manifests: [paths relative to the list]`)."""
    if not path.is_file():
        raise BadInput("nightly list does not exist", source=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BadInput(f"not valid YAML: {exc}", source=str(path)) from None
    if not isinstance(data, dict) or set(data) != {"manifests"}:
        raise BadInput(
            "expected exactly one key, `manifests`",
            source=str(path),
            field=",".join(sorted(data)) if isinstance(data, dict) else "<root>",
        )
    entries = data["manifests"]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise BadInput(f"expected a non-empty list of paths, got {entries!r}", source=str(path), field="manifests")
    return [(path.parent / e).resolve() for e in entries]


def mine_one(manifest: Path, mine_args: list[str], workdir: Path) -> dict[str, Any]:
    """`cna-dist mine MANIFEST` in a child process; its summary JSON and exit code become one report entry."""
    summary = workdir / f"{len(list(workdir.iterdir())):03d}-summary.json"
    cmd = [
        sys.executable,
        "-m",
        "cna_dist.cli",
        "mine",
        str(manifest),
        "--quiet",
        "--summary",
        str(summary),
        *mine_args,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    entry: dict[str, Any] = {
        "manifest": str(manifest),
        "seconds": round(time.perf_counter() - t0, 2),
        "exit_code": proc.returncode,
    }
    if proc.returncode == 0 and summary.is_file():
        s = json.loads(summary.read_text())
        entry.update(
            status=s["status"],
            circuit=s["circuit"],
            version=s["version"],
            shards_captured=s["shards_captured"],
            shards_reused=s["shards_reused"],
            retries=s["retries"],
        )
        entry["diff"] = _parent_diff(s["circuit"])
    else:
        entry["status"] = STATUS_BY_EXIT.get(proc.returncode) or "failed"
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("error:", "failed:"))]
        entry["error"] = (errors or lines or [f"exit code {proc.returncode}"])[-1][:2000]
    return entry


def _parent_diff(circuit_uri: str) -> dict[str, Any] | None:
    """The new version's diff against its parent (as the registry recorded it), shortened for the report."""
    from cna_dist.circuit import load

    diff = load(circuit_uri).diff
    if not diff:
        return None
    return {
        "parent_version": diff.get("parent_version"),
        "jaccard": diff.get("jaccard"),
        "added": len(diff.get("added", [])),
        "removed": len(diff.get("removed", [])),
        "rank_correlation": diff.get("rank_correlation"),
    }


def refresh(list_path: Path, report_uri: str, mine_args: list[str], workdir: Path, echo: Any = print) -> dict[str, Any]:
    manifests = load_list(list_path)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    entries = []
    for manifest in manifests:
        entry = mine_one(manifest, mine_args, workdir)
        entries.append(entry)
        detail = entry.get("circuit") or entry.get("error", "")
        echo(f"{entry['status']:>10}  {manifest.name}  {detail}")
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    report = {
        "schema": "cna-nightly/1",
        "list": str(list_path),
        "started_at": started,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": counts,
        "ok": all(e["status"] in ("published", "unchanged") for e in entries),
        "manifests": entries,
    }
    fs, path = urimod.filesystem(report_uri)
    fs.pipe_file(path, (json.dumps(report, indent=1) + "\n").encode())
    return report
