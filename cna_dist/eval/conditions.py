"""The conditions eval generates under, and their scores: plain data and metrics, no model and no replicas.

Conditions (all greedy, the manifest's eval prompts):
  cna     the circuit's neurons scaled by m
  random  a random circuit of the same size drawn from the same layers (not the circuit, not universal), scaled by m
  caa     CAA at one layer: the MLP output shifted by (m - 1) * (mean_pos - mean_neg) of that output, so that
          m = 1 is no intervention and m = 0 removes the contrastive direction, as for the circuit
m = 1 is bit-identical to no intervention for every method (tested), so those share one baseline generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cna_dist.circuit.file import Circuit
from cna_dist.eval import metrics

BASELINE: dict[str, Any] = {}


@dataclass
class Condition:
    method: str
    multiplier: float
    spec: dict[str, Any]


def conditions(
    circuit: Circuit,
    multipliers: Sequence[float],
    seed: int,
    caa: dict[int, list] | None,
) -> tuple[list[Condition], list[tuple[int, int]]]:
    """Every (method, multiplier) with its steering spec; m = 1 is the shared baseline."""
    pairs = [list(p) for p in circuit.pairs()]
    control = metrics.random_pairs(
        circuit.pairs(), circuit.model.intermediate_size, seed, avoid=[tuple(u) for u in circuit.universal]
    )
    control_pairs = [list(p) for p in control]
    out = []
    for m in multipliers:
        same = m == 1.0
        out.append(Condition("cna", m, BASELINE if same else {"pairs": pairs, "multiplier": m}))
        out.append(Condition("random", m, BASELINE if same else {"pairs": control_pairs, "multiplier": m}))
        if caa is not None:
            out.append(Condition("caa", m, BASELINE if same else {"caa": caa, "alpha": m - 1.0}))
    return out, control


def distinct_specs(conds: list[Condition]) -> tuple[list[dict[str, Any]], list[int]]:
    """The distinct steering specs, and each condition's index into them: conditions sharing one generate once."""
    specs: list[dict[str, Any]] = []
    spec_of = []
    for c in conds:
        if c.spec not in specs:
            specs.append(c.spec)
        spec_of.append(specs.index(c.spec))
    return specs, spec_of


def score(
    conds: list[Condition],
    texts: list[list[str]],
    spec_of: list[int],
    prompts: list[str],
    patterns: Sequence[str],
    n_samples: int,
    extras: dict[str, list[Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Refusal and quality per condition, in method then multiplier order, plus the first `n_samples` completions
    of each; `extras` (name -> one value per distinct spec: capability, judge) join each condition's row."""
    results, samples = [], []
    order = {"cna": 0, "random": 1, "caa": 2}
    for i in sorted(range(len(conds)), key=lambda i: (order[conds[i].method], conds[i].multiplier)):
        c, generated = conds[i], texts[spec_of[i]]
        results.append({"method": c.method, "multiplier": c.multiplier, **metrics.score(generated, patterns)})
        results[-1].update({name: values[spec_of[i]] for name, values in (extras or {}).items()})
        if c.method == "caa":
            results[-1]["alpha"] = c.multiplier - 1.0
        for text, completion in list(zip(prompts, generated, strict=True))[:n_samples]:
            samples.append({"method": c.method, "multiplier": c.multiplier, "prompt": text, "completion": completion})
    return results, samples
