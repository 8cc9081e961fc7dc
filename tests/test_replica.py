"""A replica's two seams: it captures with any engine, and generates only through a generator.

The engine registry says whether a replica's engine is also its generator; a replica never probes its engine. A
capture-only engine's replica refuses generation, CAA and log-likelihoods with bad input naming model.engine, and
`ReplicaSpec.for_generation` (the one place eval's engine is decided) gives every manifest engine one that
generates.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cna_dist.capture import engines
from cna_dist.errors import BadInput
from cna_dist.model import loglik
from cna_dist.runtime.replica import Replica, ReplicaSpec


@pytest.mark.parametrize(
    "engine, gpus, generates_on",
    [
        ("auto", 0, "single"),
        ("auto", 1, "single"),
        ("auto", 4, "device_map"),
        ("device_map", 4, "device_map"),
        ("device_map", 0, "single"),
        ("pipeline", 4, "device_map"),
        ("pipeline", 0, "single"),
        ("stream", 1, "single"),
        ("stream", 0, "single"),
    ],
)
def test_every_manifest_engine_generates_on_an_engine_that_can(engine: str, gpus: int, generates_on: str) -> None:
    assert engines.generator_engine(engine, gpus) == generates_on
    spec = ReplicaSpec("/m", engine=engine, gpus=gpus, stages=2 if engine == "pipeline" else None).for_generation()
    assert spec.engine == generates_on and spec.stages is None and spec.hidden_budget is None
    assert engines.resolve(spec.engine, gpus) == generates_on  # the replica loads the engine it was given


def test_a_capture_only_replica_refuses_generation_naming_the_engine(tiny_llama: Path) -> None:
    replica = Replica(ReplicaSpec(str(tiny_llama), engine="stream", dtype="float32"))
    try:
        assert replica.generator is None and replica.engine.name == "stream"
        calls = [
            lambda: replica.generate([[5, 6]], {}, 4, 1),
            lambda: replica.caa_vectors([[5]], [[6]], [1]),
            lambda: replica.loglikelihoods([([5], [6])], {}, 1),
        ]
        for call in calls:
            with pytest.raises(BadInput, match=r"model.engine: 'stream' captures only \(engine stream\)") as caught:
                call()
            assert caught.value.field == "model.engine"
        advice = replica.advise(6.0)  # the stream engine measures the shard size it needs
        assert advice is not None and advice["rows"] >= 1 and "a shard needs >=" in advice["reason"]
    finally:
        replica.close()


def test_the_generation_spec_of_a_stream_manifest_generates(tiny_llama: Path) -> None:
    spec = ReplicaSpec(str(tiny_llama), engine="stream", dtype="float32").for_generation()
    replica = Replica(spec)
    try:
        assert replica.generator is replica.engine and replica.engine.name == "single"
        assert replica.advise(6.0) is None  # a whole model in memory keeps the store's default shard size
        (text,) = replica.generate([[5, 6, 7]], {}, 3, 1)
        steered = {"pairs": [[1, 0], [2, 3]], "multiplier": 1.0}  # m = 1: bit-identical, so the same text
        assert replica.generate([[5, 6, 7]], steered, 3, 1) == [text]
        requests = [([5, 6], [7]), ([8], [9, 10])]
        pad = replica.engine.tokenizer.pad_token_id
        assert replica.loglikelihoods(requests, {}, 1) == loglik.loglikelihoods(
            replica.engine.model, requests, pad, max_batch_size=1
        )
        vectors = replica.caa_vectors([[5, 6]], [[7, 8]], [1])
        assert list(vectors) == [1] and len(vectors[1]) == replica.engine.model.config.hidden_size
    finally:
        replica.close()
