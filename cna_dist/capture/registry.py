"""The engine registry: which engine serves a replica, and whether it is also the generator, decided here only.

`cna_dist.capture.engines.resolve` turns the manifest's `model.engine` and the replica's GPU count into one of
`single`, `device_map`, `pipeline`, `stream`; this module loads the engine for it. The `single` and `device_map`
engine (`cna_dist.capture.hf.HFBackend`) is also the replica's generator; the pipeline and stream engines capture
only, and a replica of theirs has no generator. No engine imports another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cna_dist.capture import engines
from cna_dist.capture.backend import CaptureEngine, Generator
from cna_dist.model.checkpoint import inspect


@dataclass(frozen=True)
class Loaded:
    """A replica's model: its capture engine, and the same model as a generator where the engine can generate."""

    engine: CaptureEngine
    generator: Generator | None


def _whole(spec: Any, path: Path, engine: str) -> Loaded:
    from cna_dist.capture.hf import HFBackend

    backend = HFBackend.load(
        path,
        dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code,
        gpus=spec.gpus,
        engine=engine,
        max_memory_per_gpu=spec.max_memory_per_gpu,
    )
    return Loaded(backend, backend)


def _pipeline(spec: Any, path: Path, engine: str) -> Loaded:
    from cna_dist.capture.pipeline import PipelineBackend

    ranges = engines.stage_ranges(spec.stages, inspect(str(path)).n_layers, spec.gpus)
    return Loaded(PipelineBackend.load(path, ranges, dtype=spec.dtype, gpus=spec.gpus), None)


def _stream(spec: Any, path: Path, engine: str) -> Loaded:
    from cna_dist.capture.stream import StreamBackend

    return Loaded(
        StreamBackend.load(path, dtype=spec.dtype, gpus=spec.gpus, hidden_budget_bytes=spec.hidden_budget), None
    )


LOADERS: dict[str, Callable[[Any, Path, str], Loaded]] = {
    "single": _whole,
    "device_map": _whole,
    "pipeline": _pipeline,
    "stream": _stream,
}


def load(spec: Any, path: Path) -> Loaded:
    """The engine (and generator, if it is one) for a replica spec (`cna_dist.runtime.replica.ReplicaSpec`), loaded
    from a local checkpoint."""
    if spec.backend != "hf":
        raise ValueError(f"unknown capture backend {spec.backend!r}; known: hf")
    engine = engines.resolve(spec.engine, spec.gpus)
    return LOADERS[engine](spec, path, engine)
