"""A flaky object store, made for real: a proxy on 127.0.0.1 in front of moto that injects the faults of a bad night.

Each request is answered in one of five ways, chosen from a seed:

- "slowdown" / "internal": 503 SlowDown or 500 InternalError with S3's XML error body; nothing reaches moto.
- "drop": the connection closes before the request reaches moto (a PUT's body is left unread): nothing was done.
- "reset": the request reaches moto (a PUT lands), then the answer is cut: headers and half the body, then the
  connection closes; an answer without a body (a PUT's, a HEAD's) is not sent at all, so the client never learns
  that its write landed.
- "delay": held `delay_s` seconds, then forwarded as is.

The choice for the n-th time a given (method, path) is seen comes from a hash of (seed, method, path, n), so a run
meets the same faults whatever order its threads send requests in. A request is never faulted more than
`max_in_a_row` times in a row, so retries that allow that many failures always get through: the share of faults is
bounded. `forced` names faults that must happen: the first request of a method whose path holds a given part.
`outage_after` (a request count), `outage_from` (a path part: the first request for it starts the outage) and
`outage_match` (a path part) make faults persistent: every later (or matching) request is answered 503 SlowDown.
`counts` and `events` keep what was injected.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.s3proxy import HOP_BY_HOP, ForwardingHandler, serve_proxy

ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class Faults:
    """What to inject, in what shares; what was injected (`counts`, `events`)."""

    seed: int = 0
    error_share: float = 0.0  # 503 SlowDown or 500 InternalError, half each
    drop_share: float = 0.0
    reset_share: float = 0.0
    delay_share: float = 0.0
    delay_s: float = 2.0
    max_in_a_row: int = 2
    outage_after: int | None = None  # every request from this one on (counted from 1) is answered 503 SlowDown
    outage_match: str | None = None  # every request whose path holds this is answered 503 SlowDown
    outage_from: str | None = None  # every request from the first whose path holds this on is answered 503 SlowDown
    forced: dict[tuple[str, str], str] = field(default_factory=dict)  # (method, path part) -> fault of its first match
    forced_hit: set[tuple[str, str]] = field(default_factory=set)
    requests: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (fault, method, path)
    _seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    _in_a_row: Counter[tuple[str, str]] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, method: str, path: str) -> str | None:
        """The fault for this request (None: forward it untouched); counted."""
        with self.lock:
            self.requests += 1
            key = (method, path)
            self._seen[key] += 1
            if self._outage(path):
                fault: str | None = "slowdown"
            elif (first := self._first_forced(method, path)) is not None:
                self.forced_hit.add(first)
                fault = self.forced[first]
            elif self._in_a_row[key] >= self.max_in_a_row:
                fault = None
            else:
                fault = self._draw(method, path, self._seen[key])
            self._in_a_row[key] = self._in_a_row[key] + 1 if fault not in (None, "delay") else 0
            if fault is not None:
                self.counts[fault] += 1
                self.events.append((fault, method, path))
            return fault

    def _first_forced(self, method: str, path: str) -> tuple[str, str] | None:
        wanted = (k for k in self.forced if k not in self.forced_hit and k[0] == method and k[1] in path.split("?")[0])
        return next(wanted, None)

    def _outage(self, path: str) -> bool:
        if self.outage_from is not None and self.outage_from in path:
            self.outage_after = min(self.outage_after or self.requests, self.requests)
        after = self.outage_after is not None and self.requests >= self.outage_after
        return after or (self.outage_match is not None and self.outage_match in path)

    def _draw(self, method: str, path: str, n: int) -> str | None:
        digest = hashlib.sha256(f"{self.seed}:{method}:{path}:{n}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        for fault, share in (
            ("error", self.error_share),
            ("drop", self.drop_share),
            ("reset", self.reset_share),
            ("delay", self.delay_share),
        ):
            if u < share:
                return ("slowdown" if digest[8] % 2 else "internal") if fault == "error" else fault
            u -= share
        return None

    def injected(self) -> int:
        """Faults that made a request fail (delays only slow one down)."""
        return sum(n for fault, n in self.counts.items() if fault != "delay")


class FaultHandler(ForwardingHandler):
    """Forwards to moto like ForwardingHandler (If-None-Match included), unless `faults` says otherwise."""

    faults: Faults

    def _forward(self) -> None:
        try:
            self._answer(self.faults.decide(self.command, self.path))
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first (its read timeout): so be it
            self.close_connection = True

    def _answer(self, fault: str | None) -> None:
        if fault == "delay":
            time.sleep(self.faults.delay_s)
        elif fault == "drop":
            self.close_connection = True  # the body stays unread: the client sees its connection reset
            return
        body = self._read_body()
        if fault in ERRORS:
            self._error(*ERRORS[fault])
            return
        upstream = http.client.HTTPConnection(*self.state.upstream, timeout=30)
        try:
            response = self._ask(upstream, body)
            if fault == "reset":
                self._cut(response)
            else:
                self._relay(response)
        finally:
            upstream.close()

    def _error(self, status: int, reason: str, code: str, message: str) -> None:
        error = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{self.path.split('?')[0]}</Resource><RequestId>fault</RequestId></Error>"
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(error)))
        self.end_headers()
        self.wfile.write(error)
        self.wfile.flush()

    def _cut(self, response: http.client.HTTPResponse) -> None:
        """The upstream answer's status, headers and half its body, then the connection closes."""
        data = response.read()
        self.close_connection = True
        if self.command == "HEAD" or not data:
            return  # nothing to cut into: the answer is lost whole
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()


@contextmanager
def serve_faults(s3_server: str, faults: Faults) -> Iterator[Faults]:
    """The flaky proxy in front of moto; s3fs talks to it (through AWS_ENDPOINT_URL_S3) until the block ends."""
    with serve_proxy(s3_server, mode="pass", base=FaultHandler, faults=faults):
        yield faults
