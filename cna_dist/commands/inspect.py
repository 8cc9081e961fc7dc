"""`inspect`: what an activation store holds (runs, rows, shards, bytes, who is capturing) or what a circuit is.

A store's damage is reported, not raised: every unreadable run.json, corrupt commit marker and missing chunk of a
committed shard is listed (a listing suffices, no chunk is read), and `--verify` also reads every committed chunk
once (checksum and fill), one chunk in memory at a time. Any problem makes the command exit 1.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from cna_dist.circuit import file as circuitmod
from cna_dist.errors import RunFailure
from cna_dist.eval.table import render_eval
from cna_dist.store import integrity
from cna_dist.store.activations import ActivationStore, Run, has_nan


@dataclass
class RunReport:
    run: str
    model: str = ""
    fingerprint: str = ""
    shape: list[int] = field(default_factory=lambda: [0, 0])
    dtype: str = ""
    rows: int = 0
    committed_shards: int = 0
    missing_shards: list[int] = field(default_factory=list)
    bytes: int = 0
    capturing: str | None = None
    made_by: dict[str, int] = field(default_factory=dict)  # "backend/engine" -> shards (old markers: "unrecorded")
    problems: list[str] = field(default_factory=list)  # damaged objects, each named by its path
    verified_chunks: int | None = None  # chunks read and checked by --verify

    def line(self) -> str:
        if not self.model:
            return "\n".join([f"  run {self.run}: unreadable", *(f"    problem: {p}" for p in self.problems)])
        made = ", ".join(f"{k}: {n}" for k, n in sorted(self.made_by.items()))
        head = (
            f"  run {self.run}: {self.model} ({self.shape[0]}x{self.shape[1]}, {self.dtype}), {self.rows} rows, "
            f"{self.committed_shards} committed shards, missing shards {self.missing_shards or 'none'}, "
            f"{self.bytes / 2**20:.1f} MiB"
            + (f", made by {made}" if made else "")
            + (f", being captured by {self.capturing}" if self.capturing else "")
            + (f", verified {self.verified_chunks} chunks" if self.verified_chunks is not None else "")
        )
        return "\n".join([head, *(f"    problem: {p}" for p in self.problems)])


def read_markers(run: Run) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Every readable commit marker, and a problem for each corrupt one (all of them, not just the first)."""
    markers: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    try:
        names = sorted(run.fs.ls(run.root_path.rstrip("/") + "/commits", detail=False))
    except FileNotFoundError:
        return markers, problems
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if not base.endswith(".json"):
            continue
        try:
            marker = integrity.marker(run.fs.cat_file(name), name, run.meta.shard_rows)
        except RunFailure as exc:
            problems.append(str(exc))
            continue
        markers[int(marker["shard"])] = marker
    return markers, problems


