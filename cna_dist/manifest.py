"""The job manifest: one YAML file, validated completely before any work starts (spec §2)."""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cna_dist.errors import BadInput, shown
from cna_dist.store import uri as urimod

# Letters, digits, '.', '_', '-', starting with a letter or digit: '..' or '.' would climb out of a registry folder.
SLUG = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few hundred bytes; anything near this is not one
MAX_MANIFEST_VALUES = 100_000  # values after YAML aliases are expanded: a "billion laughs" document stops here


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits_bool(a) for a in typing.get_args(annotation))
    return False


def _element(annotation: Any) -> Any:
    """The element type of a list[X] (or X | None of one); None for anything else."""
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is list:
            return typing.get_args(a)[0]
    return None


def _plain_number(value: Any, annotation: Any) -> None:
    if isinstance(value, bool) and not _admits_bool(annotation):
        raise ValueError(f"expected a number, got {str(value).lower()}")  # pydantic would read true as 1
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Numbers are numbers: a YAML true is not 1, and NaN or infinity is no count, fraction or multiplier."""
        annotation = cls.model_fields[info.field_name].annotation
        _plain_number(value, annotation)
        element = _element(annotation)
        if element is not None and isinstance(value, list):
            for item in value:
                _plain_number(item, element)
        return value


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ModelSpec(Strict):
    uri: str
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    chat_template: bool | None = None  # None: use it when the tokenizer has one
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)  # credentials: never in a repr
    gpus_per_replica: int = Field(0, ge=0)
    max_memory_per_gpu: str | None = None
    # How a replica runs the model (SPEC §3): auto = pipeline with more than one GPU, else the single-device path.
    engine: Literal["auto", "device_map", "pipeline", "stream"] = "auto"
    # stream: hidden states of a shard beyond this many bytes wait in host memory (None: all on the device)
    stream_hidden_budget: int | None = Field(None, ge=1)
    # Pipeline stages: a count (balanced by layers) or explicit [lo, hi) layer ranges; default one per GPU.
    stages: int | list[tuple[int, int]] | None = None

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, v: Any) -> Any:
        """A count, or [lo, hi] pairs of whole numbers; said plainly (a YAML `true` is not a count)."""
        if v is None:
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError(f"a pipeline needs at least one stage, got {v}")
            return v
        pairs = (
            isinstance(v, list)
            and v
            and all(
                isinstance(p, list | tuple)
                and len(p) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
                for p in v
            )
        )
        if not pairs:
            raise ValueError("expected a number of stages or a list of [lo, hi] layer ranges, e.g. [[0, 20], [20, 40]]")
        return v


class PromptSet(Strict):
    uri: str
    field: str | None = None  # .jsonl/.json objects' field, or a .parquet/.csv table's column; default "prompt"
    category_field: str | None = None  # a table's column naming each prompt's category (JailbreakBench: Category)
    limit: int | None = Field(None, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)  # credentials: never in a repr

    @model_validator(mode="after")
    def _categories_need_a_table(self) -> PromptSet:
        if self.category_field is not None and not self.uri.lower().endswith((".parquet", ".csv")):
            raise ValueError(f"category_field is read from .parquet and .csv tables only, not {self.uri!r}")
        return self


def _promptset_from_str(value: Any) -> Any:
    return {"uri": value} if isinstance(value, str) else value


class Prompts(Strict):
    positive: PromptSet
    negative: PromptSet
    diverse: PromptSet | None = None
    eval: PromptSet | None = None

    _coerce = field_validator("positive", "negative", "diverse", "eval", mode="before")(
        classmethod(lambda cls, v: _promptset_from_str(v))
    )


class Select(Strict):
    top_k: int | None = Field(None, ge=1)
    top_fraction: float | None = Field(None, gt=0, le=1)
    exclude_layers: list[int] = Field(default_factory=lambda: [0, 1])

    @field_validator("exclude_layers")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        bad = [x for x in v if x < 0]
        if bad:
            raise ValueError(f"layer indices must be >= 0, got {bad}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _one_of(self) -> Select:
        if self.top_k is not None and self.top_fraction is not None:
            raise ValueError("give top_k or top_fraction, not both")
        return self

    def k_for(self, n_layers: int, intermediate_size: int) -> int:
        if self.top_k is not None:
            return self.top_k
        fraction = 0.001 if self.top_fraction is None else self.top_fraction
        return max(1, int(fraction * n_layers * intermediate_size))


class Universal(Strict):
    top_fraction: float = Field(0.001, gt=0, le=1)
    threshold: float = Field(0.8, gt=0, le=1)
    scope: Literal["global", "per_layer"] = "global"


class Capture(Strict):
    dtype: Literal["float16", "float32"] = "float16"
    token_budget: int = Field(8192, ge=1)
    max_batch_size: int = Field(64, ge=1)
    max_length: int | None = Field(None, ge=1)  # prompts longer than this are an error, not truncated
    shard_rows: int | None = Field(None, ge=1)  # rows per shard (rounded to whole chunks); default 256


class Judge(Strict):
    """The judge model of `eval.judge`: an HF checkpoint on its own replicas, scoring each generation with a
    StrongREJECT-style rubric."""

    uri: str
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)  # credentials: never in a repr
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    gpus_per_replica: int = Field(0, ge=0)
    max_new_tokens: int = Field(96, ge=1)  # the rubric's answer is a few short lines
    max_batch_size: int = Field(8, ge=1)


class Eval(Strict):
    """Steering checks (`cna-dist eval`): generation settings, the refusal classifier and the controls."""

    multipliers: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0], min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    max_batch_size: int = Field(16, ge=1)
    refusal_patterns: list[str] | None = None  # regexes (case-insensitive); None: the built-in ones
    random_seed: int = 0  # the random control: same size, same layers
    caa: bool = False  # also run CAA with the same contrastive sets, at the circuit's busiest layer
    caa_layer: int | None = Field(None, ge=0)
    samples: int = Field(3, ge=0)  # generations kept per condition in eval.json
    categories: str | None = None  # field of the eval prompt objects naming a category (JailbreakBench: category)
    capability: list[str] = Field(default_factory=list)  # lm-eval tasks: names or YAML paths (relative: to here)
    capability_limit: int | None = Field(None, ge=1)  # examples per capability task; None: all
    judge: Judge | None = None

    @field_validator("refusal_patterns")
    @classmethod
    def _compiles(cls, v: list[str] | None) -> list[str] | None:
        import re

        for pattern in v or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from None
        return v


class Output(Strict):
    store: str
    registry: str
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)  # credentials: never in a repr


class Manifest(Strict):
    name: str = Field(pattern=SLUG, max_length=100)
    model: ModelSpec
    prompts: Prompts
    select: Select = Field(default_factory=Select)
    universal: Universal = Field(default_factory=Universal)
    capture: Capture = Field(default_factory=Capture)
    eval: Eval = Field(default_factory=Eval)
    output: Output

    # Set by load(): where relative paths resolve and what the messages name. Not part of the YAML.
    source: str = Field("<manifest>", exclude=True)

    def prompt_sets(self) -> dict[str, PromptSet]:
        sets = {"positive": self.prompts.positive, "negative": self.prompts.negative}
        if self.prompts.diverse is not None:
            sets["diverse"] = self.prompts.diverse
        return sets


SECRET_FIELDS = ("storage_options",)  # credentials live here: a message names the field, never its value


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    field = ".".join(str(p) for p in error["loc"]) or "<root>"
    value = error.get("input")
    if any(str(p) in SECRET_FIELDS for p in error["loc"]):
        return field, f"{error['msg']} (value not shown: it may hold credentials)"
    if error["type"] == "extra_forbidden":
        return field, "unknown key"
    if error["type"] == "missing":
        return field, "required key is missing"
    return field, f"{error['msg']} (got {shown(value)})"


def parse(data: Any, source: str) -> Manifest:
    if not isinstance(data, dict):
        raise BadInput(f"expected a mapping at the top level, got {type(data).__name__}", source=source)
    if "source" in data:
        raise BadInput("unknown key", source=source, field="source")
    data = {**data, "source": source}
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        field, message = _describe(exc.errors()[0])
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise BadInput(message + suffix, source=source, field=field) from None
    return manifest


def load(path: str | Path) -> Manifest:
    """Read, validate and resolve relative URIs against the manifest's folder."""
    path = Path(path)
    manifest = parse(read_yaml(path, "manifest"), str(path))
    return resolve_uris(manifest, path.parent.resolve())


