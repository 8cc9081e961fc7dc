"""The engine contract, by engine x family: every engine's rows are bit-identical to single-device capture.

Single-device capture equals an independent oracle for every family (HF's own forward, one prompt, unpadded:
tests/test_families.py for the dense families, tests/test_moe_families.py for mixture-of-experts ones). Here every
other engine runs the same checkpoint over the same ragged prompts under the same limits (several left-padded
batches of mixed lengths), in float32, and its rows must equal single-device rows bit for bit: `device_map`
through accelerate's dispatch (on the CPU: the test machine has no GPU), `pipeline` with the 3 layers split into
stages [0, 1) and [1, 3), `stream` one layer at a time with at most two layers alive. MoE checkpoints hold one
tensor per expert, as released checkpoints do, so the stage engines assemble transformers' fused experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cna_dist.capture import hf
from cna_dist.capture.pipeline import PipelineBackend
from cna_dist.capture.single import Capturer, capture_with
from cna_dist.capture.stream import StreamBackend
from cna_dist.demo.tokenizer import build_tokenizer
from cna_dist.demo.words import DEFAULT_WORDS
from cna_dist.manifest import ModelSpec
from cna_dist.model import arch
from tests import test_families as dense
from tests import test_moe_families as moe

N_LAYERS = 3
SPLIT = [(0, 1), (1, N_LAYERS)]
LIMITS = dense.LIMITS
assert moe.LIMITS == LIMITS  # the oracle tests ran single-device capture under these limits too


def checkpoint(model_type: str, path: Path) -> Path:
    if model_type in arch.MOE:
        return moe.build(model_type, path, num_hidden_layers=N_LAYERS)
    return dense.build(model_type, path)


def single_rows(path: Path, token_ids: list[list[int]]) -> np.ndarray:
    backend = hf.HFBackend.load(path, dtype="float32", trust_remote_code=False)
    try:
        [(lo, hi, rows)], overflow = backend.capture_parts(token_ids, "float32", LIMITS)
    finally:
        backend.close()
    assert (lo, hi, overflow) == (0, N_LAYERS, 0)
    return rows


def device_map_rows(path: Path, token_ids: list[list[int]]) -> np.ndarray:
    model, tokenizer = hf.load(path, dtype="float32", device_map={"": "cpu"})
    with Capturer(model) as capturer:
        rows, _ = capture_with(capturer, token_ids, tokenizer.pad_token_id, dtype="float32", **asdict(LIMITS))
    return rows


def pipeline_rows(path: Path, token_ids: list[list[int]]) -> np.ndarray:
    backend = PipelineBackend.load(path, SPLIT, dtype="float32", gpus=0)
    try:
        parts, overflow = backend.capture_parts(token_ids, "float32", LIMITS)
    finally:
        backend.close()
    assert [(lo, hi) for lo, hi, _ in parts] == SPLIT and overflow == 0
    return np.concatenate([rows for _, _, rows in parts], axis=1)


def stream_rows(path: Path, token_ids: list[list[int]]) -> np.ndarray:
    backend = StreamBackend.load(path, dtype="float32", gpus=0)
    try:
        [(lo, hi, rows)], overflow = backend.capture_parts(token_ids, "float32", LIMITS)
    finally:
        backend.close()
    assert (lo, hi, overflow) == (0, N_LAYERS, 0)
    assert backend.peak_live_layers <= 2  # one layer computing, the next one loading
    return rows


ENGINES: dict[str, Callable[[Path, list[list[int]]], np.ndarray]] = {
    "device_map": device_map_rows,
    "pipeline": pipeline_rows,
    "stream": stream_rows,
}


def test_the_contract_covers_every_family_and_engine() -> None:
    assert set(dense.FAMILIES) | set(moe.MOE) == set(arch.known())
    manifest_engines = set(ModelSpec.model_fields["engine"].annotation.__args__) - {"auto"}
    assert manifest_engines == set(ENGINES)  # and `single`, the reference every engine is held to


@pytest.fixture(scope="module", params=sorted(arch.known()))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A family's checkpoint, ragged prompts and the single-device rows every engine must reproduce."""
    path = checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "model")
    token_ids = dense.prompts(len(build_tokenizer(DEFAULT_WORDS)))
    return {"path": path, "ids": token_ids, "single": single_rows(path, token_ids)}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_rows_are_bit_identical_to_single_device(family: dict[str, Any], engine: str) -> None:
    rows = ENGINES[engine](family["path"], family["ids"])
    assert rows.dtype == family["single"].dtype and rows.shape == family["single"].shape
    assert np.array_equal(rows, family["single"])
    assert np.abs(rows).max() > 0.1  # rows of substance, not near-zeros that any code would match
