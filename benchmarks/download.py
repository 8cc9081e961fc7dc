"""Benchmark: copying a checkpoint-like folder from S3 one file after another (`fs.get`, what the model cache did
before) against the parallel ranged copy (`cna_dist.store.download.copy`, what it does now).

Why: a replica copies a remote checkpoint (145 GB for a 72B model) once per node before it can load it; the copy
time is dead time on every new node. This script starts moto's S3 server on 127.0.0.1 (one process: its request
handling, not the network, is the ceiling here, so the ratio says little about AWS, where one stream gives tens of
MB/s and many streams add up), uploads `--files` weight files of `--file-mb` MiB plus three small ones, and copies
them alternately with:

* `get`: `fs.get(file, local)` per file. Note: s3fs >= 2024 splits one `get` of a file larger than its block size
  (50 MiB) into batches of `max_concurrency` (10) ranged GETs, waiting for each batch to finish;
* `get, one stream`: the same with `max_concurrency=1`: one GET per file, the plain sequential copy;
* `ranged`: `download.copy` with `--concurrency` ranges of `--part-mb` MiB in flight across all files.

Each is timed `--repeats` times into a fresh folder (medians reported, in MB/s of file bytes) and every copy is
checked byte for byte (sha256) against the uploaded data. Exit status 0, or 1 when a copy differs.

Run from the repository root:

    .venv/bin/python benchmarks/download.py [--files 4] [--file-mb 64] [--repeats 3] [--concurrency 16] [--part-mb 32]
                                      [--stream-mbps 0]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cna_dist.store import download


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("moto server did not start")


class Throttled(BaseHTTPRequestHandler):
    """Forwards GET and HEAD to moto and sends each answer back at most `rate` bytes/s: one connection to S3 gives
    tens of MB/s, however fast the node; that, not moto's speed, is what parallel ranges work around."""

    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int] = ("127.0.0.1", 0)
    rate = 1.0

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        upstream = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            upstream.request(self.command, self.path, headers=headers)
            answer = upstream.getresponse()
            self.send_response_only(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                    self.send_header(name, value)
            self.end_headers()
            self._send(answer, self.command != "HEAD")
        finally:
            upstream.close()

    do_HEAD = do_GET

    def _send(self, answer: http.client.HTTPResponse, body: bool) -> None:
        began, sent = time.perf_counter(), 0
        while body and (chunk := answer.read(1 << 16)):
            try:
                self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):  # s3fs's get opens a whole-file GET, then drops it
                return
            sent += len(chunk)
            time.sleep(max(0.0, sent / self.rate - (time.perf_counter() - began)))
        self.wfile.flush()


def serve_throttled(port: int, upstream_port: int, rate: float) -> None:
    handler = type("Handler", (Throttled,), {"upstream": ("127.0.0.1", upstream_port), "rate": rate})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.serve_forever()


def start_throttle(endpoint: str, mbps: float) -> tuple[multiprocessing.Process, str]:
    """The throttling proxy in its own process (in this one it would share the client's interpreter lock)."""
    port = free_port()
    upstream = int(endpoint.rsplit(":", 1)[1])
    proc = multiprocessing.get_context("spawn").Process(
        target=serve_throttled, args=(port, upstream, mbps * 1e6), daemon=True
    )
    proc.start()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("throttling proxy did not start")


def upload(fs: object, files: int, file_mb: int) -> dict[str, str]:
    """Upload the folder; return sha256 per file name."""
    contents = {f"model-{i:05d}-of-{files:05d}.safetensors": os.urandom(file_mb << 20) for i in range(files)}
    contents |= {"config.json": b'{"model_type": "llama"}', "tokenizer.json": os.urandom(2 << 20), "x.txt": b"x"}
    fs.mkdir("bench")
    for name, data in contents.items():
        fs.pipe_file(f"bench/model/{name}", data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}


def check(folder: Path, digests: dict[str, str]) -> bool:
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    return got == digests


def timed(copy: Callable[[Path], None], scratch: Path, digests: dict[str, str]) -> tuple[float, bool]:
    folder = scratch / "copy"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    began = time.perf_counter()
    copy(folder)
    seconds = time.perf_counter() - began
    return seconds, check(folder, digests)


def methods(fs: object, args: argparse.Namespace) -> dict[str, Callable[[Path], None]]:
    entries = sorted(fs.ls("bench/model", detail=True), key=lambda e: e["name"])
    names = [e["name"] for e in entries]
    settings = download.Settings(args.concurrency, args.part_mb << 20)

    def get(folder: Path, **kw: int) -> None:
        for name in names:
            fs.get(name, str(folder / Path(name).name), **kw)

    return {
        "get": get,
        "get, one stream": lambda folder: get(folder, max_concurrency=1),
        "ranged": lambda folder: download.copy(
            fs, [download.remote(e) for e in entries], folder, key="b", settings=settings
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--file-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=download.DEFAULT_CONCURRENCY)
    parser.add_argument("--part-mb", type=int, default=32)
    parser.add_argument("--stream-mbps", type=float, default=0.0, help="limit each connection to this many MB/s")
    args = parser.parse_args()
    if min(args.files, args.file_mb, args.repeats, args.concurrency, args.part_mb) < 1 or args.stream_mbps < 0:
        parser.error("every count and size must be a positive integer (--stream-mbps: 0 or more)")
    proc, endpoint = start_moto()
    throttle = None
    try:
        import s3fs

        pool = {"max_pool_connections": max(args.concurrency, 10)}
        digests = upload(s3fs.S3FileSystem(config_kwargs=pool), args.files, args.file_mb)
        if args.stream_mbps:
            throttle, endpoint = start_throttle(endpoint, args.stream_mbps)
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, config_kwargs=pool, skip_instance_cache=True)
        return report(fs, args, digests)
    finally:
        if throttle is not None:
            throttle.terminate()
            throttle.join(timeout=10)
        proc.terminate()
        proc.wait(timeout=10)


def report(fs: object, args: argparse.Namespace, digests: dict[str, str]) -> int:
    total = args.files * (args.file_mb << 20) + (2 << 20) + 24
    limit = f", each connection limited to {args.stream_mbps:g} MB/s" if args.stream_mbps else ""
    print(
        f"moto S3 on 127.0.0.1{limit}, {len(digests)} files, {total / 2**20:.0f} MiB; ranged: {args.concurrency} x "
        f"{args.part_mb} MiB parts; median of {args.repeats}"
    )
    times: dict[str, list[float]] = {}
    ok = True
    with tempfile.TemporaryDirectory() as scratch:
        copies = methods(fs, args)
        for _ in range(args.repeats):
            for name, copy in copies.items():
                seconds, same = timed(copy, Path(scratch), digests)
                times.setdefault(name, []).append(seconds)
                ok = ok and same
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        ratio = medians["get, one stream"] / seconds
        print(f"{name:16s} {seconds:6.2f} s  {total / seconds / 1e6:7.1f} MB/s  x{ratio:.2f} vs one stream")
    print(f"ranged / get: x{medians['get'] / medians['ranged']:.2f}")
    print("all copies byte-identical" if ok else "FAIL: a copy differs from the upload")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
