"""The run lease: one capturing driver per run, on local disk and on S3; stale leases are taken over."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from cna_dist.errors import RunFailure
from cna_dist.io.lease import Lease


@pytest.fixture(params=["local", "s3"])
def lease_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "r1" / "lease.json")
    request.getfixturevalue("s3_server")
    return f"s3://cna/{uuid.uuid4().hex}/runs/r1/lease.json"


def test_a_live_lease_makes_the_second_driver_wait_then_fail(lease_uri: str) -> None:
    with Lease(lease_uri, heartbeat_s=0.2, ttl_s=1.0):
        said: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(RunFailure, match="still capturing this run"):
            Lease(lease_uri, wait_s=1.5, poll_s=0.1, ttl_s=1.0, echo=said.append).acquire()
        assert time.monotonic() - t0 >= 1.5  # it waited, and the heartbeat kept the first lease fresh past ttl
        assert len(said) == 1 and "waiting for" in said[0]
    second = Lease(lease_uri, wait_s=0).acquire()  # released: free at once
    second.release()
    assert second.holder() is None


def test_the_waiting_driver_gets_the_lease_when_it_is_released(lease_uri: str) -> None:
    first = Lease(lease_uri).acquire()
    threading.Timer(0.5, first.release).start()
    second = Lease(lease_uri, wait_s=30, poll_s=0.1).acquire()
    assert second.holder()["owner"] == second.owner
    second.release()


def test_a_stale_heartbeat_is_taken_over_and_the_old_holder_notices(lease_uri: str) -> None:
    old = Lease(lease_uri, heartbeat_s=0.3)
    old.acquire()
    old._stop.set()  # a driver that hangs: no more heartbeats, but it still thinks it holds the lease
    old._thread.join()
    time.sleep(1.2)
    new = Lease(lease_uri, ttl_s=1.0, wait_s=0).acquire()
    assert new.holder()["owner"] == new.owner
    old._stop.clear()
    old._thread = threading.Thread(target=old._beat)
    old._thread.start()
    time.sleep(0.8)
    with pytest.raises(RunFailure, match="taken over"):
        old.check()
    old.release()  # does not delete the new holder's lease
    assert new.holder()["owner"] == new.owner
    new.release()


def test_a_dead_driver_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    uri = str(tmp_path / "lease.json")
    code = "import sys; from cna_dist.io.lease import Lease; Lease(sys.argv[1]).acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code, uri], check=True)  # exits holding the lease, never releases
    held = json.loads(Path(uri).read_text())
    lease = Lease(uri, wait_s=0).acquire()  # the holder's pid is gone: no wait for the ttl
    assert lease.holder()["owner"] != held["owner"]
    lease.release()
