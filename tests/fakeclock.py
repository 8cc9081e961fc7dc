"""A clock for tests: time moves only when the test (or code under test) says so, never with the wall.

`sleep` advances the clock at once, so code that polls (a lease waiting for its holder) runs its whole wait in a
few milliseconds; callbacks scheduled with `call_at` run, in the sleeping thread, as soon as the clock reaches
them (a holder that releases or beats at a given moment). Nothing runs in the background: periodic work such as a
lease's heartbeat is called by the test (`Lease.beat()`), so every outcome is deterministic.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable


class FakeClock:
    """Satisfies `cna_dist.clock.Clock`. `time()` starts at the real wall time (comparable with a server's
    LastModified), `monotonic()` at 0; both move together by `advance` and `sleep`."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.time() if start is None else start
        self.now = 0.0
        self.slept: list[float] = []
        self._due: list[tuple[float, int, Callable[[], object]]] = []
        self._lock = threading.Lock()
        self._order = itertools.count()  # ties run in the order they were scheduled

    def time(self) -> float:
        return self.start + self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        """Move time forward, then run every callback that fell due, oldest first."""
        with self._lock:
            self.now += max(seconds, 0.0)
            due = sorted(d for d in self._due if d[0] <= self.now)
            self._due = [d for d in self._due if d[0] > self.now]
        for _, _, fn in due:
            fn()

    def call_at(self, when: float, fn: Callable[[], object]) -> None:
        """Run `fn` once `monotonic()` reaches `when`."""
        with self._lock:
            self._due.append((when, next(self._order), fn))

    def call_every(self, interval: float, fn: Callable[[], object], until: float) -> None:
        """Run `fn` every `interval` from now until `until` (monotonic): a heartbeat on the fake timeline."""
        when = self.now + interval
        while when <= until:
            self.call_at(when, fn)
            when += interval
