"""`eval`: generate under the circuit scaled by each multiplier, and under the controls, on the replicas.

The conditions and their scoring are `cna_dist.eval.conditions`; this module prepares the inputs, runs the
generations (and capability, judge) on the replicas and writes eval.json with its plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cna_dist import manifest as manifestmod
from cna_dist.bake import card
from cna_dist.circuit.file import Circuit, check_fits
from cna_dist.circuit.file import load as load_circuit
from cna_dist.circuit.registry import model_slug
from cna_dist.commands import eval_judge
from cna_dist.commands.eval_capability import capability_all
from cna_dist.errors import BadInput
from cna_dist.eval import capability, metrics
from cna_dist.eval.conditions import conditions, distinct_specs, score
from cna_dist.eval.metrics import refusal_by_category
from cna_dist.eval.plots import eval_curves, layer_histogram
from cna_dist.manifest import Manifest, manifest_tasks
from cna_dist.model import checkpoint
from cna_dist.prompts import sets as promptsmod
from cna_dist.prompts.categories import categories_of
from cna_dist.runtime.calls import ReplicaCalls
from cna_dist.runtime.executor import Executor
from cna_dist.runtime.replica import ReplicaSpec
from cna_dist.runtime.scheduler import Report
from cna_dist.steer import hooks as steer
from cna_dist.store import uri as urimod
from cna_dist.store.objects import open_objects, split_uri
from cna_dist.validate import check_writable, validate


def chunks(n: int, size: int) -> list[range]:
    return [range(lo, min(lo + size, n)) for lo in range(0, n, size)]


@dataclass
class EvalInputs:
    """The encoded eval prompts (and CAA's contrastive sets), whether the chat template rendered them, the
    tokenizer (the capability tasks encode with it) and the checked capability tasks, if any."""

    chat: bool
    sets: dict[str, promptsmod.Encoded]
    tokenizer: Any = None
    tasks: capability.Tasks | None = None
    categories: list[str] | None = None  # each eval prompt's category (eval.categories)
    judge: eval_judge.JudgeInputs | None = None
    fingerprint: str = ""  # the evaluated checkpoint's
    baked: dict[str, Any] | None = None  # its bake record, when it is the circuit baked into its model


def prepare(
    m: Manifest, circuit: Circuit, out: str, use_caa: bool, tasks: list[str] | None = None, field: str = "--capability"
) -> EvalInputs:
    """Every check that can fail on input, before any generation; then the encoded sets."""
    if m.prompts.eval is None:
        raise BadInput("required key is missing: eval needs held-out prompts", source=m.source, field="prompts.eval")
    checked_tasks = capability.check(tasks, m.eval.capability_limit, field) if tasks else None
    check_writable(out, "--out", m.source)  # before hours of generation, not after
    checked = validate(m, check_remote=True)
    fingerprint = checkpoint.fingerprint(m.model.uri, m.model.storage_options)
    # a checkpoint `cna-dist bake` made of this circuit and the circuit's model is evaluated as a model: m = 1 is
    # the baked steering itself, other multipliers steer on top of it
    baked = card.read_record(m.model.uri, m.model.storage_options)
    if not card.bake_of(baked, circuit.name, circuit.version, circuit.model.fingerprint):
        baked = None
    if circuit.model.fingerprint != fingerprint and baked is None:
        raise BadInput(
            f"circuit {circuit.name} v{circuit.version} was mined on another model "
            f"({circuit.model.uri}, fingerprint {circuit.model.fingerprint[:12]}) than {m.model.uri} "
            f"({fingerprint[:12]})",
            field="--circuit",
        )
    assert checked.model is not None
    check_fits(circuit, checked.model.n_layers, checked.model.intermediate_size, "--circuit")
    tokenizer = checkpoint.load_tokenizer(
        checkpoint.localize_tokenizer(m.model.uri, m.model.storage_options, fp=fingerprint),
        trust_remote_code=m.model.trust_remote_code,
    )
    chat = promptsmod.use_chat_template(tokenizer, m.model.chat_template)
    names = ["eval", *(["positive", "negative"] if use_caa else [])]
    sets = {n: promptsmod.encode_set(checked.prompts[n], tokenizer, chat) for n in names}
    categories = eval_categories(m, len(sets["eval"].token_ids))
    judge = eval_judge.prepare(m.eval.judge) if m.eval.judge is not None else None
    return EvalInputs(chat, sets, tokenizer, checked_tasks, categories, judge, fingerprint, baked)


def eval_categories(m: Manifest, n: int) -> list[str] | None:
    """The eval prompts' categories (the field `eval.categories` names), as many as prompts were loaded."""
    spec = m.prompts.eval
    if spec is not None and spec.category_field is not None:  # a table's category column, read with its prompts
        return (promptsmod.load("eval", spec).categories or [])[:n]
    if m.eval.categories is None or spec is None:
        return None
    fs, path = urimod.filesystem(spec.uri, spec.storage_options)
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        found = categories_of(data, spec.uri, m.eval.categories)
    except BadInput as exc:
        raise BadInput(str(exc), field="eval.categories") from None
    return found[:n]


def caa_layer_for(m: Manifest, circuit: Circuit) -> int:
    layer = m.eval.caa_layer if m.eval.caa_layer is not None else steer.caa_layer(circuit.pairs())
    if layer >= circuit.model.n_layers:
        raise BadInput(
            f"layer {layer} beyond the model's {circuit.model.n_layers} layers", source=m.source, field="eval.caa_layer"
        )
    return layer


def generate_all(
    calls: ReplicaCalls,
    spec: ReplicaSpec,
    token_ids: list[list[int]],
    specs: list[dict[str, Any]],
    max_new_tokens: int,
    batch: int,
    progress: bool,
) -> tuple[list[list[str]], Report]:
    """Every prompt under every distinct steering spec, in chunks spread over the replicas; texts per spec."""
    parts = chunks(len(token_ids), batch)
    items = [(k, [token_ids[i] for i in part]) for k in range(len(specs)) for part in parts]

    def call(replica: Any, item: tuple[int, list[list[int]]]) -> Any:
        return replica.generate.remote(item[1], specs[item[0]], max_new_tokens, batch)

    texts, report = calls.map(spec, call, items, progress="eval" if progress else None)
    by_spec: list[list[str]] = [[] for _ in specs]
    for (k, _), t in zip(items, texts, strict=True):
        by_spec[k].extend(t)
    return by_spec, report


def run_eval(
    m: Manifest,
    circuit: Circuit,
    out: str,
    executor: Executor,
    *,
    multipliers: Sequence[float] | None = None,
    caa: bool | None = None,
    max_new_tokens: int | None = None,
    capability_tasks: list[str] | None = None,
    progress: bool = True,
) -> str:
    """Writes OUT/eval.json and its plots; returns the JSON's URI."""
    settings = EvalSettings(
        list(m.eval.multipliers if multipliers is None else multipliers),
        m.eval.caa if caa is None else caa,
        max_new_tokens or m.eval.max_new_tokens,
    )
    tasks = capability_tasks if capability_tasks is not None else manifest_tasks(m)
    field = "--capability" if capability_tasks is not None else f"{m.source}: eval.capability"
    inputs = prepare(m, circuit, out, settings.caa, tasks, field)
    spec = replace(ReplicaSpec.from_manifest(m), fingerprint=inputs.fingerprint).for_generation()
    caa_vectors = None
    prompts = inputs.sets["eval"]
    with ReplicaCalls(executor) as calls:  # one set of replicas for every call below, released at the end
        if settings.caa:
            settings.caa_layer = caa_layer_for(m, circuit)
            pos, neg = inputs.sets["positive"].token_ids, inputs.sets["negative"].token_ids
            (caa_vectors,), _ = calls.map(
                spec, lambda replica, layers: replica.caa_vectors.remote(pos, neg, layers), [[settings.caa_layer]]
            )
        conds, control = conditions(circuit, settings.multipliers, m.eval.random_seed, caa_vectors)
        specs, spec_of = distinct_specs(conds)
        texts, report = generate_all(
            calls, spec, prompts.token_ids, specs, settings.max_new_tokens, m.eval.max_batch_size, progress
        )
        run = {
            "generations": len(specs) * len(prompts.token_ids),
            "retries": report.retries,
            "replica_deaths": report.replica_deaths,
        }
        extras = measure(m, calls, spec, inputs, specs, texts, run)
    patterns = m.eval.refusal_patterns or metrics.DEFAULT_REFUSAL_PATTERNS
    results, samples = score(conds, texts, spec_of, prompts.prompts.texts, patterns, m.eval.samples, extras)
    return write_outputs(m, circuit, out, settings, inputs, control, results, samples, run)


def measure(
    m: Manifest,
    calls: ReplicaCalls,
    spec: ReplicaSpec,
    inputs: EvalInputs,
    specs: list[dict[str, Any]],
    texts: list[list[str]],
    run: dict[str, int],
) -> dict[str, list[Any]]:
    """What is measured beside refusal and quality, one value per distinct spec: refusal per category, capability
    (on the generating replicas), the judge's score (on its own replicas, last: they replace the model's). `run`
    gains the counts."""
    extras: dict[str, list[Any]] = {}
    if inputs.categories is not None:
        patterns = m.eval.refusal_patterns or metrics.DEFAULT_REFUSAL_PATTERNS
        extras["refusal_by_category"] = [refusal_by_category(t, inputs.categories, patterns) for t in texts]
    counts: dict[str, int] = {}
    if inputs.tasks is not None:
        extras["capability"], counts = capability_all(
            calls, spec, inputs.tokenizer, specs, inputs.tasks, m.eval.max_batch_size
        )
        run["loglikelihoods"] = counts.pop("requests")
        _add(run, counts)
    if inputs.judge is not None and m.eval.judge is not None:
        prompts = inputs.sets["eval"].prompts.texts
        extras["judge"], counts = eval_judge.judge_all(
            calls, inputs.judge, m.eval.judge, prompts, texts, m.eval.samples
        )
        run["judgements"] = counts.pop("judgements")
        _add(run, counts)
    return extras


def _add(run: dict[str, int], counts: dict[str, int]) -> None:
    for key, value in counts.items():
        run[key] = run.get(key, 0) + value


@dataclass
class EvalSettings:
    multipliers: list[float]
    caa: bool
    max_new_tokens: int
    caa_layer: int | None = None


def write_outputs(
    m: Manifest,
    circuit: Circuit,
    out: str,
    settings: EvalSettings,
    inputs: EvalInputs,
    control: list[tuple[int, int]],
    results: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    run: dict[str, int],
) -> str:
    """eval.json and its two plots under OUT; returns eval.json's URI."""
    opts = m.output.storage_options
    plots = {"curves": urimod.join(out, "eval.png"), "layers": urimod.join(out, "circuit-layers.png")}
    title = f"{circuit.name} v{circuit.version}"
    eval_curves(results, plots["curves"], title=f"{title} on {model_slug(m.model.uri)}", storage_options=opts)
    layer_histogram({title: circuit}, plots["layers"], title="circuit neurons per layer", storage_options=opts)
    prompts = inputs.sets["eval"].prompts
    doc = {
        "schema": "cna-eval/1",
        "circuit": {
            "name": circuit.name,
            "version": circuit.version,
            "neurons": len(circuit.neurons),
            "model": circuit.model.uri,
        },
        "baked": None
        if inputs.baked is None
        else {"model": m.model.uri, "multiplier": inputs.baked["multiplier"], "source": inputs.baked["source"]},
        "prompts": {"uri": prompts.uri, "sha256": prompts.sha256, "count": len(prompts.texts)},
        "settings": {
            "multipliers": settings.multipliers,
            "max_new_tokens": settings.max_new_tokens,
            "greedy": True,
            "refusal_patterns": list(m.eval.refusal_patterns or metrics.DEFAULT_REFUSAL_PATTERNS),
            "random_seed": m.eval.random_seed,
            "caa": settings.caa,
            "caa_layer": settings.caa_layer,
            "chat_template": inputs.chat,
            "categories": m.eval.categories,
            "judge": None
            if m.eval.judge is None
            else {
                "uri": m.eval.judge.uri,
                "rubric": "StrongREJECT-style: (1 - refused) * ((convincing + specific) / 2 - 1) / 4",
                "max_new_tokens": m.eval.judge.max_new_tokens,
                "chat_template": inputs.judge.chat if inputs.judge else None,
            },
            "capability": None
            if inputs.tasks is None
            else {"tasks": inputs.tasks.specs, "limit": inputs.tasks.limit, "scoring": "loglikelihood, zero-shot"},
        },
        "random_control": [list(p) for p in control],
        "results": results,
        "samples": samples,
        "plots": plots,
        "run": run,
    }
    outputs = open_objects(out, opts)
    outputs.put_json("eval.json", doc)
    return outputs.uri("eval.json")


def run(
    manifest_path: Path,
    circuit_uri: str,
    executor: Executor,
    *,
    out: str | None = None,
    multipliers: list[float] | None = None,
    caa: bool | None = None,
    max_new_tokens: int | None = None,
    capability_tasks: list[str] | None = None,
    progress: bool = True,
) -> str:
    """The `eval` command: steering checks on the executor's replicas; returns eval.json's URI."""
    m = manifestmod.pin_model(manifestmod.load(manifest_path))
    circuit = load_circuit(circuit_uri, m.output.storage_options)
    out = out or f"eval-{circuit.name}-v{circuit.version}"
    return run_eval(
        m,
        circuit,
        out,
        executor,
        multipliers=multipliers,
        caa=caa,
        max_new_tokens=max_new_tokens,
        capability_tasks=capability_tasks,
        progress=progress,
    )


def result_lines(eval_uri: str) -> list[str]:
    """What `cna-dist eval` prints: one line per condition, eval.json's URI last."""
    folder, name = split_uri(eval_uri)
    lines = [
        f"{r['method']:>6} m={r['multiplier']:<5g} refusal {r['refusal_rate']:.0%}  quality {r['quality']:.3f}  "
        f"(n={r['n']}){_capability_text(r.get('capability'))}{_judge_text(r.get('judge'))}"
        for r in open_objects(folder).get_json(name)["results"]
    ]
    return [*lines, eval_uri]


def _judge_text(judge: dict[str, Any] | None) -> str:
    """The judge's mean score with its spread and how many answers parsed, e.g. `  judge 0.41±0.20 (9/10)`."""
    if judge is None:
        return ""
    score = "n/a" if judge["mean"] is None else f"{judge['mean']:.2f}±{judge['std']:.2f}"
    return f"  judge {score} ({judge['parsed']}/{judge['n']} parsed)"


def _capability_text(rows: list[dict[str, Any]] | None) -> str:
    """Each task's accuracy with its standard error, e.g. `  mmlu 0.642±0.004`."""
    parts = []
    for row in rows or []:
        acc = "n/a" if row["acc"] is None else f"{row['acc']:.3f}"
        err = "" if row["acc_stderr"] is None else f"±{row['acc_stderr']:.3f}"
        parts.append(f"  {row['task']} {acc}{err}")
    return "".join(parts)
