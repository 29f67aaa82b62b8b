"""The snapshot builder puts other workloads' GPU pods in the snapshot, so placement leaves their GPUs alone."""

from __future__ import annotations

from typing import Any

from controller.pipeline import plan_placement_minimum
from controller.snapshot_builder import build_snapshot
from policies.placement_instance import foreign_devices
from policies.plan import SetReplicas
from tests.controller.helpers import md_obj, node_obj, pool_obj


def pod(name: str, node: str | None, gpus: int = 8, ns: str = "other", phase: str = "Running",
        labels: dict[str, str] | None = None, owner: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels or {"app": name}}
    if owner:
        meta["ownerReferences"] = [{"kind": "ModelDeployment", "name": owner, "apiVersion": "wattplane.io/v1alpha1"}]
    spec: dict[str, Any] = {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}
    if node:
        spec["nodeName"] = node
    return {"kind": "Pod", "metadata": meta, "spec": spec, "status": {"phase": phase}}


MANAGED = {"app.kubernetes.io/managed-by": "wattplane", "wattplane.io/deployment": "a"}


def build(cluster_pods: list[dict[str, Any]], mds: list[dict[str, Any]] | None = None):  # type: ignore[no-untyped-def]
    pools = [pool_obj("busy"), pool_obj("free")]
    nodes = [node_obj(f"{p}-{i}", p) for p in ("busy", "free") for i in range(2)] + [
        {"kind": "Node", "metadata": {"name": "elsewhere", "labels": {}}, "spec": {}, "status": {}}]
    mds = mds if mds is not None else [md_obj("a", minReplicas=2, parallelism={"tp": 8}, preferredPools=["busy"])]
    return build_snapshot(pools=pools, deployments=mds, nodes=nodes, owned={}, cluster_pods=cluster_pods)


def test_only_bound_gpu_pods_of_other_workloads_enter_as_foreign() -> None:
    pods = [
        pod("job-0", "busy-0"),  # another team's: foreign
        pod("job-1", "busy-1", gpus=2, ns="batch"),  # foreign, partly
        pod("waiting", None),  # pending: holds nothing yet
        pod("done", "busy-1", phase="Succeeded"),  # finished: released its GPUs
        pod("cpu-only", "busy-1", gpus=0),
        pod("off-pool", "elsewhere"),  # not on a pool node
        pod("a-busy-x", "busy-1", ns="ns1", labels=MANAGED),  # a replica of ns1/a: ours
        pod("a-group-0", "busy-1", ns="ns1", owner="a"),  # a group pod of ns1/a: ours
    ]
    built = build(pods)
    foreign = {p.name: (p.node, p.num_gpu) for p in built.snapshot.pods if p.deployment is None}
    assert foreign == {"other/job-0": ("busy-0", 8), "batch/job-1": ("busy-1", 2)}
    assert foreign_devices(built.snapshot) == {"busy-0": 8, "busy-1": 2}


def test_pods_of_a_deployment_the_snapshot_does_not_plan_are_foreign() -> None:
    """An invalid or deleted ModelDeployment's pods still hold their GPUs."""
    built = build([pod("a-busy-x", "busy-1", ns="ns1", labels=MANAGED)], mds=[])
    assert foreign_devices(built.snapshot) == {"busy-1": 8}


def test_the_stand_in_placement_skips_gpus_foreign_pods_hold() -> None:
    """The preferred pool is full of another team's pods: the minimum goes to the free pool."""
    built = build([pod("job-0", "busy-0"), pod("job-1", "busy-1", gpus=1)])
    plan = plan_placement_minimum(built.snapshot)
    placed = {a.pool: a.replicas for a in plan.actions if isinstance(a, SetReplicas)}
    assert placed == {"free": 2}
    assert build([]).snapshot.pods == ()  # control: with no other pods the snapshot has none
    control = plan_placement_minimum(build([]).snapshot)
    assert {a.pool: a.replicas for a in control.actions if isinstance(a, SetReplicas)} == {"busy": 2}
