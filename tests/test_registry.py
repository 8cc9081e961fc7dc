"""Registry publishing on S3 servers with and without conditional writes, and the parent diff of new versions.

The dangerous server is made for real: an HTTP proxy on 127.0.0.1 in front of moto that drops `If-None-Match`
(so moto silently overwrites, as older MinIO/Ceph and some gateways do) or answers it with 501 NotImplemented.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cna_dist import circuit as circuitmod
from cna_dist.core.diff import jaccard
from cna_dist.io import exclusive, registry
from cna_dist.io import uri as urimod
from tests.conftest import free_port

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
    "host",
}


@dataclass
class ProxyState:
    upstream: tuple[str, int]
    mode: str = "drop"  # "drop": strip If-None-Match; "reject": answer it with 501 NotImplemented
    seen_conditional: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ForwardingHandler(BaseHTTPRequestHandler):
    """Forwards one request to the upstream server as is (method, path, headers, body), minus the condition."""

    protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp expects; Expect: 100-continue is answered by the base
    timeout = 5  # idle keep-alive connections end their thread soon after the test
    state: ProxyState

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._read_body()
        conditional = "If-None-Match" in self.headers
        if conditional:
            with self.state.lock:
                self.state.seen_conditional += 1
        if conditional and self.state.mode == "reject":
            error = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                b"<Message>A header you provided implies functionality that is not implemented</Message></Error>"
            )
            self.send_response(501)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        upstream = http.client.HTTPConnection(*self.state.upstream, timeout=30)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            upstream.putheader("Host", self.headers.get("Host", "{}:{}".format(*self.state.upstream)))
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "if-none-match":
                    upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            length = response.getheader("Content-Length")
            bodyless = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
            if bodyless:
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
            elif length is not None:
                self.send_header("Content-Length", length)
                self.end_headers()
                while chunk := response.read(65536):
                    self.wfile.write(chunk)
            else:  # unknown length upstream: stream it on as chunks
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk := response.read(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def _use_endpoint(endpoint: str) -> None:
    """Point s3fs at `endpoint` through the standard variable; cached instances would keep the old one."""
    import s3fs

    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def proxy(s3_server: str) -> Iterator[ProxyState]:
    """A proxy in front of moto that drops If-None-Match; s3fs talks to it for the duration of the test."""
    host, port = s3_server.removeprefix("http://").split(":")
    state = ProxyState(upstream=(host, int(port)))
    handler = type("Handler", (ForwardingHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _use_endpoint(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield state
    finally:
        _use_endpoint(s3_server)
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def fresh_registry() -> str:
    return f"s3://cna/{uuid.uuid4().hex}/circuits"


MODEL = circuitmod.ModelRef(
    uri="/models/tiny-instruct", architecture="LlamaForCausalLM", n_layers=4, intermediate_size=16, fingerprint="f" * 64
)


def make_circuit(selected: list[tuple[int, int]], prompt_sha: str = "a" * 64, seed: int = 0) -> circuitmod.Circuit:
    """A circuit whose neurons are exactly `selected` (ranked as given), built the way the pipeline builds one."""
    rng = np.random.default_rng(seed)
    pos, neg = rng.standard_normal((4, 16)), rng.standard_normal((4, 16))
    prompts = {
        "positive": circuitmod.PromptRef(uri="/p.jsonl", sha256=prompt_sha, count=3),
        "negative": circuitmod.PromptRef(uri="/n.jsonl", sha256="b" * 64, count=3),
    }
    return circuitmod.build(
        name="refusal",
        model=MODEL,
        params={"k": len(selected)},
        prompts=prompts,
        delta=pos - neg,
        mean_pos=pos,
        mean_neg=neg,
        selected=np.array([layer * 16 + n for layer, n in selected], dtype=np.int64),
        universal=None,
        displaced=np.empty(0, np.int64),
        run="r1",
        store=None,
    )


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


def test_proxy_really_overwrites(proxy: ProxyState, s3_server: str) -> None:
    """Without the fallback, an exclusive create through the proxy silently overwrites: the dangerous case."""
    fs, path = urimod.filesystem(f"{fresh_registry()}/x.json")
    fs.pipe_file(path, b"first", mode="create")
    fs.pipe_file(path, b"second", mode="create")  # no error: the header never reached the server
    assert fs.cat_file(path) == b"second" and proxy.seen_conditional == 2
    _use_endpoint(s3_server)  # the same create straight to moto is refused
    fs, _ = urimod.filesystem(f"{fresh_registry()}/x.json")
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"third", mode="create")
    assert fs.cat_file(path) == b"second"


def test_probe_detects_support(proxy: ProxyState, s3_server: str) -> None:
    reg = fresh_registry()
    exclusive.forget_probes()
    assert exclusive.conditional_put_supported(reg) is False  # header dropped: moto overwrote the probe
    assert exclusive.conditional_put_supported(reg) is False and proxy.seen_conditional == 1  # cached, no new probe
    proxy.mode = "reject"
    assert exclusive.conditional_put_supported(fresh_registry()) is False  # 501 NotImplemented
    _use_endpoint(s3_server)
    assert exclusive.conditional_put_supported(reg) is True  # another endpoint: probed again, straight to moto
    fs, path = urimod.filesystem(reg)
    assert not fs.find(path)  # probes leave nothing behind


def test_race_without_fallback_loses_versions(proxy: ProxyState, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trusting If-None-Match through the proxy: publishers all "win" v1 and overwrite each other."""
    monkeypatch.setattr(exclusive, "conditional_put_supported", lambda *args, **kwargs: True)
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


