"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does it.

Exactly one controller acts: the holder renews the Lease every ``retry_s``; a candidate takes it
over only after it has gone un-renewed for ``lease_duration_s`` (observed on the candidate's own
clock, so clock skew between machines does not matter); every write carries the resourceVersion
it read (optimistic concurrency), so two candidates cannot both win. A leader that fails to renew
within ``renew_deadline_s`` stops leading (the process exits rather than risk two actors). On a
graceful shutdown the leader releases the Lease so a standby takes over at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from controller.kube import Kube, KubeError

log = logging.getLogger(__name__)


def micro_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, *, lease_duration_s: float = 15.0,
                 renew_deadline_s: float = 10.0, retry_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_s = retry_s
        self.clock = clock
        self.wall = wall
        self.is_leader = threading.Event()
        self.transitions = 0
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0  # our clock when it last changed
        self.last_renew = -1e18  # our clock at the last successful acquire/renew

    def _body(self, prev: dict[str, Any] | None, acquire: bool) -> dict[str, Any]:
        now = micro_time(self.wall())
        spec = dict((prev or {}).get("spec") or {})
        transitions = int(spec.get("leaseTransitions") or 0)
        if acquire and spec.get("holderIdentity") != self.identity:
            transitions += 1
            spec["acquireTime"] = now
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=max(1, round(self.lease_duration_s)),
                    renewTime=now, leaseTransitions=transitions)
        body: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
        if prev is not None:
            body["metadata"]["resourceVersion"] = prev["metadata"]["resourceVersion"]
        return body

    def try_acquire_or_renew(self) -> bool:
        """One round: True if we hold the lease afterwards."""
        try:
            lease = self.kube.get("Lease", self.name, self.namespace)
        except KubeError as exc:
            if exc.status != 404:
                raise
            try:
                self.kube.create("Lease", self._body(None, True), self.namespace)
            except KubeError as exc2:
                if exc2.status == 409:
                    return False
                raise
            self.transitions += 1
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        seen = (holder, str(spec.get("renewTime")))
        if seen != self._observed:
            self._observed = seen
            self._observed_at = self.clock()
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        if holder and holder != self.identity and self.clock() - self._observed_at < duration:
            return False  # someone else holds a live lease
        try:
            self.kube.replace("Lease", self._body(lease, holder != self.identity), self.namespace)
        except KubeError as exc:
            if exc.status == 409:  # lost the race: somebody wrote it first
                return False
            raise
        if holder != self.identity:
            self.transitions += 1
        return True

    def run(self, stop: threading.Event, on_started: Callable[[], None], on_stopped: Callable[[], None]) -> None:
        """Block: campaign until elected, then renew until ``stop`` or a missed renew deadline."""
        while not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    break
            except Exception as exc:  # API trouble: keep campaigning
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            stop.wait(self.retry_s)
        if stop.is_set():
            return
        log.info("%s became leader", self.identity)
        self.last_renew = self.clock()
        self.is_leader.set()
        on_started()
        while not stop.wait(self.retry_s):
            try:
                if self.try_acquire_or_renew():
                    self.last_renew = self.clock()
                    continue
                log.error("%s lost the lease to another holder", self.identity)
                break
            except Exception as exc:
                log.warning("renewing lease failed: %s", exc)
            if self.clock() - self.last_renew > self.renew_deadline_s:
                log.error("%s could not renew the lease within %.1fs", self.identity, self.renew_deadline_s)
                break
        was_stopped = stop.is_set()
        self.is_leader.clear()
        if was_stopped:
            self.release()
        on_stopped()

    def holds(self) -> bool:
        """Whether this instance may still act: it leads and renewed within the renew deadline.

        The write fence: a leader paused (SIGSTOP, a long GC, a frozen VM) past the Lease's expiry
        resumes with threads mid-pass and a stale cache; its renew loop notices the loss only on its
        next round. Checked before every write, this refuses them from the moment the deadline passed
        on our own monotonic clock, which keeps counting while the process is stopped.
        """
        return self.is_leader.is_set() and self.clock() - self.last_renew <= self.renew_deadline_s

    def release(self) -> None:
        """Give the lease up (graceful shutdown) so a standby need not wait for it to expire."""
        try:
            lease = self.kube.get("Lease", self.name, self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["leaseDurationSeconds"] = 1
            self.kube.replace("Lease", lease, self.namespace)
        except Exception as exc:  # best effort; the lease expires anyway
            log.warning("releasing lease failed: %s", exc)
