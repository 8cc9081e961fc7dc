"""Registry publishing on S3 servers with and without conditional writes, and the parent diff of new versions.

The dangerous server is made for real: an HTTP proxy on 127.0.0.1 in front of moto that drops `If-None-Match`
(so moto silently overwrites, as older MinIO/Ceph and some gateways do) or answers it with 501 NotImplemented
(tests/s3proxy.py). The claim protocol itself is tested on its own in tests/test_objects.py.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cna_dist.circuit import file as circuitmod
from cna_dist.circuit import registry
from cna_dist.circuit.diff import jaccard
from cna_dist.store import objects
from cna_dist.store import uri as urimod
from tests.conftest import make_circuit
from tests.s3proxy import ProxyState, serve_proxy, use_endpoint


@pytest.fixture
def proxy(s3_server: str) -> Iterator[ProxyState]:
    """A proxy in front of moto that drops If-None-Match; s3fs talks to it for the duration of the test."""
    with serve_proxy(s3_server) as state:
        yield state


def fresh_registry() -> str:
    return f"s3://cna/{uuid.uuid4().hex}/circuits"


def race(circuits: list[circuitmod.Circuit], reg: str) -> list[registry.Published]:
    results: list[registry.Published] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(circuits))

    def publish(c: circuitmod.Circuit) -> None:
        try:
            barrier.wait()
            results.append(registry.publish(c, reg))
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(c,)) for c in circuits]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def check_race(circuits: list[circuitmod.Circuit], results: list[registry.Published], reg: str) -> None:
    """v1..vN, each file intact and holding exactly one publisher's circuit, every circuit exactly once."""
    n = len(circuits)
    assert sorted(p.version for p in results) == list(range(1, n + 1))
    assert all(p.status == "published" for p in results)
    folder = registry.folder(reg, "refusal", "tiny-instruct")
    assert registry.versions(reg, "refusal", "tiny-instruct") == list(range(1, n + 1))
    stored = {v: circuitmod.load(registry.version_uri(reg, "refusal", "tiny-instruct", v)) for v in range(1, n + 1)}
    for p in results:
        assert stored[p.version].version == p.version
    owners = sorted(c.inputs_sha256 for c in stored.values())
    assert owners == sorted(c.inputs_sha256 for c in circuits)  # each publisher's circuit present exactly once
    for c in stored.values():
        original = next(o for o in circuits if o.inputs_sha256 == c.inputs_sha256)
        assert c.pairs() == original.pairs() and c.neurons == original.neurons
    fs, path = urimod.filesystem(folder)
    assert json.loads(fs.cat_file(f"{path}/latest"))["version"] == n
    assert not [e for e in fs.find(path) if ".claims/" in e]  # every claim cleaned up


def racers(n: int = 6) -> list[circuitmod.Circuit]:
    return [make_circuit([(2, i), (3, i + 1), (3, 15 - i)], prompt_sha=f"{i:064d}", seed=i) for i in range(n)]


@pytest.mark.s3
def test_proxy_really_overwrites(proxy: ProxyState, s3_server: str) -> None:
    """Without the fallback, an exclusive create through the proxy silently overwrites: the dangerous case."""
    fs, path = urimod.filesystem(f"{fresh_registry()}/x.json")
    fs.pipe_file(path, b"first", mode="create")
    fs.pipe_file(path, b"second", mode="create")  # no error: the header never reached the server
    assert fs.cat_file(path) == b"second" and proxy.seen_conditional == 2
    use_endpoint(s3_server)  # the same create straight to moto is refused
    fs, _ = urimod.filesystem(f"{fresh_registry()}/x.json")
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"third", mode="create")
    assert fs.cat_file(path) == b"second"


@pytest.mark.s3
def test_probe_detects_support(proxy: ProxyState, s3_server: str) -> None:
    reg = fresh_registry()
    objects.forget_probes()
    assert objects.conditional_put_supported(reg) is False  # header dropped: moto overwrote the probe
    assert objects.conditional_put_supported(reg) is False and proxy.seen_conditional == 1  # cached, no new probe
    proxy.mode = "reject"
    assert objects.conditional_put_supported(fresh_registry()) is False  # 501 NotImplemented
    use_endpoint(s3_server)
    assert objects.conditional_put_supported(reg) is True  # another endpoint: probed again, straight to moto
    fs, path = urimod.filesystem(reg)
    assert not fs.find(path)  # probes leave nothing behind


