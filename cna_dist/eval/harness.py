"""lm-evaluation-harness on a steered model: the harness's own model API (`TemplateLM`) over a scoring callable.

Imported only when lm-eval is installed (the `capability` extra); `cna_dist.eval.capability` checks that first.
The harness runs on the driver (task files, datasets, prompts, metrics); the model side is `score`, which takes
token-id pairs and returns (log-probability, is-greedy) per pair: the eval command sends them to the replicas, which
score under the condition's steering hooks (cna_dist.model.loglik). Tokenization is TemplateLM's own (trailing
context spaces moved into the continuation, the whole string encoded then split), as the harness's HF model does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager

Score = Callable[[list[tuple[list[int], list[int]]]], list[tuple[float, bool]]]
FEWSHOT_SEED = 1234  # simple_evaluate's default, so a few-shot task draws the same examples in every condition


class ScoredLM(TemplateLM):
    """A causal LM the harness sees as any other; loglikelihood only (multiple-choice tasks)."""

    def __init__(self, tokenizer: Any, score: Score):
        super().__init__()
        self.tokenizer = tokenizer
        self.score = score

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # as the harness's HFLM: BOS when the tokenizer has one
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False)

    def loglikelihood(self, requests: list, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests: list, **kwargs: Any) -> list[tuple[float, bool]]:
        return self.score([(list(context), list(continuation)) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("cna-dist runs loglikelihood (multiple-choice) tasks only")

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("cna-dist runs loglikelihood (multiple-choice) tasks only")


def task_manager(specs: Sequence[str]) -> TaskManager:
    """The harness's task index; its built-in tasks (15k YAML files, ~10 s to index) only when a spec names one."""
    from pathlib import Path

    named = any(not Path(spec).is_file() for spec in specs)
    return TaskManager(include_defaults=named)


def load_tasks(manager: TaskManager, spec: str) -> dict[str, Any]:
    """The harness's TaskDict for one spec (name or YAML path), zero-shot unless the task says otherwise."""
    loaded = manager.load([spec])
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def run_tasks(
    manager: TaskManager, specs: Sequence[str], tokenizer: Any, score: Score, limit: int | None
) -> dict[str, dict[str, Any]]:
    """Each spec's harness results under `score` (lm-eval's `evaluate`, not `simple_evaluate`: the latter also
    collects the machine's environment, about a second of `pip list` per condition)."""
    lm = ScoredLM(tokenizer, score)
    out = {}
    for spec in specs:
        loaded = load_tasks(manager, spec)
        result = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)
        out[spec] = {
            "results": result["results"],
            "n-samples": result["n-samples"],
            "leaves": sorted(loaded["tasks"]),
            "loaded": {
                "groups": list(loaded["groups"]),
                "group_map": loaded["group_map"],
                "tasks": list(loaded["tasks"]),
            },
        }
    return out
