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
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cna_dist.manifest import load_list
from cna_dist.store.objects import open_objects, split_uri

STATUS_BY_EXIT = {0: None, 2: "bad_input"}


@dataclass
class Mined:
    """What a successful child `mine` reported (its --summary JSON), and the new version's diff if any."""

    circuit: str
    version: int
    shards_captured: int
    shards_reused: int
    retries: int
    diff: dict[str, Any] | None


@dataclass
class Entry:
    """One manifest's night: `mined` when it exited 0, `error` (its last error line) otherwise."""

    manifest: str
    seconds: float
    exit_code: int
    status: str  # published | unchanged | bad_input | failed
    mined: Mined | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "manifest": self.manifest,
            "seconds": self.seconds,
            "exit_code": self.exit_code,
            "status": self.status,
        }
        if self.mined is not None:
            out.update(asdict(self.mined))
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class Report:
    list: str
    started_at: str
    finished_at: str
    entries: list[Entry]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(e.status for e in self.entries))

    @property
    def ok(self) -> bool:
        return all(e.status in ("published", "unchanged") for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "cna-nightly/1",
            "list": self.list,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "counts": self.counts,
            "ok": self.ok,
            "manifests": [e.to_dict() for e in self.entries],
        }


def mine_one(manifest: Path, mine_args: list[str], workdir: Path) -> Entry:
    """`cna-dist mine MANIFEST` in a child process; its summary JSON and exit code become one report entry."""
    summary = workdir / f"{len(list(workdir.iterdir())):03d}-summary.json"
    cmd = [sys.executable, "-m", "cna_dist.cli", "mine", str(manifest), "--quiet", "--summary", str(summary)]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *mine_args], capture_output=True, text=True, env=os.environ.copy())
    seconds = round(time.perf_counter() - t0, 2)
    if proc.returncode == 0 and summary.is_file():
        s = json.loads(summary.read_text())
        mined = Mined(
            s["circuit"],
            s["version"],
            s["shards_captured"],
            s["shards_reused"],
            s["retries"],
            _parent_diff(s["circuit"]),
        )
        return Entry(str(manifest), seconds, 0, s["status"], mined=mined)
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "failed:"))]
    error = (errors or lines or [f"exit code {proc.returncode}"])[-1][:2000]
    return Entry(str(manifest), seconds, proc.returncode, STATUS_BY_EXIT.get(proc.returncode) or "failed", error=error)


def _parent_diff(circuit_uri: str) -> dict[str, Any] | None:
    """The new version's diff against its parent (as the registry recorded it), shortened for the report."""
    from cna_dist.circuit.file import load

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


def refresh(list_path: Path, report_uri: str, mine_args: list[str], workdir: Path, echo: Any = print) -> Report:
    """Mine each manifest of the list in turn, then write the report to `report_uri` (any fsspec URI)."""
    report = Report(str(list_path), datetime.now(UTC).isoformat(timespec="seconds"), "", [])
    for manifest in load_list(list_path):
        entry = mine_one(manifest, mine_args, workdir)
        report.entries.append(entry)
        detail = entry.mined.circuit if entry.mined else entry.error
        echo(f"{entry.status:>10}  {manifest.name}  {detail}")
    report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    folder, key = split_uri(report_uri)
    open_objects(folder).put_json(key, report.to_dict())
    return report
