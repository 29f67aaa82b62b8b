"""The controller places ModelDeployments while rescheduling works on another team's Pending pod.

Seen in CI (docs/architecture.md): on a shared cluster holding another test's fragmented pool, its
8-GPU Deployment Pending and rescheduling on, a controller evicted one of that pool's pods and then
created no replica for a scenario's ModelDeployments for minutes. The cause was placement, not the
rescheduler: with no load yet, replicas come from min_replicas alone, and with two identical pools
(the other test's and ours: same GPU, same price) the per-deployment search dropped the pool the LP
had put the minimum in and "proved" zero replicas optimal. Here the same fleet is built on purpose.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from controller.executor.render import L_DEPLOYMENT
from controller.kube import Kube, KubeError
from tests.controller.cluster_helpers import ControllerProcess, md_body, pool_body, wait_for
from tests.controller.test_reschedule_cluster import (  # the autouse fixture applies here too
    _deployment,
    _fragmented_fleet,
    _namespaces_go_with_their_test,  # noqa: F401
)
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster


@pytest.fixture
def fleet_policy(kube: Kube) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Replace the FleetPolicy's spec for the test; put the previous one back (or delete it) afterwards."""
    try:
        before: dict[str, Any] | None = kube.get("FleetPolicy", "default")
    except KubeError:
        before = None

    def set_spec(spec: dict[str, Any]) -> None:
        if kube.list("FleetPolicy")["items"]:
            kube.patch("FleetPolicy", "default", [{"op": "replace", "path": "/spec", "value": spec}],
                       content_type="application/json-patch+json")
        else:
            kube.create("FleetPolicy", {"apiVersion": "wattplane.io/v1alpha1", "kind": "FleetPolicy",
                                        "metadata": {"name": "default"}, "spec": spec})

    yield set_spec
    if before is None:
        kube.delete("FleetPolicy", "default")
    else:
        kube.patch("FleetPolicy", "default", [{"op": "replace", "path": "/spec", "value": before["spec"]}],
                   content_type="application/json-patch+json")


def _replicas(apps: client.AppsV1Api, ns: str) -> dict[str, int]:
    """Desired replicas of the managed Deployments of ``ns`` per ModelDeployment."""
    out: dict[str, int] = {}
    for d in apps.list_namespaced_deployment(ns, label_selector=L_DEPLOYMENT).items:
        name = d.metadata.labels[L_DEPLOYMENT]
        out[name] = out.get(name, 0) + (d.spec.replicas or 0)
    return out


def _decisions(kube: Kube, ns: str, names: Iterable[str]) -> list[dict[str, Any]]:
    return [(kube.get("ModelDeployment", n, ns).get("status") or {}).get("lastDecision") or {} for n in names]


def test_placement_goes_on_while_rescheduling_works_on_a_pending_pod(
        test_cluster: TestCluster, kube: Kube, tmp_path: Path, fleet_policy: Callable[[dict[str, Any]], None]) -> None:
    api = test_cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    # another team's fragmented pool, its 8-GPU Deployment Pending (no node has 8 free GPUs)
    frag_pool, frag_ns, _ = _fragmented_fleet(test_cluster, kube, serving_md=False)
    apps.create_namespaced_deployment(frag_ns, _deployment("big", frag_pool, 8))
    wait_for(lambda: any(c.reason == "Unschedulable" for p in core.list_namespaced_pod(
        frag_ns, label_selector="app=big").items for c in p.status.conditions or []), 30,
        what="the 8-GPU pod refused by the scheduler")
    # our pool, alike to theirs, and ModelDeployments that may run in any pool, as the quickstart's do
    uid = uuid.uuid4().hex[:6]
    pool = f"np-{uid}"
    kube.create("AcceleratorPool", pool_body(pool))
    test_cluster.add_gpu_nodes(pool, 2, gpus=8)
    ns = test_cluster.create_namespace(f"np-{uid}")
    fleet_policy({"policies": {"placement": True, "rescheduling": True}, "reconcilePeriodS": 7.5,
                  "disruption": {"maxMigrationsPerCycle": 5}})
    want = {"m-a": 1, "m-b": 1, "m-c": 2}
    for (name, n), tp in zip(want.items(), (4, 1, 2), strict=True):
        kube.create("ModelDeployment", md_body(name, ns, pool, tp=tp, min_replicas=n, max_replicas=8,
                                               allowedPools=[]), ns)
    proc = ControllerProcess(test_cluster.kubeconfig, tmp_path, f"np-{uid}", "np")
    try:
        try:
            wait_for(lambda: _replicas(apps, ns) == want, 30, 0.5, what="the minimum replicas of every deployment")
            # the plan is in the controller's metrics and each deployment's status
            wait_for(lambda: proc.metric("wattplane_replicas", f'namespace="{ns}"') == sum(want.values()), 15,
                     what="the desired replicas in /metrics")
            wait_for(lambda: all(d.get("policy") == "placement" and d.get("planId")
                                 for d in _decisions(kube, ns, want)), 15, what="the placement decisions in status")
            # and rescheduling did its own work meanwhile: room made, the 8-GPU pod runs
            wait_for(lambda: [p for p in core.list_namespaced_pod(frag_ns, label_selector="app=big").items
                              if p.status.phase == "Running"], 30, 0.5, what="the 8-GPU pod running")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_replicas(apps, ns)}\n{proc.log_tail(60)}") from None
    finally:
        _clean_up(kube, ns, want, (pool, frag_pool))
        proc.terminate()


def _clean_up(kube: Kube, ns: str, deployments: Iterable[str], pools: Iterable[str]) -> None:
    """ModelDeployments go while the controller still runs (it removes their finalizers), and the pools
    with them: a pool left behind is a placement target for every later controller on the cluster."""
    for name in deployments:
        kube.delete("ModelDeployment", name, ns)
    try:
        wait_for(lambda: not kube.list("ModelDeployment", ns)["items"], 20, what="the ModelDeployments finalized")
    finally:
        for pool in pools:
            kube.delete("AcceleratorPool", pool)
