"""Lease-based leader election against an in-memory Lease store with optimistic concurrency."""

from __future__ import annotations

import copy
from typing import Any

from controller.kube import KubeError
from controller.reconciler.leader import LeaderElector


class LeaseStore:
    """Just enough of the API server for one Lease: get/create/replace with resourceVersion checks."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        if self.lease is None:
            raise KubeError(404, "not found")
        return copy.deepcopy(self.lease)

    def create(self, kind: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        if self.lease is not None:
            raise KubeError(409, "already exists")
        return self._store(body)

    def replace(self, kind: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise KubeError(409, "the object has been modified")
        return self._store(body)

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.lease)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def elector(store: LeaseStore, clock: Clock, identity: str) -> LeaderElector:
    return LeaderElector(store, "ns", "lease", identity, lease_duration_s=10, renew_deadline_s=6,  # type: ignore[arg-type]
                         retry_s=1, clock=clock, wall=lambda: 1_700_000_000 + clock.t)


def test_one_leader_then_takeover_only_after_expiry_on_the_candidates_clock() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    for _ in range(5):  # a keeps renewing: b never gets it
        clock.t += 3
        assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    # a dies; b must see the lease unchanged for a full lease duration before taking it
    clock.t += 9
    assert not b.try_acquire_or_renew()
    clock.t += 2
    assert b.try_acquire_or_renew()
    assert store.lease is not None and store.lease["spec"]["holderIdentity"] == "b"
    assert store.lease["spec"]["leaseTransitions"] == 2
    assert not a.try_acquire_or_renew()  # the old leader, back, does not steal it


def test_lost_race_on_write_is_not_leadership() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    clock.t += 11  # a stopped renewing: b may take over ...
    original = store.replace

    def racing_replace(kind: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        store.rv += 1  # ... but another candidate writes the Lease between b's read and b's write
        assert store.lease is not None
        store.lease["metadata"]["resourceVersion"] = str(store.rv)
        return original(kind, body, namespace)

    store.replace = racing_replace  # type: ignore[method-assign]
    assert b.try_acquire_or_renew() is False
    store.replace = original  # type: ignore[method-assign]
    assert store.lease is not None and store.lease["spec"]["holderIdentity"] == "a"


def test_release_hands_over_at_once() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    a.release()
    assert store.lease is not None and store.lease["spec"]["holderIdentity"] == ""
    assert b.try_acquire_or_renew()  # no waiting for expiry
