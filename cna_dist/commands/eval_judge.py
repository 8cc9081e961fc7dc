"""The judge on its own replicas: every condition's generations scored with the StrongREJECT-style rubric.

The driver renders each (prompt, generation) into the rubric with the judge's chat template; the judge's replicas
(the executor swaps the generating model's pool for the judge's) answer greedily; the answers are parsed and
summarized per condition in cna_dist.eval.judge. A judge answer that does not parse is reported per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cna_dist.eval import judge as judgemod
from cna_dist.manifest import Judge
from cna_dist.model import checkpoint
from cna_dist.prompts import sets as promptsmod
from cna_dist.runtime.calls import ReplicaCalls
from cna_dist.runtime.replica import ReplicaSpec

FIELD = "eval.judge.uri"


@dataclass
class JudgeInputs:
    """The judge's replica spec, its tokenizer and whether its chat template renders the rubric."""

    spec: ReplicaSpec
    tokenizer: Any
    chat: bool


def prepare(j: Judge) -> JudgeInputs:
    """The judge checkpoint is checked (config, weights, tokenizer) and its tokenizer loaded before any generation."""
    tokenizer = checkpoint.judge_tokenizer(j.uri, j.storage_options, j.trust_remote_code, field=FIELD)
    spec = ReplicaSpec(
        model_uri=j.uri,
        storage_options=dict(j.storage_options),
        dtype=j.dtype,
        trust_remote_code=j.trust_remote_code,
        gpus=j.gpus_per_replica,
        max_batch_size=j.max_batch_size,
    ).for_generation()
    return JudgeInputs(spec, tokenizer, promptsmod.use_chat_template(tokenizer, None))


def rubric_ids(inputs: JudgeInputs, prompts: list[str], texts: list[str]) -> list[list[int]]:
    """The rubric for each (prompt, generation), rendered and encoded for the judge."""
    rendered = [
        promptsmod.render(inputs.tokenizer, judgemod.rubric(p, t), inputs.chat)
        for p, t in zip(prompts, texts, strict=True)
    ]
    return [promptsmod.encode(inputs.tokenizer, r, inputs.chat) for r in rendered]


def judge_all(
    calls: ReplicaCalls, inputs: JudgeInputs, j: Judge, prompts: list[str], texts: list[list[str]], keep: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per distinct steering condition, the judge's summary of its generations, and what the judging cost."""
    items = [(k, lo) for k in range(len(texts)) for lo in range(0, len(prompts), j.max_batch_size)]
    encoded = [rubric_ids(inputs, prompts, generated) for generated in texts]

    def call(replica: Any, item: tuple[int, int]) -> Any:
        k, lo = item
        return replica.generate.remote(encoded[k][lo : lo + j.max_batch_size], {}, j.max_new_tokens, j.max_batch_size)

    outputs, report = calls.map(inputs.spec, call, items, progress=None)
    by_spec: list[list[str]] = [[] for _ in texts]
    for (k, _), out in zip(items, outputs, strict=True):
        by_spec[k].extend(out)
    summaries = [judgemod.summarize(answers, prompts, keep) for answers in by_spec]
    counts = {"judgements": sum(map(len, by_spec)), "retries": report.retries, "replica_deaths": report.replica_deaths}
    return summaries, counts
