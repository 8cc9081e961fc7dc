"""One capturing driver per store run: an exclusive lease object with a heartbeat.

Two drivers planning the same run at once would hand the same free shard slots to different prompts, and a
marker of one could end up over the data of the other. So a driver takes `runs/<run>/lease.json` (created
exclusively, as registry versions are) before it plans, refreshes it every `heartbeat_s`, and deletes it when
capture ends. Another driver waits while the lease is live and takes it over when it is stale: its heartbeat is
older than `ttl_s`, or its holder ran on this host and that process is gone (a killed driver's rerun starts at
once). The heartbeat also re-reads the lease: if another driver took it over, `check()` fails the run before
it writes more. Staleness compares the holder's clock with ours: keep node clocks in sync (NTP) well within ttl.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

from cna_dist.clock import SYSTEM_CLOCK, Clock
from cna_dist.errors import RunFailure
from cna_dist.store.objects import AlreadyExists, ClaimContended, open_objects, split_uri

TTL_S = 300.0
HEARTBEAT_S = 30.0
WAIT_S = 3600.0
POLL_S = 5.0
CONTENDED_S = 0.2  # the most a driver backs off when a rival's claim on the lease is in flight


def _alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether the holder's process still runs, when it ran on this host; None when we cannot tell."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


class Lease:
    """The lease object at `uri`. Heartbeat times, staleness, waiting and polling all read `clock`.

    The heartbeat thread calls `beat()` every `heartbeat_s` (real seconds: it only paces the thread, and `release`
    must not wait for it); a test with a fake clock calls `beat()` itself.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        ttl_s: float = TTL_S,
        heartbeat_s: float = HEARTBEAT_S,
        wait_s: float = WAIT_S,
        poll_s: float = POLL_S,
        echo: Callable[[str], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.uri = uri
        self.storage_options = storage_options or {}
        self.clock = clock
        root, self.key = split_uri(uri)
        self.objects = open_objects(root, self.storage_options, clock=clock)
        self.ttl_s, self.heartbeat_s, self.wait_s, self.poll_s = ttl_s, heartbeat_s, wait_s, poll_s
        self.echo = echo
        self.owner = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(
            {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": self.clock.time()}
        ).encode()

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.objects.get(self.key))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # unreadable (a writer died mid-put on a store without atomic puts): stale by its age

    def _stale(self, holder: dict[str, Any]) -> bool:
        if _alive_here(holder) is False:
            return True
        beat = holder.get("heartbeat")
        if not isinstance(beat, int | float):
            try:
                beat = self.objects.modified(self.key)
            except (OSError, NotImplementedError):
                beat = None
            if beat is None:
                return False
        return self.clock.time() - beat > self.ttl_s

    def _take(self) -> dict[str, Any] | None:
        """Create the lease, clearing a stale one first; the live holder's record when it is not ours to take."""
        while True:
            try:
                self.objects.create_if_absent(self.key, self._body())
                return None
            except ClaimContended:  # a rival is creating it right now (claims-only S3): let one of us win
                self.clock.sleep(random.uniform(0, CONTENDED_S))
                continue
            except AlreadyExists:
                pass
            holder = self.holder()
            if holder is None:
                continue  # released between our create and our read: try again at once
            if not self._stale(holder):
                return holder
            self.objects.delete(self.key)

    def acquire(self) -> Lease:
        deadline = self.clock.monotonic() + self.wait_s
        told = False
        while (holder := self._take()) is not None:
            who = f"{holder.get('host')}:{holder.get('pid')}"
            if self.clock.monotonic() >= deadline:
                raise RunFailure(
                    f"{self.uri} is held by the driver {who}, which is still capturing this run "
                    f"(waited {self.wait_s:.0f} s); one driver captures a run at a time"
                )
            if not told and self.echo is not None:
                self.echo(f"waiting for {who} to finish capturing this run ({self.uri})")
                told = True
            self.clock.sleep(self.poll_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cna-lease", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self.beat():
            pass

    def beat(self) -> bool:
        """One heartbeat: re-read the lease and refresh it while it is ours; False (and `lost` set) once it is not."""
        try:
            holder = json.loads(self.objects.get(self.key))
        except FileNotFoundError:
            holder = None
        except ValueError:
            holder = {}
        except OSError:
            return True  # the store did not answer (its retries spent): a missed beat, as a failed put below is
        if not holder or holder.get("owner") != self.owner:
            self.lost = f"lease {self.uri} was taken over by {holder and holder.get('host')}"
            return False
        try:
            self.objects.put(self.key, self._body())
        except OSError:
            pass  # a missed beat only brings staleness nearer; the next one retries
        return True

    def check(self) -> None:
        if self.lost:
            raise RunFailure(f"{self.lost}: stopping before this run writes more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.holder()
        if holder and holder.get("owner") == self.owner:
            self.objects.delete(self.key)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