@pytest.mark.parametrize("mode", ["drop", "reject"])
def test_concurrent_publishers_without_conditional_writes(
    proxy: ProxyState, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy.mode = mode
    calls = []
    real = exclusive.create_by_claim
    monkeypatch.setattr(exclusive, "create_by_claim", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    reg = fresh_registry()
    circuits = racers()
    results = race(circuits, reg)
    check_race(circuits, results, reg)
    assert not exclusive.conditional_put_supported(reg)
    assert len(calls) >= len(circuits) and proxy.seen_conditional == 1  # claims did it; the header only probed


def test_normal_path_with_conditional_writes_takes_no_claims(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_claims(*args: object, **kwargs: object) -> None:
        raise AssertionError("the claim fallback ran against a server that supports If-None-Match")

    monkeypatch.setattr(exclusive, "create_by_claim", no_claims)
    reg = fresh_registry()
    assert exclusive.conditional_put_supported(reg)
    circuits = racers()
    check_race(circuits, race(circuits, reg), reg)


def test_stale_claim_is_ignored_and_live_claim_blocks(proxy: ProxyState) -> None:
    reg = fresh_registry()
    target = registry.version_uri(reg, "refusal", "tiny-instruct", 1)
    fs, path = urimod.filesystem(target)
    claims = f"{path[: -len('.json')]}.claims"
    fs.pipe_file(f"{claims}/crashed", b"{}")
    # A live rival: nobody owns v1, the rival's claim stays, ours is withdrawn, v1 is not written.
    with pytest.raises(exclusive.ClaimContended):
        exclusive.create_by_claim(fs, path, b"x", ttl=60)
    assert fs.ls(claims, detail=False, refresh=True) == [f"{claims}/crashed"]
    assert not fs.exists(path)
    time.sleep(2.2)  # LastModified has 1 s resolution: the crashed claim is now > 1 s older than a new one
    exclusive.create_by_claim(fs, path, b"mine", ttl=1)
    assert fs.cat_file(path) == b"mine"
    assert not fs.find(claims)  # the winner removed its claim and the stale one
    with pytest.raises(exclusive.VersionTaken):  # v1 exists now: nobody else may write it
        exclusive.create_by_claim(fs, path, b"other", ttl=1)
    assert fs.cat_file(path) == b"mine"


def test_claim_objects_are_not_versions(proxy: ProxyState) -> None:
    reg = fresh_registry()
    registry.publish(make_circuit([(2, 1)]), reg)
    fs, path = urimod.filesystem(registry.folder(reg, "refusal", "tiny-instruct"))
    fs.pipe_file(f"{path}/v2.claims/someone", b"{}")
    assert registry.versions(reg, "refusal", "tiny-instruct") == [1]


@pytest.mark.parametrize("where", ["local", "s3"])
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
