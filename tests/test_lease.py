"""The run lease: one capturing driver per run, on local disk and on S3; stale leases are taken over.

Time is a FakeClock: waiting, polling, heartbeat stamps and staleness all move only when the test moves them, and
heartbeats are driven by the test (`Lease.beat()`), so no test sleeps against a ttl or measures a duration. Two
tests at the end check the real heartbeat thread on the real clock, waiting for an event, not a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cna_dist.errors import RunFailure
from cna_dist.store.lease import Lease
from cna_dist.store.objects import open_objects, split_uri
from tests.fakeclock import FakeClock


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def lease_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "r1" / "lease.json")
    request.getfixturevalue("s3_server")
    return f"s3://cna/{uuid.uuid4().hex}/runs/r1/lease.json"


def test_a_live_lease_makes_the_second_driver_wait_then_fail(lease_uri: str) -> None:
    clock = FakeClock()
    first = Lease(lease_uri, ttl_s=3.0, clock=clock).acquire()
    clock.call_every(1.0, first.beat, until=60.0)  # the holder beats every second of the fake timeline
    said: list[str] = []
    with pytest.raises(RunFailure, match="still capturing this run"):
        Lease(lease_uri, wait_s=10.0, poll_s=0.5, ttl_s=3.0, echo=said.append, clock=clock).acquire()
    assert clock.monotonic() >= 10.0  # it waited its whole wait_s, more than three ttls, and found the lease live
    assert len(said) == 1 and "waiting for" in said[0]
    assert first.holder()["owner"] == first.owner and first.lost is None  # kept fresh by its heartbeat
    first.release()
    second = Lease(lease_uri, wait_s=0, clock=clock).acquire()  # released: free at once
    second.release()
    assert second.holder() is None


def test_the_waiting_driver_gets_the_lease_when_it_is_released(lease_uri: str) -> None:
    clock = FakeClock()
    first = Lease(lease_uri, clock=clock).acquire()
    clock.call_at(5.0, first.release)
    second = Lease(lease_uri, wait_s=30.0, poll_s=0.5, clock=clock).acquire()
    assert second.holder()["owner"] == second.owner
    assert 5.0 <= clock.monotonic() < 30.0  # it got the lease at the first poll after the release
    second.release()


def test_a_stale_heartbeat_is_taken_over_and_the_old_holder_notices(lease_uri: str) -> None:
    clock = FakeClock()
    old = Lease(lease_uri, ttl_s=60.0, clock=clock).acquire()  # then hangs: no more heartbeats
    clock.advance(59.0)
    with pytest.raises(RunFailure, match="still capturing"):  # not stale yet
        Lease(lease_uri, ttl_s=60.0, wait_s=0, clock=clock).acquire()
    clock.advance(2.0)
    new = Lease(lease_uri, ttl_s=60.0, wait_s=0, clock=clock).acquire()
    assert new.holder()["owner"] == new.owner
    assert old.beat() is False  # its next heartbeat sees the new holder and does not write
    with pytest.raises(RunFailure, match="taken over"):
        old.check()
    old.release()  # does not delete the new holder's lease
    assert new.holder()["owner"] == new.owner
    new.check()
    new.release()


def test_an_unreadable_lease_is_stale_by_its_age(lease_uri: str) -> None:
    """A lease without a readable heartbeat (a writer died mid-put) ages by the store's own write time."""
    folder, key = split_uri(lease_uri)
    open_objects(folder).put(key, b'{"owner": "half-writ')
    clock = FakeClock()  # starts at the real time, so it compares with the store's write time
    with pytest.raises(RunFailure, match="still capturing"):
        Lease(lease_uri, ttl_s=60.0, wait_s=0, clock=clock).acquire()
    clock.advance(61.0)
    lease = Lease(lease_uri, ttl_s=60.0, wait_s=0, clock=clock).acquire()
    assert lease.holder()["owner"] == lease.owner
    lease.release()


def test_a_dead_driver_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    uri = str(tmp_path / "lease.json")
    code = "import sys; from cna_dist.store.lease import Lease; Lease(sys.argv[1]).acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code, uri], check=True)  # exits holding the lease, never releases
    held = json.loads(Path(uri).read_text())
    lease = Lease(uri, wait_s=0, clock=FakeClock()).acquire()  # the holder's pid is gone: no wait for the ttl
    assert lease.holder()["owner"] != held["owner"]
    lease.release()


def test_a_driver_on_another_host_is_taken_over_only_after_its_lease_expires(lease_uri: str) -> None:
    """A holder on another host cannot be asked whether it lives (its pid means nothing here: pid 1 always runs
    on this host), so only its heartbeat's age frees the lease: refused within the ttl, taken over after it."""
    folder, key = split_uri(lease_uri)
    clock = FakeClock()
    body = {"owner": "driver-on-node-b", "host": "node-b.cluster.internal", "pid": 1, "heartbeat": clock.time()}
    open_objects(folder).put_json(key, body)
    clock.advance(299.0)
    with pytest.raises(RunFailure, match="held by the driver node-b.cluster.internal:1"):
        Lease(lease_uri, wait_s=0, clock=clock).acquire()  # the default ttl, 300 s, not yet past
    said: list[str] = []
    lease = Lease(lease_uri, wait_s=10.0, poll_s=2.0, echo=said.append, clock=clock).acquire()
    assert lease.holder()["owner"] == lease.owner and 300.0 < clock.time() - body["heartbeat"] <= 302.0
    assert len(said) == 1 and "node-b.cluster.internal:1" in said[0]  # it waited, said for whom, then took over
    lease.release()


def until(condition: Callable[[], bool], limit_s: float = 30.0) -> bool:
    """Whether `condition` became true within limit_s: waiting for an event, never asserting a duration."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_the_heartbeat_thread_refreshes_the_lease(tmp_path: Path) -> None:
    lease = Lease(str(tmp_path / "lease.json"), heartbeat_s=0.02).acquire()
    first = lease.holder()["heartbeat"]
    assert until(lambda: lease.holder()["heartbeat"] != first)
    lease.release()
    assert lease.holder() is None


def test_the_heartbeat_thread_notices_a_takeover(tmp_path: Path) -> None:
    lease = Lease(str(tmp_path / "lease.json"), heartbeat_s=0.02).acquire()
    open_objects(str(tmp_path)).put_json("lease.json", {"owner": "someone-else", "host": "elsewhere", "pid": 1})
    assert until(lambda: lease.lost is not None)
    with pytest.raises(RunFailure, match="taken over by elsewhere"):
        lease.check()
    lease.release()  # the thread has ended; the other holder's lease stays
    assert lease.holder()["owner"] == "someone-else"
