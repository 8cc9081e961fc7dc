"""Azurite (Microsoft's Azure Storage emulator, the `azurite` npm package) on 127.0.0.1, reached by adlfs through
AZURE_STORAGE_CONNECTION_STRING, as a deployment reaches its storage account.

Azurite is a Node program: `npm install -g azurite` puts `azurite-blob` on PATH (AZURITE_BLOB names another
executable). Where it is not installed the Azure tests are skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

CONTAINER = "cna"
# Azurite's fixed development account (published in its documentation; it guards nothing).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def executable() -> str | None:
    return os.environ.get("AZURITE_BLOB") or shutil.which("azurite-blob")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def azurite() -> Iterator[str]:
    """Start Azurite's blob service in memory, point adlfs at it, make container `cna`; yield its blob endpoint."""
    program = executable()
    if program is None:
        import pytest

        pytest.skip("Azurite is not installed (npm install -g azurite), so the Azure tests cannot run")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    workdir = tempfile.mkdtemp(prefix="azurite-")  # its debug log and extent files, were it to write any
    proc = subprocess.Popen(
        [program, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence", "--silent"]
        + ["--skipApiVersionCheck", "--loose"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};"
        )
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(300):  # Node starts in a second or two; much longer on a loaded machine
            if proc.poll() is not None:
                raise RuntimeError(f"Azurite exited at start with status {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        import fsspec

        fsspec.filesystem("az").mkdir(CONTAINER)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
