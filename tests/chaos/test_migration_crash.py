"""The controller SIGKILLed right after a migration's eviction: the migration limit holds across the
crash, the dead run's node fence (cordon) does not outlive it, protected pods stay, the replica runs.

The fleet of ``tests/controller/test_reschedule_cluster.py``: three 8-GPU nodes, each half full (two
2-GPU pods under a PDB allowing no disruption on node 0, a movable 4-GPU pod on node 1, a 4-GPU
do-not-move pod on node 2); an 8-GPU replica then goes Pending. Rescheduling is on with at most one
migration per 20 s cycle. The controller is killed right after its eviction (fault point
``migration.after_evict``), with node 1 still cordoned by its fence. A controller that counted the
limit in memory would let its successor start a fresh batch at once; the limit is kept in the
cluster (``controller/executor/migration_budget.py``), so the successor moves nothing more in that
cycle, then lifts the dead run's fence and the replica runs.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from controller.kube import Kube, KubeError
from tests.chaos.cluster_faults import Controller
from tests.chaos.records import ChaosRecorder
from tests.controller.cluster_helpers import wait_for
from tests.controller.test_reschedule_cluster import _deployment, _fragmented_fleet
from wattplane.testcluster import POOL_LABEL, TestCluster

pytestmark = [pytest.mark.chaos, pytest.mark.cluster]
LIMIT = 1
CYCLE_S = 20.0


@pytest.fixture
def rescheduling(kube: Kube) -> Iterator[None]:
    try:
        before: dict[str, Any] | None = kube.get("FleetPolicy", "default")
    except KubeError:
        before = None
    spec = {"policies": {"placement": True, "rescheduling": True}, "reconcilePeriodS": CYCLE_S,
            "disruption": {"maxMigrationsPerCycle": LIMIT, "maxConcurrent": 1, "maxReplicaRemovalsPerCycle": 10}}
    if before is None:
        kube.create("FleetPolicy", {"apiVersion": "wattplane.io/v1alpha1", "kind": "FleetPolicy",
                                    "metadata": {"name": "default"}, "spec": spec})
    else:
        kube.patch("FleetPolicy", "default", {"spec": spec})
    yield
    if before is None:
        kube.delete("FleetPolicy", "default")
    else:
        kube.request("PUT", "/apis/wattplane.io/v1alpha1/fleetpolicies/default",
                     body={**kube.get("FleetPolicy", "default"), "spec": before["spec"]})


class Evictions:
    """Every pod whose deletion starts (an eviction), time-stamped."""

    def __init__(self, api: client.ApiClient, ns: str) -> None:
        self.core, self.ns = client.CoreV1Api(api), ns
        self.at: dict[str, float] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._watch,)]
        for t in self.threads:
            t.start()

    def _watch(self) -> None:
        while not self.stop.is_set():
            for ev in watch.Watch().stream(self.core.list_namespaced_pod, self.ns, timeout_seconds=2):
                pod = ev["object"]
                if (pod.metadata.deletion_timestamp is not None or ev["type"] == "DELETED") and \
                        pod.metadata.name not in self.at:
                    self.at[pod.metadata.name] = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)


def test_sigkill_mid_migration_keeps_the_limit_across_the_restart(
        test_cluster: TestCluster, kube: Kube, rescheduling: None, tmp_path: Path, chaos: ChaosRecorder) -> None:
    pool, ns, _ = _fragmented_fleet(test_cluster, kube, serving_md=False)
    api = test_cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    protected = {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(ns, label_selector="app in (a,c,d)")
                 .items}
    seen = Evictions(api, ns)
    lease = f"mig-{uuid.uuid4().hex[:6]}"
    procs: list[Controller] = []
    try:
        with chaos.attempt("SIGKILL right after a migration's eviction") as a:
            armed = Controller(test_cluster.kubeconfig, tmp_path, lease, "armed", faults="migration.after_evict=1",
                               extra_args=("--drain-seconds", "0"))
            procs.append(armed)
            wait_for(armed.is_leader, 60, what="the armed controller leads")
            apps.create_namespaced_deployment(ns, _deployment("big", pool, 8))
            try:
                armed.proc.wait(90)
            except Exception as exc:
                raise AssertionError(f"the armed controller never evicted:\n{armed.log_tail()}") from exc
            t_kill = time.monotonic()
            assert armed.fired() == ["migration.after_evict 1"], armed.fired()
            cm = kube.get("ConfigMap", "wattplane-migration-budget", "default")
            first = len(seen.at)
            fenced = [n.metadata.name for n in core.list_node(label_selector=f"{POOL_LABEL}={pool}").items
                      if n.spec.unschedulable]
            fresh = Controller(test_cluster.kubeconfig, tmp_path, lease, "restarted",
                               extra_args=("--drain-seconds", "0"))
            procs.append(fresh)
            wait_for(fresh.is_leader, 60, what="the restarted controller leads")
            window_end = float(cm["data"]["windowStart"]) + CYCLE_S
            def big_running() -> bool:
                return any(p.status.phase == "Running" for p in
                           core.list_namespaced_pod(ns, label_selector="app=big").items)

            ran_at = None
            while time.time() < window_end - 0.5:  # within the dead controller's cycle
                if ran_at is None and big_running():
                    ran_at = time.monotonic()
                time.sleep(0.2)
            in_cycle = len(seen.at)
            if ran_at is None:
                wait_for(big_running, 120, what="the 8-GPU replica Running")
                ran_at = time.monotonic()
            a.converge_s = ran_at - t_kill
            time.sleep(2.0)
            cordoned = [n.metadata.name for n in core.list_node(label_selector=f"{POOL_LABEL}={pool}").items
                        if n.spec.unschedulable]
            untouched = {p.metadata.name: p.metadata.uid for p in
                         core.list_namespaced_pod(ns, label_selector="app in (a,c,d)").items} == protected
            a.detail = {"evicted_before_kill": first, "evicted_in_cycle": in_cycle, "evicted_total": len(seen.at),
                        "reserved": cm["data"]["count"], "fenced_at_kill": fenced, "cordoned_after": cordoned,
                        "protected_untouched": untouched}
            print(f"\nmigration crash: the armed controller evicted {sorted(seen.at)} and died (budget reserved "
                  f"{cm['data']['count']} of {LIMIT} for the {CYCLE_S:.0f} s cycle; node(s) left cordoned by its "
                  f"fence: {fenced}); its successor led and evicted nothing more in that cycle ({in_cycle} in all "
                  f"by its end); the 8-GPU replica ran {a.converge_s:.1f} s after the kill; {len(seen.at)} "
                  f"evictions in all; PDB-protected and do-not-move pods untouched: {untouched}; nodes left "
                  f"cordoned: {cordoned}")
            assert first == 1
            assert in_cycle <= LIMIT, f"{in_cycle} migrations in one {CYCLE_S:.0f} s cycle (limit {LIMIT})"
            assert untouched, "a PDB-protected or do-not-move pod was moved"
            assert not cordoned, f"cordons left behind: {cordoned}"
    finally:
        seen.close()
        for c in procs:
            c.terminate()
        apps.delete_collection_namespaced_deployment(ns)
