"""The write fence: a leader whose Lease lapsed (e.g. it was paused) refuses writes before sending them."""

from __future__ import annotations

import pytest
from kubernetes import client

from controller.kube import Kube, NotLeader
from controller.reconciler.leader import LeaderElector
from tests.controller.test_leader import LeaseStore


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_holds_only_while_renewed_within_the_deadline() -> None:
    clock = Clock()
    e = LeaderElector(LeaseStore(), "default", "l", "me", lease_duration_s=3, renew_deadline_s=2,  # type: ignore[arg-type]
                      clock=clock)
    assert not e.holds()  # not elected
    assert e.try_acquire_or_renew()
    e.last_renew = clock()
    e.is_leader.set()
    assert e.holds()
    clock.t += 1.9
    assert e.holds()
    clock.t += 0.2  # paused past the renew deadline: no renew happened, whatever the threads think
    assert not e.holds()


def test_kube_refuses_writes_but_not_reads_or_lease_renewals_when_fenced() -> None:
    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"  # nothing listens: a request that got through would fail differently
    kube = Kube(client.ApiClient(cfg))
    kube.may_write = lambda: False
    with pytest.raises(NotLeader):
        kube.patch("ModelDeployment", "m", {"spec": {}}, "ns")
    with pytest.raises(NotLeader):
        kube.apply({"kind": "Deployment", "metadata": {"name": "d", "namespace": "ns"}})
    with pytest.raises(Exception) as err:  # a read goes out (and fails to connect), it is not fenced
        kube.request("GET", "/api/v1/namespaces", timeout=0.5)
    assert not isinstance(err.value, NotLeader)
    with pytest.raises(Exception) as err:
        kube.replace("Lease", {"metadata": {"name": "l", "namespace": "default"}}, "default")
    assert not isinstance(err.value, NotLeader)
