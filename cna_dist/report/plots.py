"""PNG reports written beside the JSON ones (spec §3): a circuit's layer histogram and the steering eval curves.

Built on `matplotlib.figure.Figure` with the Agg canvas, never pyplot: no global figure state, no display needed,
safe inside Ray workers and threads. Paths may be local or any fsspec URI, like every other output.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cna_dist.circuit import Circuit
from cna_dist.io.objects import open_objects, split_uri

DPI = 120
METHOD_ORDER = ("cna", "random", "caa")
METHOD_STYLE = {
    "cna": {"color": "C0", "marker": "o"},
    "random": {"color": "0.45", "marker": "s", "linestyle": "--"},
    "caa": {"color": "C1", "marker": "^"},
}


def _save(fig: Figure, path: str | Path, storage_options: dict[str, Any] | None) -> str:
    """Render to PNG bytes first so an object-store target never sees a partial file."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    folder, name = split_uri(str(path))
    open_objects(folder, storage_options).put(name, buf.getvalue())
    return str(path)


def layer_histogram(
    circuits: Mapping[str, Circuit],
    path: str | Path,
    title: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Neurons per layer, one bar series per circuit side by side; shows where in depth a circuit lives."""
    if not circuits:
        raise ValueError("layer_histogram needs at least one circuit")
    n_layers = max(max([c.model.n_layers, *(n.layer + 1 for n in c.neurons)]) for c in circuits.values())
    series = {label: [0] * n_layers for label in circuits}
    for label, c in circuits.items():
        for n in c.neurons:
            series[label][n.layer] += 1

    fig = Figure(figsize=(min(16.0, max(6.0, 0.22 * n_layers * len(circuits) + 2.0)), 4.0), layout="tight")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (label, counts) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar(
            [layer + offset for layer in range(n_layers)],
            counts,
            width=width,
            align="center",
            label=f"{label} ({sum(counts)})",
            color=f"C{i}",
            edgecolor="white",
            linewidth=0.5,
        )
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n_layers, 20)))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons in circuit")
    ax.set_title(title or "circuit neurons per layer")
    ax.grid(axis="y", alpha=0.35)
    ax.set_axisbelow(True)
    ax.legend(frameon=False)
    return _save(fig, path, storage_options)


def _number(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _methods(results: Iterable[Mapping[str, Any]]) -> list[str]:
    seen = {str(r["method"]) for r in results}
    return [m for m in METHOD_ORDER if m in seen] + sorted(seen - set(METHOD_ORDER))


def eval_curves(
    results: list[dict[str, Any]],
    path: str | Path,
    title: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Refusal rate and quality against the steering multiplier, one line per method, so CNA reads against the
    random-neuron and CAA baselines at a glance. Points with a missing metric are skipped in that panel only."""
    fig = Figure(figsize=(11.0, 4.2), layout="tight")
    ax_refusal, ax_quality = fig.subplots(1, 2, sharex=True)
    for method in _methods(results):
        rows = sorted((r for r in results if str(r["method"]) == method), key=lambda r: float(r["multiplier"]))
        style = METHOD_STYLE.get(method, {"marker": "o"})
        for ax, key in ((ax_refusal, "refusal_rate"), (ax_quality, "quality")):
            pts = [(float(r["multiplier"]), v) for r in rows if (v := _number(r.get(key))) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, linewidth=1.6, markersize=5, **style)
    ax_refusal.set_ylabel("refusal rate")
    ax_refusal.set_title("refusal")
    ax_quality.set_ylabel("quality (distinct 4-gram ratio)")
    ax_quality.set_title("quality")
    for ax in (ax_refusal, ax_quality):
        ax.set_ylim(-0.03, 1.03)  # both metrics are fractions; a fixed scale keeps runs comparable
        ax.set_xlabel("multiplier")
        ax.grid(alpha=0.35)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False)
    n = sorted({int(r["n"]) for r in results if r.get("n") is not None})
    suffix = f" (n = {n[0]} prompts)" if len(n) == 1 else ""
    fig.suptitle((title or "steering evaluation") + suffix)
    return _save(fig, path, storage_options)
