"""Circuit file, registry and steering: round trips, concurrent publishers, reference format, m = 1 exactness."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from cna_dist.circuit import file as circuitmod
from cna_dist.circuit import registry
from cna_dist.errors import BadInput
from cna_dist.steer import hooks as steer
from tests.conftest import make_circuit


def test_round_trip_and_sorting(tmp_path: Path) -> None:
    c = make_circuit()
    published = registry.publish(c, str(tmp_path))
    loaded = circuitmod.load(published.uri)
    assert loaded.version == 1 and loaded.pairs() == c.pairs()
    deltas = [abs(n.delta) for n in loaded.neurons]
    assert deltas == sorted(deltas, reverse=True)
    raw = json.loads(Path(published.uri).read_text())
    assert raw["schema"] == "cna-circuit/1"
    for key in (
        "name",
        "version",
        "created_at",
        "model",
        "params",
        "prompts",
        "neurons",
        "universal",
        "stats",
        "provenance",
    ):
        assert key in raw
    assert set(raw["neurons"][0]) >= {"layer", "neuron", "delta", "mean_pos", "mean_neg"}


def test_bad_circuit_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "cna-circuit/1", "name": "x"}')
    with pytest.raises(BadInput, match="bad.json"):
        circuitmod.load(str(bad))
    bad.write_text("{nope")
    with pytest.raises(BadInput, match="not valid JSON"):
        circuitmod.load(str(bad))


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    results = []
    barrier = threading.Barrier(6)

    def publish(i: int) -> None:
        barrier.wait()
        results.append(registry.publish(make_circuit(seed=i, prompt_sha=f"{i:064d}"), str(tmp_path)))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.version for p in results) == [1, 2, 3, 4, 5, 6]
    folder = tmp_path / "refusal" / "tiny-instruct"
    for p in results:  # each file holds exactly what its publisher wrote
        assert circuitmod.load(p.uri).version == p.version
    assert json.loads((folder / "latest").read_text())["version"] == 6


def test_unchanged_inputs_publish_nothing(tmp_path: Path) -> None:
    first = registry.publish(make_circuit(), str(tmp_path))
    again = registry.publish(make_circuit(), str(tmp_path))
    assert again.status == "unchanged" and again.version == first.version == 1
    changed = registry.publish(make_circuit(prompt_sha="c" * 64), str(tmp_path))
    assert changed.status == "published" and changed.version == 2
    assert circuitmod.load(changed.uri).parent == 1


def test_reference_format_round_trip() -> None:
    c = make_circuit()
    ref = circuitmod.to_reference(c)
    assert all(k.count(",") == 2 and k.split(",")[1] == "-1" for k in ref["neurons"])
    back = circuitmod.from_reference(ref, "ref.json", name="refusal", model=c.model)
    assert back.pairs() == c.pairs()
    assert [n.delta for n in back.neurons] == [n.delta for n in c.neurons]
    with pytest.raises(BadInput, match="outside the model"):
        circuitmod.from_reference({"neurons": {"9,-1,0": 1.0}}, "ref.json", name="x", model=c.model)


def test_steering_m1_is_bit_identical_and_m0_zeroes(tiny_llama: Path) -> None:
    from cna_dist.capture import hf

    model, _ = hf.load(tiny_llama, dtype="float32")
    ids = torch.tensor([[5, 9, 11, 3, 8, 20]])
    pairs = [(2, 3), (3, 10), (3, 11)]
    with torch.no_grad():
        base = model(ids).logits
        with steer.steered(model, pairs, 1.0):
            same = model(ids).logits
        seen = {}
        proj = hf.down_projs(model)[3]
        with steer.steered(model, pairs, 0.0):
            # Registered after the steering hook, so it sees what down_proj receives.
            handle = proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
            ablated = model(ids).logits
            handle.remove()
    assert torch.equal(base, same)
    assert not torch.equal(base, ablated)
    assert torch.all(seen["x"][..., [10, 11]] == 0)  # every position, not only the last
    with pytest.raises(ValueError, match="outside the model"):
        with steer.steered(model, [(99, 0)], 0.0):
            pass
