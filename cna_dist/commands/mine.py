"""`mine`: capture -> reduce -> circuit -> registry, on this process (the Ray driver replaces the inside)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from cna_dist import circuit as circuitmod
from cna_dist.errors import BadInput
from cna_dist.io import registry, stream
from cna_dist.io.store import ActivationStore, Run, RunMeta, ShardPlan, run_id
from cna_dist.manifest import Manifest
from cna_dist.model import capture as capturemod
from cna_dist.model import checkpoint as modelmod
from cna_dist.model import prompts as promptsmod
from cna_dist.validate import Checked, validate


@dataclass
class Encoded:
    """A prompt set as the model sees it: rendered text, token ids and the hash of each rendered prompt."""

    prompts: promptsmod.Prompts
    rendered: list[str]
    token_ids: list[list[int]]
    row_hashes: list[str] = field(default_factory=list)


def encode_sets(checked: Checked, tokenizer: Any, chat: bool, names: list[str]) -> dict[str, Encoded]:
    m = checked.manifest
    out: dict[str, Encoded] = {}
    for name in names:
        p = checked.prompts[name]
        rendered = [promptsmod.render(tokenizer, t, chat) for t in p.texts]
        ids = [promptsmod.encode(tokenizer, r, chat) for r in rendered]
        if m.capture.max_length is not None:
            too_long = [i for i, t in enumerate(ids) if len(t) > m.capture.max_length]
            if too_long:
                raise BadInput(
                    f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens, over capture.max_length "
                    f"{m.capture.max_length}",
                    source=p.uri,
                )
        out[name] = Encoded(p, rendered, ids, [promptsmod.sha256_text(r) for r in rendered])
    return out


def selection_params(m: Manifest, info: modelmod.ModelInfo, chat: bool, k: int) -> dict[str, Any]:
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


@dataclass
class MineResult:
    circuit: circuitmod.Circuit
    published: registry.Published
    summary: dict[str, Any]


def capture_shards(
    run: Run,
    plans: list[ShardPlan],
    token_ids: dict[str, list[int]],
    model: Any,
    pad_id: int,
    m: Manifest,
    progress: bool,
) -> int:
    """Capture each planned shard and commit it; returns the float16 overflow count (in-process path)."""
    overflow = 0
    total = sum(len(p.hashes) for p in plans)
    with tqdm(total=total, desc="capture", unit="prompt", disable=not progress or not total) as bar:
        for plan in plans:
            acts, n_over = capturemod.capture(
                model,
                [token_ids[h] for h in plan.hashes],
                pad_id,
                dtype=m.capture.dtype,
                token_budget=m.capture.token_budget,
                max_batch_size=m.capture.max_batch_size,
                on_batch=lambda b: bar.update(len(b.indices)),
            )
            run.write_shard(plan, acts, writer="driver")
            overflow += n_over
    return overflow


def mine(
    manifest: Manifest, *, progress: bool = True, executor: Any = None, checked: Checked | None = None
) -> MineResult:
    """Validate, capture what the store lacks, stream the reduce from the store, publish.

    `executor` (the Ray driver) runs capture on replica actors and the reduce as tasks; without it
    everything runs in this process through the same store.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    checked = checked or validate(manifest, check_remote=True)
    m = manifest
    info = checked.model
    assert info is not None
    acts_store = ActivationStore(m.output.store, m.output.storage_options)
    acts_store.check_writable()
    fingerprint = modelmod.fingerprint(m.model.uri, m.model.storage_options)
    local_model = modelmod.localize(m.model.uri, m.model.storage_options)
    tokenizer = modelmod.load_tokenizer(local_model, trust_remote_code=m.model.trust_remote_code)
    chat = promptsmod.use_chat_template(tokenizer, m.model.chat_template)
    sets = encode_sets(checked, tokenizer, chat, list(m.prompt_sets()))
    token_ids = {h: ids for e in sets.values() for h, ids in zip(e.row_hashes, e.token_ids, strict=True)}
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
    with acts_store.lease(run_id(meta), echo=lambda text: print(text, file=sys.stderr)) as lease:
        run = acts_store.open_run(meta)
        plans = run.plan(list(token_ids))
        reused = len(run.committed())
        timings["prepare"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if executor is not None:
            capture_report = executor.capture(m, run, plans, token_ids, progress=progress)
        else:
            model, _ = modelmod.load(local_model, dtype=m.model.dtype, trust_remote_code=m.model.trust_remote_code)
            overflow = capture_shards(run, plans, token_ids, model, tokenizer.pad_token_id, m, progress)
            capture_report = {"float16_overflow": overflow, "replicas": {"driver": len(plans)}, "retries": 0}
        lease.check()
    timings["capture"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = run.row_index()
    rows = {name: np.array([index[h] for h in e.row_hashes], dtype=np.int64) for name, e in sets.items()}
    k = m.select.k_for(info.n_layers, info.intermediate_size)
    red = stream.reduce_store(
        run,
        rows,
        k=k,
        exclude_layers=m.select.exclude_layers,
        universal_fraction=m.universal.top_fraction,
        universal_threshold=m.universal.threshold,
        universal_scope=m.universal.scope,
        mapper=executor.map if executor is not None else stream.local_map,
    )
    timings["reduce"] = time.perf_counter() - t0

    model_ref = circuitmod.ModelRef(
        uri=m.model.uri,
        revision=m.model.revision,
        architecture=info.architecture,
        n_layers=info.n_layers,
        intermediate_size=info.intermediate_size,
        fingerprint=fingerprint,
    )
    prompt_refs = {
        name: circuitmod.PromptRef(uri=e.prompts.uri, sha256=e.prompts.sha256, count=len(e.token_ids))
        for name, e in sets.items()
    }
    built = circuitmod.build(
        name=m.name,
        model=model_ref,
        params=selection_params(m, info, chat, k),
        prompts=prompt_refs,
        delta=red.delta,
        mean_pos=red.mean_pos,
        mean_neg=red.mean_neg,
        selected=red.selected,
        universal=red.universal,
        displaced=red.displaced,
        run=run.run,
        store=m.output.store,
        extra_stats={"float16_overflow": capture_report["float16_overflow"]},
    )
    t0 = time.perf_counter()
    published = registry.publish(built, m.output.registry, m.output.storage_options)
    timings["publish"] = time.perf_counter() - t0
    n_prompts = sum(len(p.hashes) for p in plans)
    summary = {
        "run": run.run,
        "store": m.output.store,
        "circuit": published.uri,
        "status": published.status,
        "version": published.version,
        "timings_s": timings,
        "shards_captured": len(plans),
        "shards_reused": reused,
        "prompts_captured": n_prompts,
        "prompts_per_s": n_prompts / timings["capture"] if timings["capture"] > 0 else None,
        **capture_report,
    }
    return MineResult(circuitmod.load(published.uri, m.output.storage_options), published, summary)
