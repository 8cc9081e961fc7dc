"""The engine registry: which backend serves a replica's engine, decided here and nowhere else.

`cna_dist.capture.engines.resolve` turns the manifest's `model.engine` and the replica's GPU count into one of
`single`, `device_map`, `pipeline`, `stream`; this module loads the backend for it. No engine imports another.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cna_dist.capture import engines
from cna_dist.capture.backend import CaptureBackend
from cna_dist.model.checkpoint import inspect


def _whole(spec: Any, path: Path, engine: str) -> CaptureBackend:
    from cna_dist.capture.hf import HFBackend

    return HFBackend.load(
        path,
        dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code,
        gpus=spec.gpus,
        engine=engine,
        max_memory_per_gpu=spec.max_memory_per_gpu,
    )


def _pipeline(spec: Any, path: Path, engine: str) -> CaptureBackend:
    from cna_dist.capture.pipeline import PipelineBackend

    ranges = engines.stage_ranges(spec.stages, inspect(str(path)).n_layers, spec.gpus)
    return PipelineBackend.load(path, ranges, dtype=spec.dtype, gpus=spec.gpus)


def _stream(spec: Any, path: Path, engine: str) -> CaptureBackend:
    from cna_dist.capture.stream import StreamBackend

    return StreamBackend.load(path, dtype=spec.dtype, gpus=spec.gpus, hidden_budget_bytes=spec.hidden_budget)


LOADERS: dict[str, Callable[[Any, Path, str], CaptureBackend]] = {
    "single": _whole,
    "device_map": _whole,
    "pipeline": _pipeline,
    "stream": _stream,
}


def load_backend(spec: Any, path: Path) -> CaptureBackend:
    """The backend for a replica spec (`cna_dist.runtime.replica.ReplicaSpec`), loaded from a local checkpoint."""
    if spec.backend != "hf":
        raise ValueError(f"unknown capture backend {spec.backend!r}; known: hf")
    engine = engines.resolve(spec.engine, spec.gpus)
    return LOADERS[engine](spec, path, engine)
