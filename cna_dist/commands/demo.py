"""`cna-dist demo`: plant a refusal circuit in a tiny model, mine it through the real path, show what was found."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cna_dist.demo.planted import save_planted_model
from cna_dist.demo.words import demo_prompts


def write_inputs(out: Path) -> tuple[Path, object]:
    """The planted model, its prompt sets and a manifest that points at them, all under `out`."""
    planted = save_planted_model(out / "model")
    sets = demo_prompts()
    for name, texts in sets.items():
        path = out / "prompts" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    manifest = {
        "name": "refusal-demo",
        "model": {"uri": "./model", "dtype": "float32"},
        "prompts": {name: {"uri": f"./prompts/{name}.jsonl"} for name in sets},
        "select": {"top_k": len(planted.gate), "exclude_layers": [0, 1]},
        "universal": {"top_fraction": 0.005, "threshold": 0.8, "scope": "global"},
        "capture": {"dtype": "float32"},
        "eval": {"multipliers": [0.0, 0.5, 1.0, 2.0], "max_new_tokens": 16, "caa": True, "samples": 2},
        "output": {"store": "./store", "registry": "./circuits"},
    }
    path = out / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path, planted


def run_demo(
    out: Path,
    *,
    mine: Callable[[Path], Any],
    evaluate: Callable[[Path, str], str],
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> str:
    """`mine` and `evaluate` are the CLI's own paths (Ray or in process), so the demo shows what users run."""
    out = out.resolve()
    manifest_path, planted = write_inputs(out)
    echo(f"planted model: {out / 'model'} ({len(planted.gate)} gate neurons, {len(planted.universal)} universal)")
    result = mine(manifest_path)
    c = result.circuit
    found = set(c.pairs())
    gate = set(map(tuple, planted.gate))
    universal = set(map(tuple, planted.universal))
    flagged = universal & set(map(tuple, c.universal))
    echo(c.summary())
    echo(f"gate recall: {len(found & gate)}/{len(gate)} = {len(found & gate) / len(gate):.0%}")
    echo(
        f"planted universal neurons flagged: {len(flagged)}/{len(universal)}; in the circuit: {len(found & universal)}"
    )

    report = json.loads(Path(evaluate(manifest_path, result.published.uri)).read_text())
    rates = {(r["method"], r["multiplier"]): r for r in report["results"]}
    n = report["prompts"]["count"]
    echo(f"steering on {n} held-out harmful prompts (refusal rate, quality):")
    for method in ("cna", "random", "caa"):
        row = [
            f"m={mult:g}: {rates[method, mult]['refusal_rate']:.0%} {rates[method, mult]['quality']:.2f}"
            for mult in report["settings"]["multipliers"]
            if (method, mult) in rates
        ]
        if row:
            echo(f"  {method:>6}  " + "   ".join(row))
    for s in report["samples"]:
        if s["method"] == "cna" and s["multiplier"] in (0.0, 1.0) and s["prompt"] == report["samples"][0]["prompt"]:
            echo(f"  {s['prompt']!r} m={s['multiplier']:g}: {s['completion'].strip()!r}")
    echo(f"plots: {report['plots']['curves']}, {report['plots']['layers']}")
    if result.published.status == "unchanged":
        echo(f"unchanged, v{result.published.version}")
    echo(result.published.uri)
    return result.published.uri