def read_yaml(path: Path, what: str) -> Any:
    """A small YAML file (a manifest, a nightly list) read safely: size capped, UTF-8, no alias bombs, no cycles."""
    source = str(path)
    if not path.is_file():
        raise BadInput(f"{what} file does not exist", source=source)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BadInput(f"{path.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES} a {what} may have", source=source)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text (byte {exc.start})", source=source) from None
    try:
        data = yaml.safe_load(text)
        _count_values(data, source)
    except yaml.YAMLError as exc:
        raise BadInput(f"not valid YAML: {exc}", source=source) from None
    except RecursionError:
        raise BadInput("not valid YAML: nested too deeply", source=source) from None
    return data


def _count_values(data: Any, source: str) -> int:
    """Values in the document with every alias expanded, in time linear in its distinct nodes.

    yaml.safe_load shares an aliased node instead of copying it, so a "billion laughs" document loads in
    milliseconds and explodes only later, in whatever walks or prints it (validation, an error message).
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise BadInput("an alias refers to a node that contains it (a cyclic document)", source=source)
        open_nodes.add(key)
        total = 1 + sum(size(child) for child in (node.values() if isinstance(node, dict) else node))
        open_nodes.discard(key)
        if total > MAX_MANIFEST_VALUES:
            raise BadInput(f"over {MAX_MANIFEST_VALUES} values once its YAML aliases are expanded", source=source)
        sizes[key] = total
        return total

    return size(data)


def resolve_uris(manifest: Manifest, base: Path) -> Manifest:
    """Relative local paths resolve against `base`; every protocol must be one fsspec knows."""
    m = manifest.model_copy(deep=True)
    checks: list[tuple[str, Any, str]] = [
        ("model.uri", m.model, "uri"),
        ("output.store", m.output, "store"),
        ("output.registry", m.output, "registry"),
    ]
    for set_name in ("positive", "negative", "diverse", "eval"):
        ps = getattr(m.prompts, set_name)
        if ps is not None:
            checks.append((f"prompts.{set_name}.uri", ps, "uri"))
    if m.eval.judge is not None:
        checks.append(("eval.judge.uri", m.eval.judge, "uri"))
    for field, obj, attr in checks:
        value = getattr(obj, attr)
        urimod.check_protocol(value, source=m.source, field=field)
        setattr(obj, attr, urimod.resolve(value, base))
    return m


def pin_model(manifest: Manifest) -> Manifest:
    """A Hub model (`hf://ORG/NAME[@REVISION]`) pinned to its commit: `model.uri` names the sha, `model.revision` is
    it. Asks the Hub (or, with HF_HUB_OFFLINE=1, the local HF cache) once; the driver calls it before any work, so
    every later read, the store run and the circuit name one commit. Any other model is returned as it is."""
    if not manifest.model.uri.startswith("hf://"):
        return manifest
    from cna_dist.store import hub

    sha = hub.revision_of(manifest.model.uri)
    if sha is not None and manifest.model.revision == sha:
        return manifest  # pinned already
    uri, sha = hub.pin(manifest.model.uri, manifest.model.revision)
    m = manifest.model_copy(deep=True)
    m.model.uri, m.model.revision = uri, sha
    return m


def load_list(path: Path) -> list[Path]:
    """The manifests named by a nightly list (`manifests: [paths relative to the list]`)."""
    data = read_yaml(path, "nightly list")  # size-capped, UTF-8, no alias bombs
    if not isinstance(data, dict) or set(data) != {"manifests"}:
        raise BadInput(
            "expected exactly one key, `manifests`",
            source=str(path),
            field=",".join(sorted(data)) if isinstance(data, dict) else "<root>",
        )
    entries = data["manifests"]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise BadInput(f"expected a non-empty list of paths, got {shown(entries)}", source=str(path), field="manifests")
    return [(path.parent / e).resolve() for e in entries]


def manifest_tasks(m: Manifest) -> list[str]:
    """`eval.capability`, a relative task YAML path resolved against the manifest's folder like every other path."""
    base = Path(m.source).parent.resolve()
    return [
        str(base / t) if t.lower().endswith((".yaml", ".yml")) and not Path(t).is_absolute() else t
        for t in m.eval.capability
    ]
