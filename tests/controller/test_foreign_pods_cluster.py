"""On a cluster shared with other workloads, replicas go where GPUs are free, not where another team's pods run.

Placement once counted every GPU of a pool as Wattplane's: a replica was placed into a pool whose GPUs
another team's pods held, and stayed Pending while a free pool sat empty. Here another team's
Deployment fills the pool the ModelDeployment prefers; its replicas must land in the free pool and run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from controller.kube import Kube
from tests.controller.cluster_helpers import MANAGED, ControllerProcess, md_body, pool_body, wait_for
from tests.controller.test_reschedule_cluster import _deployment
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster

def test_replicas_land_in_the_pool_other_workloads_leave_free(
        test_cluster: TestCluster, kube: Kube, tmp_path: Path, uid: str, other_team: str) -> None:
    api = test_cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    busy, free = f"busy-{uid}", f"free-{uid}"
    for pool in (busy, free):
        kube.create("AcceleratorPool", pool_body(pool))
    busy_nodes = set(test_cluster.add_gpu_nodes(busy, 2, gpus=8))
    free_nodes = set(test_cluster.add_gpu_nodes(free, 2, gpus=8))
    # another team's Deployment takes every GPU of the pool the ModelDeployment prefers
    body = _deployment("training", busy, 8)
    body["spec"]["replicas"] = 2
    apps.create_namespaced_deployment(other_team, body)
    wait_for(lambda: sorted(p.spec.node_name or "" for p in core.list_namespaced_pod(
        other_team, label_selector="app=training").items if p.status.phase == "Running") == sorted(busy_nodes),
        30, what="the other team's pods running on every node of the busy pool")

    ns = test_cluster.create_namespace(f"fp-{uid}")
    kube.create("ModelDeployment", md_body("m", ns, busy, tp=8, min_replicas=2, max_replicas=2,
                                           allowedPools=[busy, free], preferredPools=[busy]), ns)
    proc = ControllerProcess(test_cluster.kubeconfig, tmp_path, f"fp-{uid}", "fp")
    try:
        def running_where() -> list[str] | None:
            pods = [p for p in core.list_namespaced_pod(ns, label_selector=MANAGED).items
                    if not p.metadata.deletion_timestamp]
            if len(pods) == 2 and all(p.status.phase == "Running" for p in pods):
                return sorted(p.spec.node_name for p in pods)
            return None

        try:
            nodes = wait_for(running_where, 45, 0.5, what="both replicas Running")
        except AssertionError as exc:
            pods = core.list_namespaced_pod(ns, label_selector=MANAGED).items
            seen = [(p.metadata.name, p.status.phase, p.spec.node_name) for p in pods]
            raise AssertionError(f"{exc}: {seen}\n{proc.log_tail(40)}") from None
        assert set(nodes) == free_nodes  # one per free node, none Pending in the busy pool
        status = kube.get("ModelDeployment", "m", ns)["status"]
        assert {p["pool"]: p["replicas"] for p in status["pools"] if p["replicas"]} == {free: 2}
        # pool status counts the other team's GPUs as allocated (they were left out), and names them foreign

        def devices(pool: str) -> tuple[Any, Any, Any]:
            st = kube.get("AcceleratorPool", pool).get("status") or {}
            return st.get("devicesAllocated"), st.get("devicesFree"), st.get("devicesForeign")

        for pool, want in ((busy, (16, 0, 16)), (free, (16, 0, 0))):
            try:
                wait_for(lambda: devices(pool) == want, 15, 0.5, what=f"{pool} status {want}")  # noqa: B023
            except AssertionError as exc:
                raise AssertionError(f"{exc}: (allocated, free, foreign) = {devices(pool)}") from None
    finally:
        kube.delete("ModelDeployment", "m", ns)  # finalized while the controller still runs
        try:
            wait_for(lambda: not kube.list("ModelDeployment", ns)["items"], 20, what="the ModelDeployment finalized")
        finally:
            for pool in (busy, free):  # a pool left behind is every later controller's placement target
                kube.delete("AcceleratorPool", pool)
            proc.terminate()
            client.CoreV1Api(api).delete_namespace(ns)
