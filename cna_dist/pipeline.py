"""`mine`: capture -> reduce -> circuit -> registry, on this process (the Ray driver replaces the inside)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from cna_dist import capture as capturemod
from cna_dist import circuit as circuitmod
from cna_dist import model as modelmod
from cna_dist import prompts as promptsmod
from cna_dist import reduce as reducemod
from cna_dist import registry
from cna_dist.errors import BadInput
from cna_dist.manifest import Manifest
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
                raise BadInput(f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens, over capture.max_length "
                               f"{m.capture.max_length}", source=p.uri)
        out[name] = Encoded(p, rendered, ids, [promptsmod.sha256_text(r) for r in rendered])
    return out


def selection_params(m: Manifest, info: modelmod.ModelInfo, chat: bool, k: int) -> dict[str, Any]:
    """Everything that shaped the selection; equal params + model + prompts mean an equal circuit."""
    params: dict[str, Any] = {"k": k, "top_k": m.select.top_k, "top_fraction": m.select.top_fraction,
                              "exclude_layers": m.select.exclude_layers, "capture_dtype": m.capture.dtype,
                              "model_dtype": m.model.dtype, "chat_template": chat}
    if m.prompts.diverse is not None:
        params["universal"] = m.universal.model_dump()
    return params


@dataclass
class MineResult:
    circuit: circuitmod.Circuit
    published: registry.Published
    timings: dict[str, float]


def mine(manifest: Manifest, *, progress: bool = True) -> MineResult:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    checked = validate(manifest, check_remote=True)
    m = manifest
    info = checked.model
    assert info is not None
    fingerprint = modelmod.fingerprint(m.model.uri, m.model.storage_options)
    model, tokenizer = modelmod.load(modelmod.localize(m.model.uri, m.model.storage_options), dtype=m.model.dtype,
                                     trust_remote_code=m.model.trust_remote_code)
    chat = promptsmod.use_chat_template(tokenizer, m.model.chat_template)
    sets = encode_sets(checked, tokenizer, chat, list(m.prompt_sets()))
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    acts: dict[str, np.ndarray] = {}
    overflow = 0
    total = sum(len(e.token_ids) for e in sets.values())
    with tqdm(total=total, desc="capture", unit="prompt", disable=not progress) as bar:
        for name, enc in sets.items():
            acts[name], n_over = capturemod.capture(
                model, enc.token_ids, tokenizer.pad_token_id, dtype=m.capture.dtype,
                token_budget=m.capture.token_budget, max_batch_size=m.capture.max_batch_size,
                on_batch=lambda b: bar.update(len(b.indices)))
            overflow += n_over
    timings["capture"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    k = m.select.k_for(info.n_layers, info.intermediate_size)
    red = reducemod.reduce_in_memory(acts, k, m.select.exclude_layers, m.universal.top_fraction,
                                     m.universal.threshold, m.universal.scope)
    timings["reduce"] = time.perf_counter() - t0

    model_ref = circuitmod.ModelRef(uri=m.model.uri, revision=m.model.revision, architecture=info.architecture,
                                    n_layers=info.n_layers, intermediate_size=info.intermediate_size,
                                    fingerprint=fingerprint)
    prompt_refs = {name: circuitmod.PromptRef(uri=e.prompts.uri, sha256=e.prompts.sha256, count=len(e.token_ids))
                   for name, e in sets.items()}
    built = circuitmod.build(name=m.name, model=model_ref, params=selection_params(m, info, chat, k),
                             prompts=prompt_refs, delta=red.delta, mean_pos=red.mean_pos, mean_neg=red.mean_neg,
                             selected=red.selected, universal=red.universal, displaced=red.displaced,
                             run=uuid.uuid4().hex[:12], store=None, extra_stats={"float16_overflow": overflow})
    t0 = time.perf_counter()
    published = registry.publish(built, m.output.registry, m.output.storage_options)
    timings["publish"] = time.perf_counter() - t0
    final = circuitmod.load(published.uri, m.output.storage_options)
    return MineResult(final, published, timings)
