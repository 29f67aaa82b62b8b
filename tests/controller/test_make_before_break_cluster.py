"""Moving a deployment to a pool that cannot host it yet must not leave it with nothing serving.

The executor once applied the new pool's Deployment and deleted the old pool's in the same pass: when
the new pool's GPUs were held by another team's pods, the model dropped to zero serving replicas. Here
a plan moves two replicas from pool A to pool B while B is full; the executor runs level-triggered
passes on what the API server shows (as the reconciler does on each owned Deployment change): A must
keep serving while B's pods are Pending, and go only once B's replicas are Ready.
"""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from controller.api import models as api
from controller.executor import render as r
from controller.executor.executor import DisruptionBudget, ExecutionResult, Executor
from controller.kube import Kube, KubeClusterPort
from tests.controller.cluster_helpers import MANAGED, md_body, pool_body, wait_for
from tests.controller.test_reschedule_cluster import _deployment
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster

def test_old_pool_serves_until_the_new_pool_is_ready(
        test_cluster: TestCluster, kube: Kube, uid: str, other_team: str) -> None:
    apps = client.AppsV1Api(test_cluster.api_client())
    a, b = f"mbb-a-{uid}", f"mbb-b-{uid}"
    pools = {p: api.AcceleratorPool.model_validate({**pool_body(p), "metadata": {"name": p, "uid": f"uid-{p}"}})
             for p in (a, b)}
    test_cluster.add_gpu_nodes(a, 2, gpus=8)
    test_cluster.add_gpu_nodes(b, 2, gpus=8)
    # another team's pods hold every GPU of pool B
    body = _deployment("training", b, 8)
    body["spec"]["replicas"] = 2
    apps.create_namespaced_deployment(other_team, body)
    ns = test_cluster.create_namespace(f"mbb-{uid}")
    # the ModelDeployment exists so the garbage collector keeps the objects it owns (no controller runs)
    md = api.ModelDeployment.model_validate(kube.create("ModelDeployment", md_body("m", ns, a, tp=8), ns))
    ex = Executor(KubeClusterPort(kube))
    try:
        def deployments() -> dict[str, tuple[int, int]]:
            items = kube.list("Deployment", ns, labelSelector=MANAGED)["items"]
            by_label = {r.short(p): p for p in pools}
            return {by_label[o["metadata"]["labels"][r.L_POOL]]: (
                o["spec"]["replicas"], (o.get("status") or {}).get("readyReplicas") or 0)
                for o in items if not o["metadata"].get("deletionTimestamp")}

        def reconcile(desired: dict[str, int]) -> ExecutionResult:
            objects = [{**o, "kind": "Deployment"} for o in kube.list("Deployment", ns, labelSelector=MANAGED)["items"]]
            return ex.apply_deployment(md, pools, desired, objects, DisruptionBudget(10))

        reconcile({a: 2})
        wait_for(lambda: deployments() == {a: (2, 2)}, 30, 0.5, what="both replicas Ready in pool A")

        # the plan moves both replicas to B, whose GPUs the other team holds
        res = reconcile({b: 2})
        assert res.kept_waiting == 2 and res.limited
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:  # level-triggered passes while B's pods are Pending
            res = reconcile({b: 2})
            seen = deployments()
            assert seen.get(a) == (2, 2), f"pool A must keep serving while B is full: {seen}"
            assert seen.get(b, (0, 0))[1] == 0 and res.kept_waiting == 2
            time.sleep(1)

        # the other team leaves: B's replicas schedule and turn Ready, then A goes
        apps.delete_namespaced_deployment("training", other_team)

        def moved() -> bool:
            reconcile({b: 2})
            seen = deployments()
            served = sum(ready for _, ready in seen.values())
            assert served >= 2 or seen.get(a) == (2, 2), f"never fewer than 2 ready replicas: {seen}"
            return seen == {b: (2, 2)}

        wait_for(moved, 40, 0.5, what="B Ready and A removed")
    finally:
        kube.delete("ModelDeployment", "m", ns)
        client.CoreV1Api(test_cluster.api_client()).delete_namespace(ns)
