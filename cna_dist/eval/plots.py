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

from cna_dist.circuit.file import Circuit
from cna_dist.store.objects import open_objects, split_uri

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
    return _save(histogram_figure(circuits, title), path, storage_options)


def histogram_figure(circuits: Mapping[str, Circuit], title: str | None = None) -> Figure:
    """The figure `layer_histogram` saves: one bar per layer and circuit, its height the circuit's neurons there."""
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
    return fig


def _number(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _methods(results: Iterable[Mapping[str, Any]]) -> list[str]:
    seen = {str(r["method"]) for r in results}
    return [m for m in METHOD_ORDER if m in seen] + sorted(seen - set(METHOD_ORDER))


def _capability(row: Mapping[str, Any]) -> tuple[float, float] | None:
    """Mean accuracy over the capability tasks and its standard error (the tasks' errors combined)."""
    tasks = [t for t in row.get("capability") or [] if _number(t.get("acc")) is not None]
    if not tasks:
        return None
    errors = [_number(t.get("acc_stderr")) or 0.0 for t in tasks]
    return sum(float(t["acc"]) for t in tasks) / len(tasks), math.sqrt(sum(e * e for e in errors)) / len(tasks)


def _judge(row: Mapping[str, Any]) -> tuple[float, float] | None:
    """The judge's mean score and its spread (standard deviation over the parsed samples)."""
    judge = row.get("judge") or {}
    mean = _number(judge.get("mean"))
    return None if mean is None else (mean, _number(judge.get("std")) or 0.0)


# (title, y label, value and error of a row); refusal and quality always, the others when a row has them
PANELS: list[tuple[str, str, Any]] = [
    ("refusal", "refusal rate", lambda r: None if (v := _number(r.get("refusal_rate"))) is None else (v, 0.0)),
    (
        "quality",
        "quality (distinct 4-gram ratio)",
        lambda r: None if (v := _number(r.get("quality"))) is None else (v, 0.0),
    ),
    ("capability", "accuracy (± standard error)", _capability),
    ("judge", "judge score (± spread)", _judge),
]


def _plot_method(ax: Any, rows: list[Mapping[str, Any]], value: Any, label: str, style: dict[str, Any]) -> None:
    pts = [(float(r["multiplier"]), *v) for r in rows if (v := value(r)) is not None]
    if not pts:
        return
    xs, ys, errs = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
    ax.plot(xs, ys, label=label, linewidth=1.6, markersize=5, **style)
    if any(errs):
        color = style.get("color")
        ax.fill_between(
            xs,
            [y - e for y, e in zip(ys, errs, strict=True)],
            [y + e for y, e in zip(ys, errs, strict=True)],
            color=color,
            alpha=0.15,
            linewidth=0,
        )


def _by_category(ax: Any, results: list[dict[str, Any]]) -> None:
    """Refusal per category under the circuit (cna), one line per category."""
    rows = sorted(
        (r for r in results if r["method"] == "cna" and r.get("refusal_by_category")),
        key=lambda r: float(r["multiplier"]),
    )
    categories = list(dict.fromkeys(c for r in rows for c in r["refusal_by_category"]))
    for i, category in enumerate(categories):
        pts = [
            (float(r["multiplier"]), r["refusal_by_category"][category]["refusal_rate"])
            for r in rows
            if category in r["refusal_by_category"]
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=category, linewidth=1.2, marker=".", color=f"C{i % 10}")
    ax.set_ylabel("refusal rate")
    ax.set_title("refusal by category (cna)")
    ax.set_ylim(-0.03, 1.03)


def eval_curves(
    results: list[dict[str, Any]],
    path: str | Path,
    title: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Refusal, quality, and when measured capability, judge score and refusal per category, against the steering
    multiplier: one panel each, one line per method, so CNA reads against the random-neuron and CAA baselines at a
    glance. Points with a missing metric are skipped in that panel only."""
    return _save(curves_figure(results, title), path, storage_options)


def curves_figure(results: list[dict[str, Any]], title: str | None = None) -> Figure:
    """The figure `eval_curves` saves: one axes per measure, one line per method (label = method name)."""
    panels = [p for p in PANELS if p[0] in ("refusal", "quality") or any(p[2](r) is not None for r in results)]
    categories = any(r.get("refusal_by_category") for r in results)
    n_panels = len(panels) + categories
    fig = Figure(figsize=(5.5 * n_panels, 4.2), layout="tight")
    axes = list(fig.subplots(1, n_panels, sharex=True, squeeze=False)[0])
    for ax, (name, ylabel, value) in zip(axes, panels, strict=False):
        for method in _methods(results):
            rows = sorted((r for r in results if str(r["method"]) == method), key=lambda r: float(r["multiplier"]))
            _plot_method(ax, rows, value, method, METHOD_STYLE.get(method, {"marker": "o"}))
        ax.set_ylabel(ylabel)
        tasks = list(dict.fromkeys(t["task"] for r in results for t in r.get("capability") or []))
        ax.set_title(f"capability ({', '.join(tasks)})" if name == "capability" else name)
        ax.set_ylim(-0.03, 1.03)  # every metric is a fraction (the judge's score too); a fixed scale compares runs
    if categories:
        _by_category(axes[-1], results)
    for ax in axes:
        ax.set_xlabel("multiplier")
        ax.grid(alpha=0.35)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize="small")
    n = sorted({int(r["n"]) for r in results if r.get("n") is not None})
    suffix = f" (n = {n[0]} prompts)" if len(n) == 1 else ""
    fig.suptitle((title or "steering evaluation") + suffix)
    return fig
