"""Capability under steering: which lm-eval tasks to run, checked before any work, and their accuracy per condition.

lm-eval is an optional extra (`pip install 'cna-dist[capability]'`): nothing here imports it until a run asks for
`--capability`, and its absence is bad input (exit 2) naming the option. Only loglikelihood tasks (multiple choice,
such as MMLU) run: they are deterministic, one forward per choice, and need no generation settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cna_dist.errors import BadInput

OPTION = "--capability"
SCORED_TYPES = ("multiple_choice", "loglikelihood")


def parse(value: str) -> list[str]:
    """Comma-separated task names or YAML paths, in order, without repeats."""
    specs = list(dict.fromkeys(s.strip() for s in value.split(",") if s.strip()))
    if not specs:
        raise BadInput(f"no task given in {value!r}; e.g. mmlu or ./tasks/my_task.yaml", field=OPTION)
    return specs


def harness(field: str = OPTION) -> Any:
    """cna_dist.eval.harness, or bad input (naming `field`) when the optional extra is missing."""
    try:
        from cna_dist.eval import harness as module
    except ImportError as exc:
        raise BadInput(
            f"needs lm-evaluation-harness, which is not installed ({exc}); "
            "install the optional extra: pip install 'cna-dist[capability]'",
            field=field,
        ) from None
    return module


@dataclass
class Tasks:
    """The checked task specs and the harness's index that resolves them."""

    specs: list[str]
    manager: Any
    limit: int | None = None


def check(specs: Sequence[str], limit: int | None = None, field: str = OPTION) -> Tasks:
    """Every spec resolves to loglikelihood tasks whose data loads; else bad input naming the spec and `field` (the
    option, or eval.capability for a manifest's tasks)."""
    module = harness(field)
    for spec in specs:
        if spec.lower().endswith((".yaml", ".yml")) and not Path(spec).is_file():
            raise BadInput(f"task file {spec!r} does not exist", field=field)
    manager = module.task_manager(specs)
    for spec in specs:
        try:
            loaded = module.load_tasks(manager, spec)
        except Exception as exc:  # the harness raises KeyError, ValueError, dataset and YAML errors alike
            raise BadInput(f"task {spec!r} cannot be loaded: {exc}", field=field) from None
        top_name(spec, loaded, field)
        for name, task in sorted(loaded["tasks"].items()):
            kind = task.get_config("output_type")
            if kind not in SCORED_TYPES:
                raise BadInput(
                    f"task {spec!r} ({name}) is a {kind} task; only {' and '.join(SCORED_TYPES)} tasks run",
                    field=field,
                )
    return Tasks(list(specs), manager, limit)


def top_name(spec: str, loaded: dict[str, Any], field: str = OPTION) -> str:
    """The row that answers for a spec: its group (mmlu reports mmlu beside its 57 subjects) or its one task."""
    children = {c for kids in loaded["group_map"].values() for c in kids}
    tops = [g for g in loaded["groups"] if g not in children] or list(loaded["tasks"])
    if len(tops) != 1:
        raise BadInput(f"{spec!r} expands to {len(tops)} tasks without a group; name its tasks one by one", field=field)
    return tops[0]


def summary(raw: dict[str, Any]) -> dict[str, Any]:
    """One spec's harness output as {task, acc, acc_stderr, n} (acc_norm too when the task reports it)."""
    name = raw["name"]
    row = raw["results"][name]
    out: dict[str, Any] = {
        "task": name,
        "acc": _num(row.get("acc,none")),
        "acc_stderr": _num(row.get("acc_stderr,none")),
    }
    if "acc_norm,none" in row:
        out["acc_norm"] = _num(row["acc_norm,none"])
        out["acc_norm_stderr"] = _num(row.get("acc_norm_stderr,none"))
    out["n"] = sum(int(raw["n-samples"][leaf]["effective"]) for leaf in raw["leaves"])
    return out


def _num(x: Any) -> float | None:
    """A metric as a float; the harness writes "N/A" for a stderr it could not compute."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def evaluate(
    tasks: Tasks, tokenizer: Any, score: Callable[[list[tuple[list[int], list[int]]]], list[tuple[float, bool]]]
) -> list[dict[str, Any]]:
    """Every task under one scoring function (one steering condition), one summary per spec in order."""
    raw = harness().run_tasks(tasks.manager, tasks.specs, tokenizer, score, tasks.limit)
    return [summary({**raw[spec], "name": top_name(spec, raw[spec]["loaded"])}) for spec in tasks.specs]
