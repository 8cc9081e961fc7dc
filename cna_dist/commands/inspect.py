"""`inspect`: what an activation store holds (runs, rows, shards, bytes, who is capturing) or what a circuit is."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass

from cna_dist import circuit as circuitmod
from cna_dist.io.store import ActivationStore


@dataclass
class RunReport:
    run: str
    model: str
    fingerprint: str
    shape: list[int]
    dtype: str
    rows: int
    committed_shards: int
    missing_shards: list[int]
    bytes: int
    capturing: str | None
    made_by: dict[str, int]  # "backend/engine" -> committed shards (markers before the renovation: "unrecorded")

    def line(self) -> str:
        made = ", ".join(f"{k}: {n}" for k, n in sorted(self.made_by.items()))
        return (
            f"  run {self.run}: {self.model} ({self.shape[0]}x{self.shape[1]}, {self.dtype}), {self.rows} rows, "
            f"{self.committed_shards} committed shards, missing shards {self.missing_shards or 'none'}, "
            f"{self.bytes / 2**20:.1f} MiB"
            + (f", made by {made}" if made else "")
            + (f", being captured by {self.capturing}" if self.capturing else "")
        )


def store_report(uri: str) -> list[RunReport] | None:
    """One report per run of the store at `uri`; None if `uri` holds no activation store."""
    store = ActivationStore(uri)
    runs = store.runs()
    if not runs:
        return None
    reports = []
    for name in runs:
        meta = store.load_meta(name)
        if meta is None:
            continue
        run = store.open_run(meta, create=False)
        markers = run.markers()
        capacity = run.array(mode="r").shape[0]
        slots = -(-capacity // meta.shard_rows) if meta.shard_rows else 0
        holder = store.lease(name).holder()
        made_by = Counter(
            f"{m['made_by']['backend']}/{m['made_by']['engine']}" if "made_by" in m else "unrecorded"
            for m in markers.values()
        )
        reports.append(
            RunReport(
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
            )
        )
    return reports


def render(uri: str, as_json: bool) -> str:
    """The text `cna-dist inspect URI` prints: a store's runs, else the circuit file's summary."""
    runs = store_report(uri) if not uri.endswith(".json") else None
    if runs is not None:
        if as_json:
            return json.dumps({"store": uri, "runs": [asdict(r) for r in runs]}, indent=1)
        return "\n".join([f"store {uri}", *(r.line() for r in runs)])
    c = circuitmod.load(uri)
    if not as_json:
        return c.summary()
    per_layer = c.stats.get("per_layer", {})
    return json.dumps(
        {
            "name": c.name,
            "version": c.version,
            "neurons": len(c.neurons),
            "universal": len(c.universal),
            "per_layer": per_layer,
        }
    )
