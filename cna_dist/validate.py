"""Everything a manifest points at, checked before any work starts and before anything is written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cna_dist.capture import engines
from cna_dist.errors import BadInput
from cna_dist.manifest import Manifest
from cna_dist.model import cache, weights
from cna_dist.model import checkpoint as modelmod
from cna_dist.prompts import sets as promptsmod
from cna_dist.store import uri as urimod


@dataclass
class Checked:
    """The result of validation: what was opened, so the run does not read it twice."""

    manifest: Manifest
    model: modelmod.ModelInfo | None = None
    prompts: dict[str, promptsmod.Prompts] = field(default_factory=dict)
    skipped_remote: list[str] = field(default_factory=list)


def check_writable(uri: str, field_name: str, source: str) -> None:
    if not urimod.is_local(uri):
        return
    path = Path(urimod.filesystem(uri)[1])
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"{probe} is a file, not a folder", source=source, field=field_name)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"no write permission on {probe}", source=source, field=field_name)


def check_selection(m: Manifest, info: modelmod.ModelInfo) -> None:
    """The layers and the k the manifest asks for exist in this model."""
    n = info.n_layers
    beyond = [layer for layer in m.select.exclude_layers if layer >= n]
    if beyond:
        raise BadInput(
            f"{beyond} beyond the model's {n} layers (0..{n - 1})", source=m.source, field="select.exclude_layers"
        )
    if len(m.select.exclude_layers) >= n:
        raise BadInput("every layer is excluded", source=m.source, field="select.exclude_layers")
    n_candidates = (n - len(m.select.exclude_layers)) * info.intermediate_size
    k = m.select.k_for(n, info.intermediate_size)
    if k > n_candidates and m.select.top_k is not None:
        raise BadInput(f"top_k {k} exceeds the {n_candidates} candidate neurons", source=m.source, field="select.top_k")
    if k > n_candidates:
        raise BadInput(
            f"{m.select.top_fraction} of all neurons is k = {k}, over the {n_candidates} candidate neurons",
            source=m.source,
            field="select.top_fraction",
        )


def check_stream(m: Manifest) -> None:
    """The stream engine runs on one device; its hidden-state budget means nothing to another engine."""
    spec = m.model
    if spec.engine == "stream" and spec.gpus_per_replica > 1:
        raise BadInput(
            f"the stream engine runs on one device, not {spec.gpus_per_replica} GPUs (give each GPU its own replica: "
            "gpus_per_replica 1)",
            source=m.source,
            field="model.engine",
        )
    if spec.stream_hidden_budget is not None and spec.engine != "stream":
        raise BadInput("for engine: stream only", source=m.source, field="model.stream_hidden_budget")


def check_engine(m: Manifest, info: modelmod.ModelInfo) -> None:
    """A pipeline's stages cover the model's layers in order, one per GPU; stages only where there is a pipeline."""
    spec = m.model
    check_stream(m)
    engine = engines.resolve(spec.engine, spec.gpus_per_replica)
    if engine != "pipeline":
        if spec.stages is not None:
            raise BadInput(
                f"stages are for engine: pipeline (this replica runs {spec.engine!r} with "
                f"{spec.gpus_per_replica} GPUs)",
                source=m.source,
                field="model.stages",
            )
        return
    try:
        ranges = engines.stage_ranges(spec.stages, info.n_layers, spec.gpus_per_replica)
    except ValueError as exc:
        raise BadInput(str(exc), source=m.source, field="model.stages") from None
    problem = engines.check_ranges(ranges, info.n_layers, spec.gpus_per_replica)
    if problem:
        raise BadInput(problem, source=m.source, field="model.stages")


def check_judge(m: Manifest, check_remote: bool, checked: Checked) -> None:
    """`eval.judge` as `eval` checks it: config, every weight header, tokenizer (remote ones with --check-remote)."""
    j = m.eval.judge
    if j is None:
        return
    if not (urimod.is_local(j.uri) or check_remote):
        checked.skipped_remote.append(j.uri)
        return
    config = modelmod.read_config(j.uri, j.storage_options, field="eval.judge.uri")
    weights.check(j.uri, config, j.storage_options, field="eval.judge.uri")
    if urimod.is_local(j.uri):  # a remote tokenizer is copied into the node cache: eval does that, validate not
        modelmod.judge_tokenizer(j.uri, j.storage_options, j.trust_remote_code, field="eval.judge.uri")


def check_capability(m: Manifest, check_remote: bool, checked: Checked) -> None:
    """`eval.capability` as `eval` checks it: the harness is installed, task files exist and every task loads.

    A task named by the harness (not a local YAML file) loads its data from the Hub: only with --check-remote.
    """
    if not m.eval.capability:
        return
    from cna_dist.eval import capability
    from cna_dist.manifest import manifest_tasks

    field = f"{m.source}: eval.capability"
    tasks = manifest_tasks(m)
    local = [t for t in tasks if t.lower().endswith((".yaml", ".yml"))]
    if check_remote or len(local) == len(tasks):
        capability.check(tasks, m.eval.capability_limit, field)
        return
    capability.harness(field)
    for spec in local:
        if not Path(spec).is_file():
            raise BadInput(f"task file {spec!r} does not exist", field=field)
    checked.skipped_remote.extend(f"capability task {t}" for t in tasks if t not in local)


def validate(manifest: Manifest, *, check_remote: bool = False, evaluation: bool = True) -> Checked:
    """Everything the manifest names, checked without writing. `evaluation`: also `eval.judge` and
    `eval.capability` (not for `mine`, which uses neither: their data may be where the capture cluster cannot go)."""
    checked = Checked(manifest)
    m = manifest
    cache.max_bytes()  # CNA_DIST_CACHE_MAX_BYTES is a size, or exit 2 now rather than on the first replica
    if urimod.is_local(m.model.uri) or check_remote:
        config = modelmod.read_config(m.model.uri, m.model.storage_options)
        checked.model = modelmod.info_from_config(config, m.model.uri)
        # every weight file's header (two ranged reads each, never the data): remote ones too with --check-remote
        weights.check(m.model.uri, config, m.model.storage_options)
        check_selection(m, checked.model)
        check_engine(m, checked.model)
    else:
        checked.skipped_remote.append(m.model.uri)
    sets = dict(m.prompt_sets())
    if m.prompts.eval is not None:
        sets["eval"] = m.prompts.eval
    for name, spec in sets.items():
        if urimod.is_local(spec.uri) or check_remote:
            checked.prompts[name] = promptsmod.load(name, spec)
        else:
            checked.skipped_remote.append(spec.uri)
    if evaluation:
        check_judge(m, check_remote, checked)
        check_capability(m, check_remote, checked)
    check_writable(m.output.store, "output.store", m.source)
    check_writable(m.output.registry, "output.registry", m.source)
    return checked


def is_nightly_list(path: Path) -> bool:
    """A nightly list is a YAML mapping with the one key `manifests` (a manifest always has `name`)."""
    from cna_dist.manifest import read_yaml

    data = read_yaml(path, "manifest")
    return isinstance(data, dict) and set(data) == {"manifests"}


def validate_list(path: Path, *, check_remote: bool = False) -> list[tuple[Path, Checked | BadInput]]:
    """Every manifest a nightly list names, each validated on its own: (path, what it checked or why it is bad)."""
    from cna_dist.manifest import load, load_list, pin_model

    out: list[tuple[Path, Checked | BadInput]] = []
    for manifest in load_list(path):
        try:
            m = load(manifest)
            out.append((manifest, validate(pin_model(m) if check_remote else m, check_remote=check_remote)))
        except BadInput as exc:
            out.append((manifest, exc))
    return out
