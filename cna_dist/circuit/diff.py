"""Compare two circuits: overlap of the selected neurons, per-layer counts and agreement of the shared deltas.

Used by `cna-dist diff` and by the registry, which embeds `parent_diff` in each new version so a nightly job
shows at a glance how much the circuit moved.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # circuits are read, never built or loaded here: no I/O in the core
    from cna_dist.circuit.file import Circuit

Pair = tuple[int, int]


def _deltas(c: Circuit) -> dict[Pair, float]:
    """(layer, neuron) -> delta; the first entry wins should a malformed file repeat a neuron."""
    out: dict[Pair, float] = {}
    for n in c.neurons:
        out.setdefault((n.layer, n.neuron), n.delta)
    return out


def _identity(c: Circuit) -> dict[str, Any]:
    return {
        "name": c.name,
        "version": c.version,
        "model_uri": c.model.uri,
        "fingerprint": c.model.fingerprint,
        "n_neurons": len(c.neurons),
    }


def jaccard(a: set[Pair], b: set[Pair]) -> float:
    """|A∩B| / |A∪B|; two empty circuits are identical, hence 1.0."""
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span (scipy.stats.rankdata 'average', without scipy)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    inv = np.empty(len(x), dtype=np.int64)
    inv[order] = np.arange(len(x))
    s = x[order]
    starts = np.r_[True, s[1:] != s[:-1]]
    dense = np.cumsum(starts)[inv]  # 1-based id of each value's tie group
    bounds = np.r_[np.nonzero(starts)[0], len(x)]  # group g spans sorted positions bounds[g-1] .. bounds[g]-1
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float | None, str | None]:
    """Spearman's rho as (value, None), or (None, reason) where it is undefined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return None, f"fewer than 2 shared neurons ({len(x)})"
    rx, ry = rankdata(x), rankdata(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    sx, sy = float(np.sqrt((dx * dx).sum())), float(np.sqrt((dy * dy).sum()))
    if sx == 0.0 or sy == 0.0:
        side = "a" if sx == 0.0 else "b"
        return None, f"deltas of the shared neurons are constant in circuit {side}"
    rho = float((dx * dy).sum() / (sx * sy))
    return max(-1.0, min(1.0, rho)), None


def _shared_stats(da: dict[Pair, float], db: dict[Pair, float]) -> tuple[float | None, str | None, float | None]:
    shared = sorted(da.keys() & db.keys())
    xa = np.array([da[p] for p in shared], dtype=float)
    xb = np.array([db[p] for p in shared], dtype=float)
    rho, reason = spearman(xa, xb)
    signs = float(np.mean(np.sign(xa) == np.sign(xb))) if shared else None
    return rho, reason, signs


def compare(a: Circuit, b: Circuit) -> dict[str, Any]:
    """JSON-ready comparison of two circuits; keys in a fixed order so the output diffs cleanly between runs."""
    da, db = _deltas(a), _deltas(b)
    sa, sb = set(da), set(db)
    rho, reason, signs = _shared_stats(da, db)
    n_layers = max(a.model.n_layers, b.model.n_layers, *(layer + 1 for layer, _ in sa | sb))
    count_a, count_b, count_s = (
        np.bincount(np.array([layer for layer, _ in s], dtype=np.int64), minlength=n_layers) for s in (sa, sb, sa & sb)
    )
    return {
        "a": _identity(a),
        "b": _identity(b),
        "same_model": a.model.fingerprint == b.model.fingerprint,
        "jaccard": jaccard(sa, sb),
        "shared": len(sa & sb),
        "only_a": len(sa - sb),
        "only_b": len(sb - sa),
        "rank_correlation": rho,
        "rank_correlation_reason": reason,
        "sign_agreement": signs,
        "per_layer": [
            {"layer": i, "a": int(count_a[i]), "b": int(count_b[i]), "shared": int(count_s[i])} for i in range(n_layers)
        ],
    }


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_text(d: dict[str, Any]) -> str:
    """Human-readable report of a `compare` result; layers where neither circuit has a neuron are left out."""
    lines = []
    for side in ("a", "b"):
        c = d[side]
        lines.append(
            f"{side.upper()}: {c['name']} v{c['version']}  {c['n_neurons']} neurons  "
            f"model {c['model_uri']} ({c['fingerprint'][:12]})"
        )
    lines.append(f"same model:       {'yes' if d['same_model'] else 'NO (fingerprints differ)'}")
    lines.append(f"jaccard:          {_fmt(d['jaccard'])}")
    lines.append(f"shared:           {d['shared']}  (only A: {d['only_a']}, only B: {d['only_b']})")
    rho = _fmt(d["rank_correlation"], "+.4f")
    if d["rank_correlation"] is None and d.get("rank_correlation_reason"):
        rho += f" ({d['rank_correlation_reason']})"
    lines.append(f"rank correlation: {rho}  (Spearman, deltas of shared neurons)")
    lines.append(f"sign agreement:   {_fmt(d['sign_agreement'], '.1%')}")
    rows = [r for r in d["per_layer"] if r["a"] or r["b"] or r["shared"]]
    lines.append("")
    if not rows:
        lines.append("per layer: no neurons in either circuit")
    else:
        lines.append(f"{'layer':>5}  {'a':>6}  {'b':>6}  {'shared':>6}")
        lines.extend(f"{r['layer']:>5}  {r['a']:>6}  {r['b']:>6}  {r['shared']:>6}" for r in rows)
    return "\n".join(lines) + "\n"


def parent_diff(parent: Circuit, child: Circuit) -> dict[str, Any]:
    """Compact change summary stored in a new registry version: which neurons came and went since the parent."""
    dp, dc = _deltas(parent), _deltas(child)
    rho, _, _ = _shared_stats(dp, dc)
    return {
        "parent_version": parent.version,
        "jaccard": jaccard(set(dp), set(dc)),
        "added": [[layer, neuron] for layer, neuron in sorted(dc.keys() - dp.keys())],
        "removed": [[layer, neuron] for layer, neuron in sorted(dp.keys() - dc.keys())],
        "rank_correlation": rho,
    }
