"""The eval report: one plot panel per measure (refusal, quality, capability, judge, refusal by category) and the
table `cna-dist inspect EVAL.json` prints."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
from click.testing import CliRunner

from cna_dist.cli import main
from cna_dist.eval import plots
from cna_dist.eval.table import table


def row(method: str, m: float, refusal: float, acc: float | None, judge: float | None, cats: dict | None) -> dict:
    out = {"method": method, "multiplier": m, "refusal_rate": refusal, "quality": 0.9, "n": 4}
    if acc is not None:
        out["capability"] = [{"task": "tiny_mc", "acc": acc, "acc_stderr": 0.1, "n": 10}]
    if judge is not None:
        out["judge"] = {"mean": judge, "std": 0.25, "n": 4, "parsed": 3, "errors": [{"index": 2}]}
    if cats is not None:
        out["refusal_by_category"] = {k: {"refusal_rate": v, "n": 2} for k, v in cats.items()}
    return out


DOC = {
    "schema": "cna-eval/1",
    "circuit": {"name": "refusal-demo", "version": 3, "neurons": 12, "model": "/m"},
    "results": [
        row("cna", 0.0, 0.25, 0.6, 0.5, {"Weapons": 0.5, "Other": 0.0}),
        row("cna", 1.0, 1.0, 0.7, 0.0, {"Weapons": 1.0, "Other": 1.0}),
        row("caa", 0.0, 0.5, None, None, None),
    ],
}


def test_table_lists_every_measure_per_condition() -> None:
    assert table(DOC).splitlines() == [
        "eval of refusal-demo v3 (12 neurons) on /m",
        "method  m  refusal  quality      tiny_mc   judge (parsed)",
        "   cna  0      25%    0.900  0.600±0.100  0.50±0.25 (3/4)",
        "   cna  1     100%    0.900  0.700±0.100  0.00±0.25 (3/4)",
        "   caa  0      50%    0.900",
        "",
        "refusal by category",
        "category  cna 0  cna 1",
        " Weapons    50%   100%",
        "   Other     0%   100%",
    ]


def test_plot_has_one_panel_per_measure(tmp_path: Path) -> None:
    full = plots.eval_curves(DOC["results"], tmp_path / "full.png")
    assert matplotlib.image.imread(full).shape[:2] == (round(4.2 * plots.DPI), round(5 * 5.5 * plots.DPI))
    plain = [
        {k: v for k, v in r.items() if k in ("method", "multiplier", "refusal_rate", "quality", "n")}
        for r in DOC["results"]
    ]
    two = plots.eval_curves(plain, tmp_path / "two.png")
    assert matplotlib.image.imread(two).shape[:2] == (round(4.2 * plots.DPI), 11 * plots.DPI)


def test_inspect_prints_the_eval_table(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(DOC))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == table(DOC)
    as_json = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert json.loads(as_json.output)["results"] == DOC["results"]
