"""`eval`: generate under the circuit scaled by each multiplier, and under the controls, on the replicas.

Conditions (all greedy, the manifest's eval prompts):
  cna     the circuit's neurons scaled by m
  random  a random circuit of the same size drawn from the same layers (not the circuit, not universal), scaled by m
  caa     CAA at one layer: the MLP output shifted by (m - 1) * (mean_pos - mean_neg) of that output, so that
          m = 1 is no intervention and m = 0 removes the contrastive direction, as for the circuit
m = 1 is bit-identical to no intervention for every method (tested), so those share one baseline generation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cna_dist.circuit import Circuit
from cna_dist.commands.mine import encode_sets
from cna_dist.core import metrics as evaluate
from cna_dist.errors import BadInput
from cna_dist.io import uri as urimod
from cna_dist.io.registry import model_slug
from cna_dist.manifest import Manifest
from cna_dist.model import checkpoint as modelmod
from cna_dist.model import prompts as promptsmod
from cna_dist.model import steer
from cna_dist.report.plots import eval_curves, layer_histogram
from cna_dist.runtime.replica import Replica
from cna_dist.validate import check_writable, validate

BASELINE: dict[str, Any] = {}


class Replicas(Protocol):
    def replica_map(
        self, m: Manifest, method: str, args: Sequence[tuple], *, progress: str | None = None
    ) -> tuple[list[Any], dict[str, Any]]: ...


class LocalReplica:
    """One replica in this process, behind the same interface as the Ray driver's `replica_map`."""

    def __init__(self) -> None:
        self.replica: Replica | None = None

    def replica_map(
        self, m: Manifest, method: str, args: Sequence[tuple], *, progress: str | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        if self.replica is None:
            self.replica = Replica(
                m.model.uri,
                m.model.storage_options,
                m.model.dtype,
                m.model.trust_remote_code,
                m.model.gpus_per_replica,
                m.model.max_memory_per_gpu,
                m.capture.dtype,
                m.capture.token_budget,
                m.capture.max_batch_size,
            )
        fn = getattr(self.replica, method)
        return [fn(*a) for a in args], {"retries": 0, "replica_deaths": 0, "failures": []}


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
    control = evaluate.random_pairs(
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


def chunks(n: int, size: int) -> list[range]:
    return [range(lo, min(lo + size, n)) for lo in range(0, n, size)]


def run_eval(
    m: Manifest,
    circuit: Circuit,
    out: str,
    replicas: Replicas,
    *,
    multipliers: Sequence[float] | None = None,
    caa: bool | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> str:
    """Writes OUT/eval.json and its plots; returns the JSON's URI."""
    spec = m.eval
    multipliers = list(spec.multipliers if multipliers is None else multipliers)
    use_caa = spec.caa if caa is None else caa
    max_new_tokens = max_new_tokens or spec.max_new_tokens
    patterns = spec.refusal_patterns or evaluate.DEFAULT_REFUSAL_PATTERNS
    if m.prompts.eval is None:
        raise BadInput("required key is missing: eval needs held-out prompts", source=m.source, field="prompts.eval")
    check_writable(out, "--out", m.source)  # before hours of generation, not after
    checked = validate(m, check_remote=True)
    fingerprint = modelmod.fingerprint(m.model.uri, m.model.storage_options)
    if circuit.model.fingerprint != fingerprint:
        raise BadInput(
            f"circuit {circuit.name} v{circuit.version} was mined on another model "
            f"({circuit.model.uri}, fingerprint {circuit.model.fingerprint[:12]}) than {m.model.uri} "
            f"({fingerprint[:12]})",
            field="--circuit",
        )
    tokenizer = modelmod.load_tokenizer(
        modelmod.localize(m.model.uri, m.model.storage_options), trust_remote_code=m.model.trust_remote_code
    )
    chat = promptsmod.use_chat_template(tokenizer, m.model.chat_template)
    sets = encode_sets(checked, tokenizer, chat, ["eval", *(["positive", "negative"] if use_caa else [])])

    caa_vectors = None
    caa_layer = None
    if use_caa:
        caa_layer = spec.caa_layer if spec.caa_layer is not None else steer.caa_layer(circuit.pairs())
        if caa_layer >= circuit.model.n_layers:
            raise BadInput(
                f"layer {caa_layer} beyond the model's {circuit.model.n_layers} layers",
                source=m.source,
                field="eval.caa_layer",
            )
        (caa_vectors,), _ = replicas.replica_map(
            m, "caa_vectors", [(sets["positive"].token_ids, sets["negative"].token_ids, [caa_layer])]
        )
    conds, control = conditions(circuit, multipliers, spec.random_seed, caa_vectors)

    prompts = sets["eval"]
    specs: list[dict[str, Any]] = []  # distinct steering specs; conditions sharing one generate once
    spec_of: dict[int, int] = {}  # id(condition) -> its index in specs
    for c in conds:
        if c.spec not in specs:
            specs.append(c.spec)
        spec_of[id(c)] = specs.index(c.spec)
    parts = chunks(len(prompts.token_ids), spec.max_batch_size)
    calls = [(k, part) for k in range(len(specs)) for part in parts]
    texts, report = replicas.replica_map(
        m,
        "generate",
        [([prompts.token_ids[i] for i in part], specs[k], max_new_tokens, spec.max_batch_size) for k, part in calls],
        progress="eval" if progress else None,
    )
    by_spec: dict[int, list[str]] = {}
    for (k, _), t in zip(calls, texts, strict=True):
        by_spec.setdefault(k, []).extend(t)

    results, samples = [], []
    order = {"cna": 0, "random": 1, "caa": 2}
    for c in sorted(conds, key=lambda c: (order[c.method], c.multiplier)):
        generated = by_spec[spec_of[id(c)]]
        results.append({"method": c.method, "multiplier": c.multiplier, **evaluate.score(generated, patterns)})
        if c.method == "caa":
            results[-1]["alpha"] = c.multiplier - 1.0
        for text, completion in list(zip(prompts.prompts.texts, generated, strict=True))[: spec.samples]:
            samples.append({"method": c.method, "multiplier": c.multiplier, "prompt": text, "completion": completion})

    opts = m.output.storage_options
    plots = {"curves": urimod.join(out, "eval.png"), "layers": urimod.join(out, "circuit-layers.png")}
    eval_curves(
        results,
        plots["curves"],
        title=f"{circuit.name} v{circuit.version} on {model_slug(m.model.uri)}",
        storage_options=opts,
    )
    layer_histogram(
        {f"{circuit.name} v{circuit.version}": circuit},
        plots["layers"],
        title="circuit neurons per layer",
        storage_options=opts,
    )
    doc = {
        "schema": "cna-eval/1",
        "circuit": {
            "name": circuit.name,
            "version": circuit.version,
            "neurons": len(circuit.neurons),
            "model": circuit.model.uri,
        },
        "prompts": {"uri": prompts.prompts.uri, "sha256": prompts.prompts.sha256, "count": len(prompts.token_ids)},
        "settings": {
            "multipliers": multipliers,
            "max_new_tokens": max_new_tokens,
            "greedy": True,
            "refusal_patterns": list(patterns),
            "random_seed": spec.random_seed,
            "caa": use_caa,
            "caa_layer": caa_layer,
            "chat_template": chat,
        },
        "random_control": [list(p) for p in control],
        "results": results,
        "samples": samples,
        "plots": plots,
        "run": {
            "generations": len(specs) * len(prompts.token_ids),
            "retries": report["retries"],
            "replica_deaths": report["replica_deaths"],
        },
    }
    uri = urimod.join(out, "eval.json")
    fs, path = urimod.filesystem(uri, opts)
    fs.pipe_file(path, (json.dumps(doc, indent=1) + "\n").encode())
    return uri
