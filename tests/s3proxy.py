"""An S3 server that ignores or refuses conditional writes, made for real: a proxy on 127.0.0.1 in front of moto.

In mode "drop" it strips `If-None-Match` (so moto silently overwrites, as older MinIO/Ceph and some gateways do);
in mode "reject" it answers that header with 501 NotImplemented; in mode "pass" it forwards the header too (a plain
proxy, for subclasses that misbehave in other ways: tests/faultproxy.py). Everything else is forwarded as is. Test
modules wrap `serve_proxy` in their own `proxy` fixture (a fixture imported from here would shadow as an unused import).
"""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
    mode: str = "drop"  # "drop": strip If-None-Match; "reject": answer it with 501 NotImplemented; "pass": forward it
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
            self._refuse()
            return
        upstream = http.client.HTTPConnection(*self.state.upstream, timeout=30)
        try:
            self._relay(self._ask(upstream, body))
        finally:
            upstream.close()

    def _refuse(self) -> None:
        """501 NotImplemented, as servers that do not know the header answer it."""
        error = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
            b"<Message>A header you provided implies functionality that is not implemented</Message></Error>"
        )
        self.send_response(501)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(error)))
        self.end_headers()
        self.wfile.write(error)

    def _ask(self, upstream: http.client.HTTPConnection, body: bytes) -> http.client.HTTPResponse:
        """The request as it came, minus hop-by-hop headers and (unless the mode is "pass") If-None-Match."""
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        upstream.putheader("Host", self.headers.get("Host", "{}:{}".format(*self.state.upstream)))
        dropped = HOP_BY_HOP if self.state.mode == "pass" else HOP_BY_HOP | {"if-none-match"}
        for name, value in self.headers.items():
            if name.lower() not in dropped:
                upstream.putheader(name, value)
        if body or self.command in ("PUT", "POST"):
            upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body or None)
        return upstream.getresponse()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """The upstream answer back to the client: its status and headers, then its body by length or in chunks."""
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        length = response.getheader("Content-Length")
        if length is not None:
            self.send_header("Content-Length", length)
        bodyless = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
        if bodyless or length is not None:
            self.end_headers()
            while not bodyless and (chunk := response.read(65536)):
                self.wfile.write(chunk)
        else:  # unknown length upstream: stream it on as chunks
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while chunk := response.read(65536):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _dispatch(self) -> None:
        self._forward()  # looked up on the instance, so a subclass's `_forward` is the one called

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _dispatch


def use_endpoint(endpoint: str) -> None:
    """Point s3fs at `endpoint` through the standard variable; cached instances would keep the old one."""
    import s3fs

    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def serve_proxy(
    s3_server: str, mode: str = "drop", base: type[ForwardingHandler] = ForwardingHandler, **attributes: object
) -> Iterator[ProxyState]:
    """A proxy in front of moto (`base` handling each request, `attributes` on its class); s3fs talks to it until
    the block ends."""
    host, port = s3_server.removeprefix("http://").split(":")
    state = ProxyState(upstream=(host, int(port)), mode=mode)
    handler = type("Handler", (base,), {"state": state, **attributes})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    use_endpoint(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield state
    finally:
        use_endpoint(s3_server)
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
