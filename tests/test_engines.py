"""Engine rules on their own: which engine a manifest means, how a pipeline splits layers, what is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from cna_dist import manifest as manifestmod
from cna_dist.capture import engines
from cna_dist.errors import BadInput, RunFailure
from cna_dist.store.activations import chunk_aligned
from cna_dist.validate import validate


@pytest.mark.parametrize(
    "engine, gpus, expected",
    [
        ("auto", 0, "single"),
        ("auto", 1, "single"),
        ("auto", 4, "pipeline"),
        ("device_map", 4, "device_map"),
        ("device_map", 1, "single"),
        ("pipeline", 0, "pipeline"),
        ("pipeline", 1, "pipeline"),
    ],
)
def test_resolve(engine: str, gpus: int, expected: str) -> None:
    assert engines.resolve(engine, gpus) == expected


@pytest.mark.parametrize("n_layers, n_stages", [(80, 4), (80, 3), (4, 4), (5, 2), (7, 1)])
def test_balanced_covers_every_layer_once_evenly(n_layers: int, n_stages: int) -> None:
    ranges = engines.balanced(n_layers, n_stages)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layers and len(ranges) == n_stages
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)  # the first stage also holds the embedding


def test_balanced_and_check_errors() -> None:
    with pytest.raises(ValueError, match="cannot split 4 layers into 5 stages"):
        engines.balanced(4, 5)
    assert engines.check_ranges([(0, 2), (2, 4)], 4, 2) is None
    assert "covering layers 0 to 4" in engines.check_ranges([(0, 2), (3, 4)], 4, 0)
    assert "covering layers 0 to 4" in engines.check_ranges([(0, 2), (2, 2), (2, 4)], 4, 0)
    assert "covering layers 0 to 4" in engines.check_ranges([(0, 3)], 4, 0)
    assert "one stage per GPU" in engines.check_ranges([(0, 2), (2, 4)], 4, 4)


def test_chunk_aligned_joins_parts_only_where_a_chunk_would_be_shared() -> None:
    rows = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)
    parts = [(lo, hi, rows[:, lo:hi]) for lo, hi in [(0, 3), (3, 4), (4, 8)]]
    assert [(lo, hi) for lo, hi, _ in chunk_aligned(parts, 1, 8)] == [(0, 3), (3, 4), (4, 8)]
    joined = chunk_aligned(parts, 2, 8)
    assert [(lo, hi) for lo, hi, _ in joined] == [(0, 4), (4, 8)]
    np.testing.assert_array_equal(np.concatenate([a for _, _, a in joined], axis=1), rows)
    assert [(lo, hi) for lo, hi, _ in chunk_aligned(parts, 8, 8)] == [(0, 8)]
    with pytest.raises(RunFailure, match="not at the last layer 8"):
        chunk_aligned(parts[:2], 8, 8)


def manifest_with(workspace: Path, **model: object) -> manifestmod.Manifest:
    data = yaml.safe_load(workspace.read_text())
    data["model"].update(model)
    workspace.write_text(yaml.safe_dump(data))
    return manifestmod.load(workspace)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"engine": "pipeline", "stages": [[0, 2], [3, 4]]}, "covering layers 0 to 4"),
        ({"engine": "pipeline", "stages": 5}, "cannot split 4 layers into 5 stages"),
        ({"engine": "pipeline", "gpus_per_replica": 2, "stages": 3}, "3 stages for a replica of 2 GPUs"),
        ({"stages": 2}, "stages are for engine: pipeline"),
    ],
)
def test_bad_stages_are_bad_input_naming_model_stages(workspace: Path, model: dict, message: str) -> None:
    with pytest.raises(BadInput, match=message) as info:
        validate(manifest_with(workspace, **model))
    assert info.value.field == "model.stages"


@pytest.mark.parametrize(
    "model, field, message",
    [
        ({"engine": "stream", "gpus_per_replica": 2}, "model.engine", "runs on one device, not 2 GPUs"),
        ({"stream_hidden_budget": 1024}, "model.stream_hidden_budget", "for engine: stream only"),
    ],
)
def test_bad_stream_settings(workspace: Path, model: dict, field: str, message: str) -> None:
    with pytest.raises(BadInput, match=message) as info:
        validate(manifest_with(workspace, **model))
    assert info.value.field == field


def test_stage_count_zero_is_refused_by_the_schema(workspace: Path) -> None:
    with pytest.raises(BadInput, match="at least one stage") as info:
        manifest_with(workspace, engine="pipeline", stages=0)
    assert info.value.field == "model.stages"


def test_good_pipeline_manifests_validate(workspace: Path) -> None:
    assert validate(manifest_with(workspace, engine="pipeline", stages=[[0, 1], [1, 4]])).model is not None
    assert validate(manifest_with(workspace, engine="auto", gpus_per_replica=2)).model is not None


def test_compute_bound_tokens() -> None:
    # A 72B layer (1.8 GB) at 25 GB/s loads in 72 ms; computing 100k tokens/s it needs 2 x 7.2k tokens per shard.
    assert engines.compute_bound_tokens(0.072, 100_000) == 14_400
    assert engines.compute_bound_tokens(0.5, 10, margin=1.0) == 5
    assert engines.compute_bound_tokens(1e-9, 1.0) == 1
    with pytest.raises(ValueError, match="positive"):
        engines.compute_bound_tokens(0.0, 10)


@pytest.mark.parametrize("stages", [True, [[0, 2, 3]], "two", [], [[True, 4]], [[0, 2.5], [2.5, 4]]], ids=str)
def test_stages_of_the_wrong_shape_are_refused_plainly(workspace: Path, stages: object) -> None:
    with pytest.raises(BadInput, match=r"a number of stages or a list of \[lo, hi\] layer ranges") as info:
        manifest_with(workspace, engine="pipeline", stages=stages)
    assert info.value.field == "model.stages"
