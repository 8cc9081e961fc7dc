"""PNG reports: each figure draws the data it is given (bar heights, line points), files are real PNGs of the
expected size, and odd inputs (gaps, URIs) are handled."""

from __future__ import annotations

from pathlib import Path

import fsspec
import matplotlib.image
import pytest

from cna_dist.circuit import file as circuitmod
from cna_dist.eval import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make(neurons: list[tuple[int, int, float]], n_layers: int = 4) -> circuitmod.Circuit:
    model = circuitmod.ModelRef(
        uri="/m", architecture="LlamaForCausalLM", n_layers=n_layers, intermediate_size=16, fingerprint="f" * 64
    )
    return circuitmod.Circuit(
        name="c",
        created_at="2024-01-01T00:00:00+00:00",
        model=model,
        params={},
        prompts={},
        neurons=[circuitmod.Neuron(layer=ly, neuron=n, delta=d) for ly, n, d in neurons],
        universal=[],
        stats={},
        provenance=circuitmod.Provenance(run="test"),
    )


def check_png(path: Path) -> tuple[int, ...]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    return matplotlib.image.imread(path).shape


def test_layer_histogram_two_and_one(tmp_path: Path) -> None:
    a = make([(2, 0, 3.0), (2, 1, 2.0), (3, 5, 1.0)])
    b = make([(0, 9, 5.0), (2, 0, 4.0), (5, 1, 1.0)], n_layers=6)
    out = plots.layer_histogram({"a v1": a, "b v2": b}, tmp_path / "sub" / "diff.png", title="a vs b")
    assert out == str(tmp_path / "sub" / "diff.png")
    h, w, channels = check_png(Path(out))
    assert channels in (3, 4) and h == 4 * plots.DPI and w >= 6 * plots.DPI
    one = plots.layer_histogram({"refusal v3": a}, str(tmp_path / "one.png"))
    check_png(Path(one))
    empty = plots.layer_histogram({"empty": make([])}, tmp_path / "empty.png")
    check_png(Path(empty))
    with pytest.raises(ValueError):
        plots.layer_histogram({}, tmp_path / "none.png")


def test_eval_curves(tmp_path: Path) -> None:
    results = [
        {"method": m, "multiplier": x, "refusal_rate": r, "quality": q, "n": 20}
        for m, pts in {
            "caa": [(2.0, 0.1, 0.9), (0.0, 0.5, 1.0)],
            "cna": [(1.0, 0.6, 0.95), (0.0, 0.1, 0.9), (2.0, 0.9, 0.7)],
            "random": [(2.0, 0.6, None), (0.0, 0.55, 0.93)],
        }.items()
        for x, r, q in pts
    ]
    out = plots.eval_curves(results, tmp_path / "eval.png", title="refusal steering")
    h, w, _ = check_png(Path(out))
    assert (h, w) == (round(4.2 * plots.DPI), 11 * plots.DPI)
    check_png(Path(plots.eval_curves([], tmp_path / "blank.png")))


def test_writes_to_fsspec_uri() -> None:
    out = plots.eval_curves(
        [{"method": "cna", "multiplier": 1.0, "refusal_rate": 0.5, "quality": 1.0, "n": 4}],
        "memory://plots-test/eval.png",
    )
    with fsspec.open(out, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def bars(ax) -> dict[str, list[tuple[float, float]]]:
    """Legend label -> (bar centre, height) of each bar in that series."""
    out = {}
    for container in ax.containers:
        out[container.get_label()] = [(p.get_x() + p.get_width() / 2, p.get_height()) for p in container.patches]
    return out


def test_histogram_draws_each_circuits_counts_per_layer() -> None:
    a = make([(2, 0, 3.0), (2, 1, 2.0), (3, 5, 1.0)])
    b = make([(0, 9, 5.0), (2, 0, 4.0), (5, 1, 1.0)], n_layers=6)
    fig = plots.histogram_figure({"a v1": a, "b v2": b})
    series = bars(fig.axes[0])
    assert list(series) == ["a v1 (3)", "b v2 (3)"]
    heights = {label: [h for _, h in pts] for label, pts in series.items()}
    assert heights["a v1 (3)"] == [0, 0, 2, 1, 0, 0]  # six layers: the wider circuit sets the axis
    assert heights["b v2 (3)"] == [1, 0, 1, 0, 0, 1]
    centres = [x for x, _ in series["a v1 (3)"]]
    assert centres == pytest.approx([layer - 0.2 for layer in range(6)])  # side by side around each layer


def lines(ax) -> dict[str, list[tuple[float, float]]]:
    return {line.get_label(): [tuple(p) for p in line.get_xydata()] for line in ax.lines}


def test_curves_draw_each_methods_points_sorted_by_multiplier() -> None:
    results = [
        {"method": "cna", "multiplier": 2.0, "refusal_rate": 0.9, "quality": 0.7, "n": 20},
        {"method": "cna", "multiplier": 0.0, "refusal_rate": 0.1, "quality": None, "n": 20},
        {"method": "random", "multiplier": 0.0, "refusal_rate": 0.55, "quality": 0.93, "n": 20},
        {
            "method": "cna",
            "multiplier": 1.0,
            "refusal_rate": 0.6,
            "quality": 0.95,
            "n": 20,
            "capability": [{"task": "t", "acc": 0.5, "acc_stderr": 0.1}],
            "refusal_by_category": {"fraud": {"refusal_rate": 0.25, "n": 4}},
        },
    ]
    fig = plots.curves_figure(results)
    refusal, quality, capability, category = fig.axes
    assert lines(refusal) == {"cna": [(0.0, 0.1), (1.0, 0.6), (2.0, 0.9)], "random": [(0.0, 0.55)]}
    assert lines(quality) == {"cna": [(1.0, 0.95), (2.0, 0.7)], "random": [(0.0, 0.93)]}  # a missing point skipped
    assert lines(capability) == {"cna": [(1.0, 0.5)]}
    assert capability.get_title() == "capability (t)"
    assert lines(category) == {"fraud": [(1.0, 0.25)]}
    assert fig._suptitle.get_text() == "steering evaluation (n = 20 prompts)"
