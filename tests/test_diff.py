"""Circuit comparison: exact Jaccard, per-layer counts, Spearman with ties, undefined cases, parent diffs, text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cna_dist.circuit import diff
from cna_dist.circuit import file as circuitmod
from tests.conftest import make_circuit


def make(
    neurons: list[tuple[int, int, float]],
    *,
    name: str = "refusal",
    version: int = 0,
    n_layers: int = 4,
    fingerprint: str = "f" * 64,
) -> circuitmod.Circuit:
    model = circuitmod.ModelRef(
        uri=f"/models/tiny-{n_layers}",
        architecture="LlamaForCausalLM",
        n_layers=n_layers,
        intermediate_size=16,
        fingerprint=fingerprint,
    )
    ranked = sorted(neurons, key=lambda t: -abs(t[2]))
    return circuitmod.Circuit(
        name=name,
        version=version,
        created_at="2024-01-01T00:00:00+00:00",
        model=model,
        params={},
        prompts={},
        neurons=[circuitmod.Neuron(layer=ly, neuron=n, delta=d, mean_pos=d, mean_neg=0.0) for ly, n, d in ranked],
        universal=[],
        stats={},
        provenance=circuitmod.Provenance(run="test"),
    )


# Shared (sorted by pair): (2,0) (2,1) (3,5) (3,7); a = [4, 2, 2, 1], b = [20, 30, 20, -10].
# Ranks a = [4, 2.5, 2.5, 1], b = [2.5, 4, 2.5, 1]; centred: [1.5, 0, 0, -1.5] . [0, 1.5, 0, -1.5] = 2.25,
# both norms^2 = 4.5, so rho = 2.25 / 4.5 = 0.5. Signs agree on 3 of 4.
A = [(2, 0, 4.0), (2, 1, 2.0), (3, 5, 2.0), (3, 7, 1.0), (1, 3, -0.5)]
B = [(2, 0, 20.0), (2, 1, 30.0), (3, 5, 20.0), (3, 7, -10.0), (0, 9, 5.0)]


def test_compare_hand_made() -> None:
    a = make(A, name="a", version=1)
    b = make(B, name="b", version=2, n_layers=6, fingerprint="e" * 64)
    d = diff.compare(a, b)
    assert list(d) == [
        "a",
        "b",
        "same_model",
        "jaccard",
        "shared",
        "only_a",
        "only_b",
        "rank_correlation",
        "rank_correlation_reason",
        "sign_agreement",
        "per_layer",
    ]
    assert d["a"] == {"name": "a", "version": 1, "model_uri": "/models/tiny-4", "fingerprint": "f" * 64, "n_neurons": 5}
    assert d["b"]["name"] == "b" and d["b"]["n_neurons"] == 5
    assert d["same_model"] is False
    assert d["jaccard"] == pytest.approx(4 / 6)
    assert (d["shared"], d["only_a"], d["only_b"]) == (4, 1, 1)
    assert d["rank_correlation"] == pytest.approx(0.5)
    assert d["rank_correlation_reason"] is None
    assert d["sign_agreement"] == pytest.approx(0.75)
    assert d["per_layer"] == [
        {"layer": 0, "a": 0, "b": 1, "shared": 0},
        {"layer": 1, "a": 1, "b": 0, "shared": 0},
        {"layer": 2, "a": 2, "b": 2, "shared": 2},
        {"layer": 3, "a": 2, "b": 2, "shared": 2},
        {"layer": 4, "a": 0, "b": 0, "shared": 0},
        {"layer": 5, "a": 0, "b": 0, "shared": 0},
    ]
    assert json.loads(json.dumps(d)) == d
    flipped = diff.compare(b, a)
    assert flipped["jaccard"] == d["jaccard"] and flipped["rank_correlation"] == pytest.approx(0.5)


def test_identical_and_built_circuits() -> None:
    c = make_circuit()
    d = diff.compare(c, c)
    assert d["jaccard"] == 1.0 and d["same_model"] is True and d["only_a"] == d["only_b"] == 0
    assert d["rank_correlation"] == pytest.approx(1.0) and d["sign_agreement"] == 1.0
    assert sum(r["shared"] for r in d["per_layer"]) == len(c.neurons) == 5 and len(d["per_layer"]) == 4


def test_rankdata_average_ties() -> None:
    x = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    assert diff.rankdata(x).tolist() == [4.5, 1.5, 6, 1.5, 8, 11, 3, 10, 8, 4.5, 8]
    # Perfectly anti-monotone with ties on both sides still gives -1.
    rho, reason = diff.spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([9.0, 5.0, 5.0, 1.0]))
    assert rho == pytest.approx(-1.0) and reason is None


def test_undefined_cases() -> None:
    empty = make([])
    d = diff.compare(empty, empty)
    assert d["jaccard"] == 1.0 and d["shared"] == 0
    assert d["rank_correlation"] is None and "fewer than 2" in d["rank_correlation_reason"]
    assert d["sign_agreement"] is None

    disjoint = diff.compare(make([(0, 1, 1.0)]), make([(0, 2, 1.0)]))
    assert disjoint["jaccard"] == 0.0 and disjoint["sign_agreement"] is None and disjoint["rank_correlation"] is None

    one = diff.compare(make([(0, 1, 1.0), (0, 2, 2.0)]), make([(0, 1, -3.0)]))
    assert one["rank_correlation"] is None and "(1)" in one["rank_correlation_reason"]
    assert one["sign_agreement"] == 0.0 and one["jaccard"] == 0.5

    const = diff.compare(make([(0, 1, 2.0), (1, 1, 2.0)]), make([(0, 1, 1.0), (1, 1, 3.0)]))
    assert const["rank_correlation"] is None and "constant in circuit a" in const["rank_correlation_reason"]


def test_parent_diff() -> None:
    parent = make(A + [(3, 2, 0.1), (0, 0, 0.2)], version=3)
    child = make(B + [(1, 15, 0.3), (1, 4, 0.3)], version=4)
    p = diff.parent_diff(parent, child)
    assert list(p) == ["parent_version", "jaccard", "added", "removed", "rank_correlation"]
    assert p["parent_version"] == 3
    assert p["added"] == [[0, 9], [1, 4], [1, 15]]
    assert p["removed"] == [[0, 0], [1, 3], [3, 2]]
    assert p["jaccard"] == pytest.approx(4 / 10)
    assert p["rank_correlation"] == pytest.approx(0.5)
    assert json.loads(json.dumps(p)) == p
    same = diff.parent_diff(parent, parent)
    assert same["added"] == same["removed"] == [] and same["jaccard"] == 1.0


def test_render_text() -> None:
    a = make(A, name="alpha", version=1)
    b = make(B, name="beta", version=2, n_layers=6, fingerprint="e" * 64)
    text = diff.render_text(diff.compare(a, b))
    assert "A: alpha v1" in text and "B: beta v2" in text
    assert "jaccard:          0.6667" in text
    assert "only A: 1, only B: 1" in text
    assert "+0.5000" in text and "75.0%" in text and "fingerprints differ" in text
    table = text.split("layer")[-1].strip().splitlines()[1:]
    assert [row.split() for row in table] == [
        ["0", "0", "1", "0"],
        ["1", "1", "0", "0"],
        ["2", "2", "2", "2"],
        ["3", "2", "2", "2"],
    ]
    none = diff.render_text(diff.compare(make([(0, 1, 1.0)]), make([(0, 1, 1.0)])))
    assert "n/a (fewer than 2 shared neurons (1))" in none
    assert "no neurons in either circuit" in diff.render_text(diff.compare(make([]), make([])))


def test_cli_diff_text_json_png_and_bad_uri(tmp_path) -> None:
    from click.testing import CliRunner

    from cna_dist.cli import main

    a = make([(2, 5, 3.0), (3, 7, -2.0), (3, 9, 1.0)], version=1)
    b = make([(2, 5, 2.5), (3, 9, 1.5), (1, 1, 0.5)], version=2)
    (tmp_path / "a.json").write_text(a.to_json())
    (tmp_path / "b.json").write_text(b.to_json())
    args = ["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0 and "0.5000" in text.output, text.output  # Jaccard 2/4
    as_json = CliRunner().invoke(main, [*args, "--json", "--png", str(tmp_path / "d.png")])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.output)
    assert report["jaccard"] == 0.5 and report["shared"] == 2 and report["png"] == str(tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(main, ["diff", str(tmp_path / "a.json"), str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "nope.json" in missing.output
