"""`mine`: prepare -> capture what the store lacks -> streamed reduce -> circuit -> registry, on any executor."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cna_dist import manifest as manifestmod
from cna_dist.circuit import file as circuitmod
from cna_dist.circuit import registry
from cna_dist.manifest import Manifest
from cna_dist.model import checkpoint
from cna_dist.prompts import sets as promptsmod
from cna_dist.prompts.packed import PackedIds
from cna_dist.reduce import streamed
from cna_dist.reduce.cna import Reduction
from cna_dist.runtime.calls import CaptureReport, ReplicaCalls, capture_shards
from cna_dist.runtime.executor import Executor
from cna_dist.runtime.replica import ReplicaSpec
from cna_dist.store import uri as urimod
from cna_dist.store.activations import ActivationStore, Run, RunMeta, run_id
from cna_dist.validate import Checked, validate


@dataclass
class Prepared:
    """What the driver knows before any capture: the model's identity, the encoded sets, the run's metadata."""

    info: checkpoint.ModelInfo
    fingerprint: str
    chat: bool
    sets: dict[str, promptsmod.Encoded]
    meta: RunMeta

    def token_ids(self) -> dict[str, list[int]]:
        return {h: ids for e in self.sets.values() for h, ids in zip(e.row_hashes, e.token_ids, strict=True)}

    def row_hashes(self) -> list[str]:
        """Every set's row hashes, set after set (a prompt in two sets appears twice: plans keep the first)."""
        return [h for e in self.sets.values() for h in e.row_hashes]

    def packed_ids(self) -> PackedIds:
        """Every set's token ids packed in `row_hashes` order: what the plans' positions index."""
        return PackedIds.from_lists([ids for e in self.sets.values() for ids in e.token_ids])


@dataclass
class MineSummary:
    """The run summary (`mine --summary`, the nightly report reads it); `to_dict` is its JSON."""

    run: str
    store: str
    circuit: str
    status: str
    version: int
    timings_s: dict[str, float]
    shards_captured: int
    shards_reused: int
    prompts_captured: int
    capture: CaptureReport = field(default_factory=CaptureReport)
    shard_advice: str | None = None  # why a new run's shards have the size they have, when the engine chose it
    driver_peak_mib: float | None = None  # this process's peak RSS (Linux VmHWM): the driver's, with Ray replicas

    @property
    def prompts_per_s(self) -> float | None:
        seconds = self.timings_s.get("capture", 0.0)
        return self.prompts_captured / seconds if seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("capture"), prompts_per_s=self.prompts_per_s)
        return out


@dataclass
class MineResult:
    circuit: circuitmod.Circuit
    published: registry.Published
    summary: MineSummary


def selection_params(m: Manifest, chat: bool, k: int) -> dict[str, Any]:
    """Everything that shaped the selection; equal params + model + prompts mean an equal circuit."""
    params: dict[str, Any] = {
        "k": k,
        "top_k": m.select.top_k,
        "top_fraction": m.select.top_fraction,
        "exclude_layers": m.select.exclude_layers,
        "capture_dtype": m.capture.dtype,
        "model_dtype": m.model.dtype,
        "chat_template": chat,
    }
    if m.prompts.diverse is not None:
        params["universal"] = m.universal.model_dump()
    return params


def prepare(m: Manifest, checked: Checked) -> Prepared:
    """Render and tokenize every set, fingerprint the model, and describe the run their rows belong to.

    The tokenizer and the encoding are the last checks on the input (a tokenizer with nothing to pad with, a prompt
    longer than the model takes): they come before the fingerprint of a local checkpoint, whose file hashes are
    remembered in the cache, so bad input leaves the cache as it was. A remote checkpoint's tokenizer can only be
    read from its copy in the node cache, keyed by the fingerprint (an exact copy of the input's own files).
    """
    assert checked.model is not None
    info = checked.model
    local = urimod.is_local(m.model.uri)
    fingerprint = None if local else checkpoint.fingerprint(m.model.uri, m.model.storage_options)
    # config and tokenizer files only: the driver never reads a weight file (a local one is read in place)
    local_model = checkpoint.localize_tokenizer(m.model.uri, m.model.storage_options, fp=fingerprint)
    tokenizer = checkpoint.load_tokenizer(local_model, trust_remote_code=m.model.trust_remote_code)
    chat = promptsmod.use_chat_template(tokenizer, m.model.chat_template)
    sets = {
        name: promptsmod.encode_set(checked.prompts[name], tokenizer, chat, m.capture.max_length)
        for name in m.prompt_sets()
    }
    if fingerprint is None:
        fingerprint = checkpoint.fingerprint(m.model.uri, m.model.storage_options)
    meta = RunMeta(
        fingerprint=fingerprint,
        model_uri=m.model.uri,
        n_layers=info.n_layers,
        intermediate_size=info.intermediate_size,
        dtype=m.capture.dtype,
        model_dtype=m.model.dtype,
        chat_template=chat,
        shard_rows=m.capture.shard_rows or 0,
    )
    return Prepared(info, fingerprint, chat, sets, meta)


