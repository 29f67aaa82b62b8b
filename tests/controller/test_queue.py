"""The work queue coalesces keys, never hands one key to two workers, and backs off failures."""

from __future__ import annotations

import threading

import pytest

from controller.reconciler.queue import Backoff, ShutDown, TokenBucket, WorkQueue


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def drain(q: WorkQueue) -> list[str]:
    out = []
    while (k := q.get(timeout_s=0)) is not None:
        out.append(k)
        q.done(k)
    return out


def test_repeated_adds_coalesce_and_keep_fifo_order() -> None:
    q = WorkQueue(clock=FakeClock())
    for k in ["a", "b", "a", "c", "b", "a"]:
        q.add(k)
    assert len(q) == 3
    assert drain(q) == ["a", "b", "c"]


def test_key_added_while_processing_comes_back_once_after_done() -> None:
    q = WorkQueue(clock=FakeClock())
    q.add("a")
    assert q.get(timeout_s=0) == "a"
    q.add("a")
    q.add("a")
    assert q.get(timeout_s=0) is None  # not handed to a second worker while in flight
    q.done("a")
    assert q.get(timeout_s=0) == "a"
    q.done("a")
    assert q.get(timeout_s=0) is None


def test_add_after_waits_for_the_clock() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add_after("a", 5.0)
    assert q.get(timeout_s=0) is None
    clock.t += 4.9
    assert q.get(timeout_s=0) is None
    clock.t += 0.2
    assert q.get(timeout_s=0) == "a"


def test_backoff_is_exponential_capped_and_forgotten_on_success() -> None:
    b = Backoff(base_s=0.1, cap_s=1.0)
    delays = [b.next_delay("k") for _ in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert b.next_delay("other") == pytest.approx(0.1)  # per key
    b.forget("k")
    assert b.next_delay("k") == pytest.approx(0.1)


def test_rate_limited_requeue_uses_backoff_and_bucket() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock, backoff=Backoff(base_s=1.0, cap_s=8.0), bucket=TokenBucket(rate=1.0, burst=1, tokens=1))
    assert q.add_rate_limited("a") == pytest.approx(1.0)
    assert q.add_rate_limited("a") == pytest.approx(2.0)
    assert q.retries("a") == 2
    # the bucket is empty now: a fresh key waits for a token even though its own backoff is short
    assert q.add_rate_limited("b") == pytest.approx(2.0)
    q.forget("a")
    assert q.retries("a") == 0


def test_token_bucket_refills_with_time() -> None:
    b = TokenBucket(rate=2.0, burst=2, tokens=2)
    assert b.reserve(0.0) == 0 and b.reserve(0.0) == 0
    assert b.reserve(0.0) == pytest.approx(0.5)
    assert b.reserve(10.0) == 0  # refilled (capped at burst)


def test_shutdown_wakes_blocked_workers() -> None:
    q = WorkQueue()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            q.get()
        except ShutDown as exc:
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    q.shutdown()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1


def test_delayed_adds_of_one_key_collapse_to_the_earliest() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    for delay in (3.0, 1.0, 2.0, 1.5):
        q.add_after("pool", delay)
    assert q.depth() == 1
    clock.t += 1.0
    assert drain(q) == ["pool"]
    clock.t += 5.0
    assert drain(q) == []  # the later entries were not queued again
    q.add_after("pool", 1.0)
    clock.t += 1.0
    assert drain(q) == ["pool"]
