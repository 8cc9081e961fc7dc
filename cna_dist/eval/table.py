"""The table `cna-dist inspect EVAL.json` prints: every condition's refusal, quality, capability and judge score,
then refusal per category when the eval set has categories. Plain text from eval.json, nothing recomputed."""

from __future__ import annotations

import json
from typing import Any

from cna_dist.store.objects import open_objects, split_uri

SCHEMA = "cna-eval/1"


def read_eval(uri: str) -> dict[str, Any] | None:
    """eval.json's document, or None when `uri` is not one (a circuit file, a missing or unreadable object)."""
    folder, name = split_uri(uri)
    try:
        doc = open_objects(folder).get_json(name)
    except Exception:  # noqa: BLE001 - not an eval file: the caller reads it as a circuit and reports that
        return None
    return doc if isinstance(doc, dict) and doc.get("schema") == SCHEMA else None


def _pm(value: float | None, spread: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + ("" if spread is None else f"±{spread:.{digits}f}")


def _row(r: dict[str, Any], tasks: list[str], judged: bool) -> list[str]:
    cells = [str(r["method"]), f"{r['multiplier']:g}", f"{r['refusal_rate']:.0%}", f"{r['quality']:.3f}"]
    by_task = {c["task"]: c for c in r.get("capability") or []}
    cells += [_pm(by_task[t]["acc"], by_task[t]["acc_stderr"]) if t in by_task else "" for t in tasks]
    if judged:
        j = r.get("judge") or {}
        cells.append(f"{_pm(j.get('mean'), j.get('std'), 2)} ({j.get('parsed', 0)}/{j.get('n', 0)})" if j else "")
    return cells


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *rows]]


def table(doc: dict[str, Any]) -> str:
    """One line per (method, multiplier); capability columns per task (accuracy ± standard error), the judge's
    mean ± spread with how many answers parsed; then refusal per category, one column per condition."""
    results = doc["results"]
    tasks = list(dict.fromkeys(c["task"] for r in results for c in r.get("capability") or []))
    judged = any(r.get("judge") for r in results)
    header = ["method", "m", "refusal", "quality", *tasks, *(["judge (parsed)"] if judged else [])]
    c = doc.get("circuit", {})
    lines = [f"eval of {c.get('name')} v{c.get('version')} ({c.get('neurons')} neurons) on {c.get('model')}"]
    lines += _grid(header, [_row(r, tasks, judged) for r in results])
    categorized = [r for r in results if r.get("refusal_by_category")]
    if categorized:
        names = list(dict.fromkeys(k for r in categorized for k in r["refusal_by_category"]))
        cols = [f"{r['method']} {r['multiplier']:g}" for r in categorized]
        rows = [
            [name, *(f"{r['refusal_by_category'][name]['refusal_rate']:.0%}" for r in categorized)] for name in names
        ]
        lines += ["", "refusal by category", *_grid(["category", *cols], rows)]
    return "\n".join(lines)


def render_eval(uri: str, as_json: bool) -> str | None:
    """What inspect prints for an eval.json (the table, or the results as JSON); None when `uri` is not one."""
    doc = read_eval(uri)
    if doc is None:
        return None
    if as_json:
        return json.dumps({"eval": uri, "circuit": doc.get("circuit"), "results": doc["results"]}, indent=1)
    return table(doc)
