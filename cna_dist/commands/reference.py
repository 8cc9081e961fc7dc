"""`export-ref` / `import-ref`: circuits in the reference implementation's JSON format (NeuronSteerer Circuit)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cna_dist.circuit import file as circuitmod
from cna_dist.errors import BadInput
from cna_dist.manifest import SLUG
from cna_dist.model import checkpoint


def export(uri: str, out: Path) -> None:
    out.write_text(json.dumps(circuitmod.to_reference(circuitmod.load(uri)), indent=2) + "\n")


def import_(file: Path, name: str, model_uri: str, out: Path) -> None:
    if not re.match(SLUG, name):  # the manifest's rule: a circuit name becomes part of registry paths
        raise BadInput(f"not a slug: {name!r}", field="--name")
    info = checkpoint.inspect(model_uri)
    ref = circuitmod.ModelRef(
        uri=model_uri,
        architecture=info.architecture,
        n_layers=info.n_layers,
        intermediate_size=info.intermediate_size,
        fingerprint=checkpoint.fingerprint(model_uri),
    )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"not valid JSON ({exc.msg})", source=str(file)) from None
    out.write_text(circuitmod.from_reference(data, str(file), name=name, model=ref).to_json())