def committed_chunks(run: Run, markers: dict[int, dict[str, Any]]) -> dict[str, tuple[int, slice, slice]]:
    """Chunk key ("row/layer/0") -> (shard, its committed rows, its layers), for every committed shard's chunks."""
    meta = run.meta
    r, per = meta.rows_per_chunk, meta.layers_per_chunk
    out: dict[str, tuple[int, slice, slice]] = {}
    for shard, marker in markers.items():
        start, end = shard * meta.shard_rows, shard * meta.shard_rows + len(marker["rows"])
        for rc in range(start // r, -(-end // r)):
            rows = slice(max(start, rc * r), min(end, (rc + 1) * r))
            for lc in range(-(-meta.n_layers // per)):
                out[f"{rc}/{lc}/0"] = (shard, rows, slice(lc * per, min(meta.n_layers, (lc + 1) * per)))
    return out


def absent_chunks(run: Run, expected: dict[str, tuple[int, slice, slice]]) -> list[str]:
    """The expected chunk keys that a listing of the array does not show, in row then layer order."""
    folder = run.root_path.rstrip("/") + "/acts/c/"
    try:
        present = {p.split("/acts/c/", 1)[-1] for p in run.fs.find(folder)}
    except FileNotFoundError:
        present = set()
    return sorted((k for k in expected if k not in present), key=lambda k: tuple(int(x) for x in k.split("/")))


def verify(run: Run, expected: dict[str, tuple[int, slice, slice]], skip: set[str]) -> tuple[int, list[str]]:
    """Read every committed chunk once: its checksum is checked on reading, its rows must hold no NaN fill."""
    arr = run.array(mode="r")
    problems = []
    for key, (shard, rows, layers) in expected.items():
        if key in skip:
            continue
        try:
            data = run.read_region(arr, rows, layers)
        except Exception as exc:  # noqa: BLE001 - reported with the chunk's name, the others still checked
            problems.append(f"chunk {run.root}/acts/c/{key} (shard {shard}): {type(exc).__name__}: {exc}")
            continue
        if has_nan(data):
            problems.append(f"chunk {run.root}/acts/c/{key} (shard {shard}): committed rows hold NaN")
    return len(expected) - len(skip), problems


def run_report(store: ActivationStore, name: str, check_all: bool) -> RunReport | None:
    try:
        meta = store.load_meta(name)
        if meta is None:
            return None
        run = store.open_run(meta, create=False)
    except RunFailure as exc:
        return RunReport(name, problems=[str(exc)])
    markers, problems = read_markers(run)
    expected = committed_chunks(run, markers)
    absent = absent_chunks(run, expected)
    problems += [f"missing chunk {run.root}/acts/c/{k} (shard {expected[k][0]}, committed)" for k in absent]
    verified = None
    if check_all:
        verified, bad = verify(run, expected, set(absent))
        problems += bad
    capacity = run.array(mode="r").shape[0]
    slots = -(-capacity // meta.shard_rows)
    holder = store.lease(name).holder()
    made_by = Counter(
        f"{m['made_by']['backend']}/{m['made_by']['engine']}" if "made_by" in m else "unrecorded"
        for m in markers.values()
    )
    return RunReport(
        name,
        meta.model_uri,
        meta.fingerprint[:16],
        [meta.n_layers, meta.intermediate_size],
        meta.dtype,
        sum(len(m["rows"]) for m in markers.values()),
        len(markers),
        sorted(set(range(slots)) - set(markers)),
        run.nbytes(),
        None if holder is None else f"{holder.get('host')}:{holder.get('pid')}",
        dict(made_by),
        problems,
        verified,
    )


def store_report(uri: str, check_all: bool = False) -> list[RunReport] | None:
    """One report per run of the store at `uri`; None if `uri` holds no activation store."""
    store = ActivationStore(uri)
    runs = store.runs()
    if not runs:
        return None
    return [r for r in (run_report(store, name, check_all) for name in runs) if r is not None]


def bake_report(uri: str, as_json: bool) -> tuple[str, int] | None:
    """A baked checkpoint's provenance (`cna-bake.json`) and its files checked against it (a listing, no reads);
    an unfinished bake is a problem. None if `uri` is no bake's folder."""
    from cna_dist.bake import card, writer
    from cna_dist.store import uri as urimod

    fs, path = urimod.filesystem(uri)
    try:
        fs.invalidate_cache(path)
        listing = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in fs.ls(path, detail=True)}
    except (FileNotFoundError, NotADirectoryError):
        return None
    if writer.RECORD not in listing:
        if writer.PARTIAL in listing:
            return f"unfinished bake {uri}: re-run the same cna-dist bake to finish it", 1
        return None
    rec = json.loads(fs.cat_file(listing[writer.RECORD]["name"]))
    problems = [
        f"{name}: {listing[name]['size'] if name in listing else 'missing'}, the record says {size} bytes"
        for name, size in rec.get("files", {}).items()
        if name not in listing or int(listing[name]["size"]) != size
    ]
    if as_json:
        return json.dumps({**rec, "problems": problems}, indent=1), len(problems)
    return "\n".join([card.summary(rec, uri), *(f"  problem: {p}" for p in problems)]), len(problems)


def render(uri: str, as_json: bool, check_all: bool = False) -> tuple[str, int]:
    """The text `cna-dist inspect URI` prints (a baked checkpoint's provenance, a store's runs, else the circuit's
    summary) and the problems found."""
    baked = bake_report(uri, as_json) if not uri.endswith(".json") else None
    if baked is not None:
        return baked
    runs = store_report(uri, check_all) if not uri.endswith(".json") else None
    if runs is not None:
        problems = sum(len(r.problems) for r in runs)
        if as_json:
            return json.dumps({"store": uri, "runs": [asdict(r) for r in runs]}, indent=1), problems
        return "\n".join([f"store {uri}", *(r.line() for r in runs)]), problems
    shown = render_eval(uri, as_json) if uri.endswith(".json") else None
    if shown is not None:
        return shown, 0
    c = circuitmod.load(uri)
    if not as_json:
        return c.summary(), 0
    per_layer = c.stats.get("per_layer", {})
    doc = {"name": c.name, "version": c.version, "neurons": len(c.neurons), "universal": len(c.universal)}
    return json.dumps({**doc, "per_layer": per_layer}), 0