def reduce(m: Manifest, p: Prepared, run: Run, executor: Executor) -> Reduction:
    index = run.row_index()
    rows = {name: np.array([index[h] for h in e.row_hashes], dtype=np.int64) for name, e in p.sets.items()}
    return streamed.reduce_store(
        run,
        rows,
        k=m.select.k_for(p.info.n_layers, p.info.intermediate_size),
        exclude_layers=m.select.exclude_layers,
        universal_fraction=m.universal.top_fraction,
        universal_threshold=m.universal.threshold,
        universal_scope=m.universal.scope,
        mapper=executor.map,
    )


def build_circuit(m: Manifest, p: Prepared, run: Run, red: Reduction, overflow: int) -> circuitmod.Circuit:
    info = p.info
    model_ref = circuitmod.ModelRef(
        uri=m.model.uri,
        revision=m.model.revision,
        architecture=info.architecture,
        n_layers=info.n_layers,
        intermediate_size=info.intermediate_size,
        fingerprint=p.fingerprint,
    )
    prompt_refs = {
        name: circuitmod.PromptRef(uri=e.prompts.uri, sha256=e.prompts.sha256, count=len(e.token_ids))
        for name, e in p.sets.items()
    }
    return circuitmod.build(
        name=m.name,
        model=model_ref,
        params=selection_params(m, p.chat, m.select.k_for(info.n_layers, info.intermediate_size)),
        prompts=prompt_refs,
        delta=red.delta,
        mean_pos=red.mean_pos,
        mean_neg=red.mean_neg,
        selected=red.selected,
        universal=red.universal,
        displaced=red.displaced,
        run=run.id,
        store=m.output.store,
        extra_stats={"float16_overflow": overflow},
    )


def shard_advice(calls: ReplicaCalls, spec: ReplicaSpec, p: Prepared) -> dict[str, Any] | None:
    """For a new run without `capture.shard_rows`, the engine's measured shard size (the stream engine needs shards
    big enough for compute to cover each layer's load); printed with its reason. None: the engine keeps the default
    (asked of a replica that then captures: the same replicas stay up for the capture)."""
    lengths = [len(ids) for ids in p.token_ids().values()]
    mean = sum(lengths) / max(1, len(lengths))
    (advice,), _ = calls.map(spec, lambda replica, tokens: replica.advise.remote(tokens), [mean])
    if advice is not None:
        print(f"shard size: {advice['rows']} prompts: {advice['reason']}", file=sys.stderr)
    return advice


def mine(m: Manifest, executor: Executor, *, progress: bool = True, checked: Checked | None = None) -> MineResult:
    """Validate, capture what the store lacks on the executor's replicas, stream the reduce, publish."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    m = manifestmod.pin_model(m)
    checked = checked or validate(m, check_remote=True, evaluation=False)
    p = prepare(m, checked)  # every check that needs no forward pass is behind us: from here on, writes
    store = ActivationStore(m.output.store, m.output.storage_options)
    store.check_writable()
    spec = replace(ReplicaSpec.from_manifest(m), fingerprint=p.fingerprint)
    advice = None
    lease_of = store.lease(run_id(p.meta), echo=lambda text: print(text, file=sys.stderr))
    with lease_of as lease, ReplicaCalls(executor) as calls:  # replicas that advised capture too
        if m.capture.shard_rows is None and store.load_meta(run_id(p.meta)) is None:
            advice = shard_advice(calls, spec, p)
        run = store.open_run(p.meta if advice is None else replace(p.meta, shard_rows=advice["rows"]))
        plans = run.plan(p.row_hashes())
        reused = len(run.committed())
        timings["prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = capture_shards(executor, spec, run, plans, p.packed_ids(), progress=progress)
        lease.check()
    timings["capture"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    red = reduce(m, p, run, executor)
    timings["reduce"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    built = build_circuit(m, p, run, red, report.float16_overflow)
    published = registry.publish(built, m.output.registry, m.output.storage_options)
    timings["publish"] = time.perf_counter() - t0
    summary = MineSummary(
        run.id,
        m.output.store,
        published.uri,
        published.status,
        published.version,
        timings,
        len(plans),
        reused,
        sum(len(plan.hashes) for plan in plans),
        report,
        advice and advice["reason"],
        peak_rss_mib(),
    )
    return MineResult(circuitmod.load(published.uri, m.output.storage_options), published, summary)


def peak_rss_mib() -> float | None:
    """The process's peak resident memory so far, from /proc (None where there is none)."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def run(manifest_path: Path, executor: Executor, *, progress: bool, summary: Path | None = None) -> MineResult:
    """The `mine` command: load and validate first (exit 2 before anything is written), then mine."""
    m = manifestmod.pin_model(manifestmod.load(manifest_path))  # a Hub model's revision: one commit from here on
    result = mine(m, executor, progress=progress, checked=validate(m, check_remote=True, evaluation=False))
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result.summary.to_dict(), indent=1, default=str) + "\n")
    return result


def report_lines(result: MineResult) -> list[str]:
    """What `cna-dist mine` prints; the circuit's URI comes last (spec §2)."""
    s = result.summary
    lines = [
        result.circuit.summary(),
        f"shards: {s.shards_captured} captured, {s.shards_reused} reused, {s.capture.retries} retried; "
        f"replicas: {s.capture.replicas}",
    ]
    if result.published.status == "unchanged":
        lines.append(f"unchanged, v{result.published.version}")
    return [*lines, result.published.uri]
