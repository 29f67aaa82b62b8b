"""A work queue of keys, in the spirit of client-go's rate-limited workqueue.

Level-triggered control needs keys, not events: a key added many times before a worker takes it
is processed once (coalescing); a key being processed that is added again is processed once more
afterwards, never by two workers at once; failures come back after a per-key exponential backoff
(reset by ``forget``) that is also bounded by a queue-wide token bucket, so a storm of errors
cannot hammer the API server. The clock is a parameter, so tests drive time without sleeping.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Per-key exponential backoff: base * 2**failures, capped."""

    base_s: float = 0.05
    cap_s: float = 30.0
    failures: dict[str, int] = field(default_factory=dict)

    def next_delay(self, key: str) -> float:
        n = self.failures.get(key, 0)
        self.failures[key] = n + 1
        return float(min(self.cap_s, self.base_s * (2**n)))

    def forget(self, key: str) -> None:
        self.failures.pop(key, None)

    def retries(self, key: str) -> int:
        return self.failures.get(key, 0)


@dataclass
class TokenBucket:
    """Overall retry rate limit: ``rate`` tokens per second, ``burst`` at most; returns the wait for one token."""

    rate: float = 10.0
    burst: int = 100
    tokens: float = 100.0
    last: float | None = None

    def reserve(self, now: float) -> float:
        if self.last is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class ShutDown(Exception):
    """The queue was shut down; workers should return."""


class WorkQueue:
    def __init__(self, clock: Callable[[], float] = time.monotonic, backoff: Backoff | None = None,
                 bucket: TokenBucket | None = None) -> None:
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._bucket = bucket or TokenBucket()
        self._cond = threading.Condition()
        self._order: list[str] = []  # FIFO of dirty keys not being processed
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._delayed: list[tuple[float, int, str]] = []  # (due, seq, key)
        self._due: dict[str, float] = {}  # earliest due time of each delayed key (one heap entry counts)
        self._seq = 0
        self._shutdown = False

    # -- adding ------------------------------------------------------------------------------
    def add(self, key: str) -> None:
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: str) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._order.append(key)
            self._cond.notify()

    def add_after(self, key: str, delay_s: float) -> None:
        if delay_s <= 0:
            self.add(key)
            return
        with self._cond:
            due = self._clock() + delay_s
            if self._due.get(key, float("inf")) <= due:
                return  # already scheduled no later than this: adding again would only repeat work
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._delayed, (due, self._seq, key))
            self._cond.notify()

    def add_rate_limited(self, key: str) -> float:
        """Re-add after the key's backoff (and the global bucket); returns the delay chosen."""
        with self._cond:
            delay = max(self._backoff.next_delay(key), self._bucket.reserve(self._clock()))
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        with self._cond:
            self._backoff.forget(key)

    def retries(self, key: str) -> int:
        with self._cond:
            return self._backoff.retries(key)

    # -- taking ------------------------------------------------------------------------------
    def _promote_locked(self) -> float | None:
        """Move due delayed keys into the queue; return seconds until the next one is due."""
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) != due:
                continue  # superseded by an earlier entry for the same key, which already fired
            del self._due[key]
            self._add_locked(key)
        return self._delayed[0][0] - now if self._delayed else None

    def get(self, timeout_s: float | None = None) -> str | None:
        """Next key to process (mark it processing); None on timeout; raises ShutDown."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._shutdown:
                    raise ShutDown
                wait = self._promote_locked()
                if self._order:
                    key = self._order.pop(0)
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(timeout=wait if wait is None else max(wait, 0.001))

    def done(self, key: str) -> None:
        """Processing of ``key`` finished; if it was added meanwhile, it goes back in the queue."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._order.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._order)

    def depth(self) -> int:
        """Keys waiting now or later (what the queue-depth metric reports)."""
        with self._cond:
            return len(self._order) + len(self._due)
