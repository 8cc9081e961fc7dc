"""The circuit file `cna-circuit/1` (spec §2): build, write, load with validation, reference-format I/O.

Plain JSON in and out, validated by pydantic; loading never executes code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import reprlib
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cna_dist import __version__
from cna_dist.errors import BadInput
from cna_dist.manifest import SLUG
from cna_dist.store import uri as urimod

SCHEMA = "cna-circuit/1"


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Neuron(BaseModel):
    layer: int = Field(ge=0, strict=True)
    neuron: int = Field(ge=0, strict=True)
    delta: float = Field(allow_inf_nan=False)  # JSON readers accept NaN and Infinity; a circuit never holds them
    mean_pos: float | None = Field(None, allow_inf_nan=False)  # None only for circuits imported from the reference
    mean_neg: float | None = Field(None, allow_inf_nan=False)


class ModelRef(Open):
    uri: str
    revision: str | None = None
    architecture: str
    n_layers: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    fingerprint: str


class PromptRef(Open):
    uri: str
    sha256: str
    count: int = Field(ge=0)


class Provenance(Open):
    store: str | None = None
    run: str
    package_version: str = __version__


class Circuit(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_id: Literal["cna-circuit/1"] = Field(SCHEMA, alias="schema")
    name: str = Field(pattern=SLUG)  # part of registry paths and default output folders
    version: int = Field(0, ge=0)  # 0 until the registry assigns one
    created_at: str
    model: ModelRef
    params: dict[str, Any]
    prompts: dict[str, PromptRef]
    neurons: list[Neuron]
    universal: list[tuple[int, int]]
    displaced_universal: list[tuple[int, int]] = Field(default_factory=list)
    stats: dict[str, Any]
    provenance: Provenance
    inputs_sha256: str = ""  # what shaped the selection: equal inputs give an equal circuit
    parent: int | None = None
    diff: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _inside_the_model(self) -> Circuit:
        """Every neuron exists in the model the circuit names, once: a steer or eval never meets one that does not."""
        n, width = self.model.n_layers, self.model.intermediate_size
        seen: set[tuple[int, int]] = set()
        for i, pair in enumerate(self.pairs()):
            if pair[0] >= n or pair[1] >= width:
                raise ValueError(f"neurons.{i}: L{pair[0]} N{pair[1]} is outside the model ({n} layers x {width})")
            if pair in seen:
                raise ValueError(f"neurons.{i}: L{pair[0]} N{pair[1]} is listed twice")
            seen.add(pair)
        outside = [list(p) for p in (*self.universal, *self.displaced_universal) if not (p[0] < n and p[1] < width)]
        if outside:
            raise ValueError(f"universal neuron {outside[0]} is outside the model ({n} layers x {width})")
        return self

    def pairs(self) -> list[tuple[int, int]]:
        return [(n.layer, n.neuron) for n in self.neurons]

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for n in self.neurons:
            out.setdefault(n.layer, []).append(n.neuron)
        return out

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=1) + "\n"

    def summary(self) -> str:
        counts = self.stats.get("per_layer", {})
        lines = [
            f"circuit {self.name} v{self.version} ({self.model.architecture}, {self.model.n_layers} layers x "
            f"{self.model.intermediate_size} neurons): {len(self.neurons)} neurons, "
            f"{len(self.universal)} universal excluded ({len(self.displaced_universal)} would have entered)",
            "per layer: " + ", ".join(f"L{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: int(kv[0]))),
        ]
        for n in self.neurons[:5]:
            lines.append(f"  L{n.layer} N{n.neuron} delta={n.delta:+.4g}")
        return "\n".join(lines)


def inputs_hash(model_fingerprint: str, prompt_hashes: dict[str, str], params: dict[str, Any]) -> str:
    blob = json.dumps({"model": model_fingerprint, "prompts": prompt_hashes, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build(
    *,
    name: str,
    model: ModelRef,
    params: dict[str, Any],
    prompts: dict[str, PromptRef],
    delta: np.ndarray,
    mean_pos: np.ndarray,
    mean_neg: np.ndarray,
    selected: np.ndarray,
    universal: np.ndarray | None,
    displaced: np.ndarray,
    run: str,
    store: str | None,
    extra_stats: dict[str, Any] | None = None,
) -> Circuit:
    """Assemble a circuit from the reduce's arrays; `selected` and `displaced` are ranked flat ids."""
    width = delta.shape[1]
    flat_delta, flat_pos, flat_neg = delta.reshape(-1), mean_pos.reshape(-1), mean_neg.reshape(-1)
    neurons = [
        Neuron(
            layer=int(i // width),
            neuron=int(i % width),
            delta=float(flat_delta[i]),
            mean_pos=float(flat_pos[i]),
            mean_neg=float(flat_neg[i]),
        )
        for i in selected
    ]
    universal_pairs = [] if universal is None else [(int(a), int(b)) for a, b in np.argwhere(universal)]
    per_layer: dict[str, int] = {}
    for n in neurons:
        per_layer[str(n.layer)] = per_layer.get(str(n.layer), 0) + 1
    stats = {
        "per_layer": per_layer,
        "k": len(neurons),
        "n_universal": len(universal_pairs),
        "n_neurons_total": int(delta.size),
        **(extra_stats or {}),
    }
    return Circuit(
        name=name,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        model=model,
        params=params,
        prompts=prompts,
        neurons=neurons,
        universal=universal_pairs,
        displaced_universal=[(int(i // width), int(i % width)) for i in displaced],
        stats=stats,
        provenance=Provenance(store=store, run=run),
        inputs_sha256=inputs_hash(model.fingerprint, {k: p.sha256 for k, p in prompts.items()}, params),
    )


def _read(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    try:
        fs, path = urimod.filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise BadInput("circuit file does not exist", source=uri) from None
    except IsADirectoryError:
        raise BadInput("is a folder, not a circuit file", source=uri) from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"not valid JSON ({exc.msg} at line {exc.lineno})", source=uri) from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text (byte {exc.start})", source=uri) from None
    except RecursionError:
        raise BadInput("not valid JSON (nested too deeply)", source=uri) from None


def parse(data: Any, source: str) -> Circuit:
    if not isinstance(data, dict):
        raise BadInput("a circuit file holds a JSON object", source=source)
    if data.get("schema") != SCHEMA:
        hint = (
            " (reference-format files load with `cna-dist import-ref`)"
            if "neurons" in data and isinstance(data.get("neurons"), dict)
            else ""
        )
        raise BadInput(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}{hint}", source=source, field="schema")
    try:
        return Circuit.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        got = "" if err["type"] == "value_error" else f" (got {reprlib.repr(err.get('input'))})"
        raise BadInput(f"{err['msg']}{got}", source=source, field=field) from None


def load(uri: str, storage_options: dict[str, Any] | None = None) -> Circuit:
    return parse(_read(uri, storage_options), uri)


def check_fits(circuit: Circuit, n_layers: int, intermediate_size: int, source: str) -> None:
    """The circuit's model has the shape of the model it is about to steer (its neurons fit its own shape)."""
    for field, said, actual in (
        ("model.n_layers", circuit.model.n_layers, n_layers),
        ("model.intermediate_size", circuit.model.intermediate_size, intermediate_size),
    ):
        if said != actual:
            raise BadInput(f"{said}, but the model has {actual}", source=source, field=field)


def to_reference(circuit: Circuit) -> dict[str, Any]:
    """The reference implementation's Circuit.save format: neurons keyed "layer,position,neuron" (position -1)."""
    return {
        "neurons": {f"{n.layer},-1,{n.neuron}": n.delta for n in circuit.neurons},
        "prompt": f"[contrastive: {circuit.prompts['positive'].count} pos vs {circuit.prompts['negative'].count} neg]",
        "target_token": "[contrastive]",
        "total_logit_diff": 0.0,
    }


def from_reference(data: Any, source: str, *, name: str, model: ModelRef) -> Circuit:
    """Read a reference-format circuit; positions are collapsed, as the reference's steering does."""
    if not isinstance(data, dict) or not isinstance(data.get("neurons"), dict):
        raise BadInput("not a reference-format circuit: no 'neurons' object", source=source, field="neurons")
    merged: dict[tuple[int, int], float] = {}
    for key, value in data["neurons"].items():
        parts = key.split(",")
        try:
            layer, _position, neuron = (int(p) for p in parts)
            delta = float(value)
        except (ValueError, TypeError):
            raise BadInput(
                f'bad entry {key!r}: {value!r} (want "layer,position,neuron": number)', source=source, field="neurons"
            ) from None
        if not (0 <= layer < model.n_layers and 0 <= neuron < model.intermediate_size):
            raise BadInput(
                f"neuron {key!r} is outside the model ({model.n_layers} layers x {model.intermediate_size})",
                source=source,
                field="neurons",
            )
        if abs(delta) > abs(merged.get((layer, neuron), 0.0)):
            merged[(layer, neuron)] = delta
    ranked = sorted(merged.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
    neurons = [Neuron(layer=ln[0], neuron=ln[1], delta=d) for ln, d in ranked]
    per_layer: dict[str, int] = {}
    for n in neurons:
        per_layer[str(n.layer)] = per_layer.get(str(n.layer), 0) + 1
    return Circuit(
        name=name,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        model=model,
        params={"imported_from": source, "prompt": data.get("prompt")},
        prompts={},
        neurons=neurons,
        universal=[],
        stats={"per_layer": per_layer, "k": len(neurons)},
        provenance=Provenance(run="import"),
    )