@pytest.mark.s3
def test_race_without_fallback_loses_versions(proxy: ProxyState, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trusting If-None-Match through the proxy: publishers all "win" v1 and overwrite each other."""
    monkeypatch.setattr(objects, "conditional_put_supported", lambda *args, **kwargs: True)
    for _ in range(3):  # one lossy race proves it; three tries make a lucky serial schedule irrelevant
        reg = fresh_registry()
        circuits = racers()
        results = race(circuits, reg)
        stored = {
            circuitmod.load(registry.version_uri(reg, "refusal", "tiny-instruct", v)).inputs_sha256
            for v in registry.versions(reg, "refusal", "tiny-instruct")
        }
        if len(stored) < len(circuits):
            assert len({p.version for p in results}) < len(results)  # several publishers were told the same N
            return
    pytest.fail("the proxy did not let concurrent exclusive creates overwrite each other")


@pytest.mark.s3
@pytest.mark.parametrize("mode", ["drop", "reject"])
def test_concurrent_publishers_without_conditional_writes(
    proxy: ProxyState, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy.mode = mode
    calls = []
    real = objects.ClaimObjects.create_if_absent

    def counted(self: objects.ClaimObjects, key: str, data: bytes) -> None:
        calls.append(key)
        real(self, key, data)

    monkeypatch.setattr(objects.ClaimObjects, "create_if_absent", counted)
    reg = fresh_registry()
    circuits = racers()
    results = race(circuits, reg)
    check_race(circuits, results, reg)
    assert not objects.conditional_put_supported(reg)
    assert len(calls) >= len(circuits) and proxy.seen_conditional == 1  # claims did it; the header only probed


@pytest.mark.s3
def test_normal_path_with_conditional_writes_takes_no_claims(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_claims(*args: object, **kwargs: object) -> None:
        raise AssertionError("the claim fallback ran against a server that supports If-None-Match")

    monkeypatch.setattr(objects.ClaimObjects, "create_if_absent", no_claims)
    reg = fresh_registry()
    assert objects.conditional_put_supported(reg)
    circuits = racers()
    check_race(circuits, race(circuits, reg), reg)


@pytest.mark.s3
def test_claim_objects_are_not_versions(proxy: ProxyState) -> None:
    reg = fresh_registry()
    registry.publish(make_circuit([(2, 1)]), reg)
    fs, path = urimod.filesystem(registry.folder(reg, "refusal", "tiny-instruct"))
    fs.pipe_file(f"{path}/v2.claims/someone", b"{}")
    assert registry.versions(reg, "refusal", "tiny-instruct") == [1]


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_unchanged_rerun_and_parent_diff(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if where == "s3":
        request.getfixturevalue("s3_server")
    reg = str(tmp_path / "circuits") if where == "local" else fresh_registry()
    parent_pairs = [(2, 1), (2, 5), (3, 0), (3, 7)]
    first = registry.publish(make_circuit(parent_pairs), reg)
    assert (first.version, first.status) == (1, "published")
    v1 = circuitmod.load(first.uri)
    assert v1.parent is None and v1.diff is None

    again = registry.publish(make_circuit(parent_pairs), reg)
    assert (again.version, again.status, again.message) == (1, "unchanged", "unchanged, v1")
    assert registry.versions(reg, "refusal", "tiny-instruct") == [1]

    child_pairs = [(2, 1), (3, 0), (3, 9)]  # a changed prompt set moved the circuit
    second = registry.publish(make_circuit(child_pairs, prompt_sha="c" * 64), reg)
    assert (second.version, second.status) == (2, "published")
    v2 = circuitmod.load(second.uri)
    assert v2.parent == 1
    assert v2.diff is not None
    assert v2.diff["parent_version"] == 1
    assert v2.diff["added"] == [[3, 9]]
    assert v2.diff["removed"] == [[2, 5], [3, 7]]
    assert v2.diff["jaccard"] == pytest.approx(2 / 5)  # shared {(2,1),(3,0)} over union of 5
    assert v2.diff["jaccard"] == jaccard(set(parent_pairs), set(child_pairs))
