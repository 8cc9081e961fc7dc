"""`cna-dist demo`: plant a refusal circuit in a tiny model, mine it through the real path, show what was found."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cna_dist import evaluate, steer
from cna_dist import manifest as manifestmod
from cna_dist import model as modelmod
from cna_dist import prompts as promptsmod
from cna_dist.tiny import demo_prompts, save_planted_model

N_SHOWN = 4


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
        "output": {"store": "./store", "registry": "./circuits"},
    }
    path = out / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path, planted


def run_demo(out: Path, *, mine: Callable[[Path], Any], progress: bool = True,
             echo: Callable[[str], None] = print) -> str:
    """`mine` is the CLI's own mine path (Ray or in process), so the demo shows exactly what users run."""
    out = out.resolve()
    manifest_path, planted = write_inputs(out)
    echo(f"planted model: {out / 'model'} ({len(planted.gate)} gate neurons, {len(planted.universal)} universal)")
    manifest = manifestmod.load(manifest_path)
    result = mine(manifest_path)
    c = result.circuit
    found = set(c.pairs())
    gate = set(map(tuple, planted.gate))
    universal = set(map(tuple, planted.universal))
    flagged = universal & set(map(tuple, c.universal))
    echo(c.summary())
    echo(f"gate recall: {len(found & gate)}/{len(gate)} = {len(found & gate) / len(gate):.0%}")
    echo(f"planted universal neurons flagged: {len(flagged)}/{len(universal)}; "
         f"in the circuit: {len(found & universal)}")

    model, tokenizer = modelmod.load(out / "model", dtype="float32")
    chat = promptsmod.use_chat_template(tokenizer, None)
    texts = promptsmod.load("eval", manifest.prompts.eval).texts[:N_SHOWN]  # type: ignore[arg-type]
    ids = [promptsmod.encode(tokenizer, promptsmod.render(tokenizer, t, chat), chat) for t in texts]
    before = evaluate.generate(model, tokenizer, ids, max_new_tokens=16)
    with steer.steered(model, c.pairs(), 0.0):
        after = evaluate.generate(model, tokenizer, ids, max_new_tokens=16)
    refused_before = sum(evaluate.is_refusal(t) for t in before)
    refused_after = sum(evaluate.is_refusal(t) for t in after)
    echo(f"refusals on {len(texts)} held-out harmful prompts: {refused_before}/{len(texts)} before, "
         f"{refused_after}/{len(texts)} with the circuit ablated (m=0)")
    for prompt, b, a in zip(texts, before, after, strict=True):
        echo(f"  {prompt!r}\n    m=1: {b.strip()!r}\n    m=0: {a.strip()!r}")
    if result.published.status == "unchanged":
        echo(f"unchanged, v{result.published.version}")
    echo(result.published.uri)
    return result.published.uri
