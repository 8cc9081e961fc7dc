"""PNG reports: files exist, are real PNGs of the expected size, and odd inputs (gaps, URIs) are handled."""

from __future__ import annotations

from pathlib import Path

import fsspec
import matplotlib.image
import pytest

from cna_dist import circuit as circuitmod
from cna_dist.report import plots

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
