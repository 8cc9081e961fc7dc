"""Capability under steering on the replicas: lm-eval's tasks on the driver, their log-likelihoods on the replicas.

For each distinct steering condition the harness builds its requests (contexts and choices), `ScoredLM` encodes
them, and the token-id pairs go out in fixed-size chunks over the eval replicas, which score them under the
condition's hooks. The chunks do not depend on how many replicas there are, so the numbers do not either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cna_dist.eval import capability
from cna_dist.runtime.calls import ReplicaCalls
from cna_dist.runtime.replica import ReplicaSpec

CHUNK = 64  # (context, continuation) pairs per replica call

Pairs = list[tuple[list[int], list[int]]]


def scorer(
    calls: ReplicaCalls, spec: ReplicaSpec, condition: dict[str, Any], batch: int, counts: dict[str, int]
) -> Callable[[Pairs], list[tuple[float, bool]]]:
    """The harness's scoring function for one condition: chunks of pairs over the replicas, results in order."""

    def score(pairs: Pairs) -> list[tuple[float, bool]]:
        items = [pairs[lo : lo + CHUNK] for lo in range(0, len(pairs), CHUNK)]

        def call(replica: Any, item: Pairs) -> Any:
            return replica.loglikelihoods.remote(item, condition, batch)

        parts, report = calls.map(spec, call, items)
        counts["requests"] += len(pairs)
        counts["retries"] += report.retries
        counts["replica_deaths"] += report.replica_deaths
        return [tuple(r) for part in parts for r in part]

    return score


def capability_all(
    calls: ReplicaCalls,
    spec: ReplicaSpec,
    tokenizer: Any,
    conditions: list[dict[str, Any]],
    tasks: capability.Tasks,
    batch: int,
) -> tuple[list[list[dict[str, Any]]], dict[str, int]]:
    """Every task's accuracy under every distinct steering condition, and how many pairs were scored."""
    counts = {"requests": 0, "retries": 0, "replica_deaths": 0}
    out = [capability.evaluate(tasks, tokenizer, scorer(calls, spec, cond, batch, counts)) for cond in conditions]
    return out, counts
