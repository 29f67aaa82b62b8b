"""Rescheduling actuated on the real cluster: a fragmented pool frees a whole node for an 8-GPU replica.

Two 4-GPU pods sit on two 8-GPU nodes, so an 8-GPU replica is Pending (Insufficient nvidia.com/gpu).
The rescheduler (the real policy, on a snapshot built from the API objects) plans one migration;
the Eviction API carries it out with the PDB honoured; the replica then runs. A PDB that allows no
disruption blocks the eviction instead, and nothing moves.
"""

from __future__ import annotations

import time
import uuid

import pytest
from kubernetes import client

from controller.executor.evictions import MigrationLimits, MigrationOutcome, apply_migrations
from policies.plan import MigratePod
from policies.rescheduling import RescheduleConfig, RescheduleState, plan_reschedule
from policies.snapshot import Node, Pod, PodDisruptionBudget, Snapshot
from tests.controller.cluster_helpers import wait_for as _wait
from wattplane.testcluster import GPU_RESOURCE, POOL_LABEL, TestCluster

pytestmark = pytest.mark.cluster
MNL = 1


def _deployment(name: str, pool: str, gpus: int) -> client.V1Deployment:
    labels = {"app": name}
    req = {GPU_RESOURCE: str(gpus)}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="engine", image="registry.invalid/engine:1",
                                                   resources=client.V1ResourceRequirements(requests=req, limits=req))],
                    node_selector={POOL_LABEL: pool}, termination_grace_period_seconds=0),
            ),
        ),
    )



def _snapshot(api: client.ApiClient, ns: str, nodes: list[str]) -> Snapshot:
    """The pool as the rescheduler sees it: its nodes, the namespace's pods, and the PDB's allowance."""
    core = client.CoreV1Api(api)
    dom_nodes = tuple(Node(name=n, gpus=8, cpu_milli=96_000, memory_mib=1_048_576, accelerator_model="H100-80GB")
                      for n in nodes)
    pdb = client.PolicyV1Api(api).read_namespaced_pod_disruption_budget("frag-pdb", ns)
    pods = []
    for p in core.list_namespaced_pod(ns).items:
        if p.metadata.deletion_timestamp is not None:
            continue
        gpus = int((p.spec.containers[0].resources.requests or {}).get(GPU_RESOURCE, "0"))
        pods.append(Pod(name=f"{ns}/{p.metadata.name}", node=p.spec.node_name, num_gpu=gpus,
                        gpu_milli=1000 if gpus else 0, cpu_milli=1000, memory_mib=1024,
                        pdb="frag-pdb" if p.metadata.labels["app"] != "big" else None))
    budget = PodDisruptionBudget(name="frag-pdb", max_unavailable=pdb.status.disruptions_allowed)
    return Snapshot(nodes=dom_nodes, pods=tuple(pods), pdbs=(budget,))


def _fragmented_pool(cluster: TestCluster) -> tuple[str, list[str], client.ApiClient]:
    suffix = uuid.uuid4().hex[:6]
    pool = f"frag-{suffix}"
    nodes = cluster.add_gpu_nodes(pool, 2, gpus=8)
    ns = cluster.create_namespace(f"frag-{suffix}")
    api = cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    # Build the fragmented start (one 4-GPU pod per node) by cordoning, so the workloads carry no
    # placement of their own: cordon node 1, create a; swap; create b; uncordon both.
    for name, here, other in (("a", nodes[0], nodes[1]), ("b", nodes[1], nodes[0])):
        core.patch_node(other, {"spec": {"unschedulable": True}})
        core.patch_node(here, {"spec": {"unschedulable": False}})
        apps.create_namespaced_deployment(ns, _deployment(name, pool, 4))
        _wait(lambda n=name: [p for p in core.list_namespaced_pod(ns, label_selector=f"app={n}").items
                              if p.status.phase == "Running"])
    for n in nodes:
        core.patch_node(n, {"spec": {"unschedulable": False}})
    placed = {p.metadata.labels["app"]: p.spec.node_name for p in core.list_namespaced_pod(ns).items
              if p.metadata.deletion_timestamp is None}
    assert placed["a"] != placed["b"], placed  # fragmented: 4 free GPUs on each node
    client.PolicyV1Api(api).create_namespaced_pod_disruption_budget(ns, client.V1PodDisruptionBudget(
        metadata=client.V1ObjectMeta(name="frag-pdb"),
        spec=client.V1PodDisruptionBudgetSpec(max_unavailable=1,
                                              selector=client.V1LabelSelector(match_expressions=[
                                                  client.V1LabelSelectorRequirement(key="app", operator="In",
                                                                                    values=["a", "b"])]))))
    apps.create_namespaced_deployment(ns, _deployment("big", pool, 8))

    def unschedulable() -> bool:
        for p in core.list_namespaced_pod(ns, label_selector="app=big").items:
            for c in p.status.conditions or []:
                if c.type == "PodScheduled" and c.reason == "Unschedulable":
                    return "Insufficient nvidia.com/gpu" in (c.message or "")
        return False

    _wait(unschedulable)
    _wait(lambda: client.PolicyV1Api(api).read_namespaced_pod_disruption_budget("frag-pdb", ns)
          .status.disruptions_allowed == 1)
    return ns, nodes, api


def _plan(api: client.ApiClient, ns: str, nodes: list[str]) -> list[MigratePod]:
    plan = plan_reschedule(_snapshot(api, ns, nodes), RescheduleConfig(mnl=MNL, time_limit_s=2.0), RescheduleState())
    moves = [a for a in plan.actions if isinstance(a, MigratePod)]
    assert 1 <= len(moves) <= MNL, plan.explanation.summary
    return moves


def test_pending_8_gpu_replica_runs_after_the_planned_eviction(test_cluster: TestCluster) -> None:
    ns, nodes, api = _fragmented_pool(test_cluster)
    core = client.CoreV1Api(api)
    moves = _plan(api, ns, nodes)
    report = apply_migrations(core, moves, MigrationLimits(max_migrations=MNL, max_concurrent=1))
    assert report.evicted == len(moves) <= MNL, report
    big = _wait(lambda: [p for p in core.list_namespaced_pod(ns, label_selector="app=big").items
                         if p.status.phase == "Running"], timeout_s=90)
    _wait(lambda: len([p for p in core.list_namespaced_pod(ns).items
                       if p.status.phase == "Running" and p.metadata.deletion_timestamp is None]) == 3, 90)
    running = [p for p in core.list_namespaced_pod(ns).items
               if p.status.phase == "Running" and p.metadata.deletion_timestamp is None]
    used = {n: 0 for n in nodes}
    for p in running:
        used[p.spec.node_name] += int(p.spec.containers[0].resources.requests[GPU_RESOURCE])
    assert sorted(used.values()) == [8, 8]  # a whole node for the 8-GPU replica, the two 4-GPU pods packed
    assert big[0].spec.node_name in nodes


def test_a_pdb_that_allows_no_disruption_blocks_the_migration(test_cluster: TestCluster) -> None:
    """The plan was made while the PDB allowed one disruption; the budget is tightened before the
    executor acts (a stale snapshot), and the Eviction API still holds the line."""
    ns, nodes, api = _fragmented_pool(test_cluster)
    core, policy = client.CoreV1Api(api), client.PolicyV1Api(api)
    moves = _plan(api, ns, nodes)
    policy.patch_namespaced_pod_disruption_budget("frag-pdb", ns, {"spec": {"maxUnavailable": 0}})
    _wait(lambda: policy.read_namespaced_pod_disruption_budget("frag-pdb", ns).status.disruptions_allowed == 0)
    before = {p.metadata.name for p in core.list_namespaced_pod(ns).items}
    report = apply_migrations(core, moves, MigrationLimits(max_migrations=MNL))
    assert set(report.outcomes.values()) == {MigrationOutcome.BLOCKED_BY_PDB}
    time.sleep(2)
    assert {p.metadata.name for p in core.list_namespaced_pod(ns).items} == before  # nothing evicted
    assert all(p.status.phase == "Pending" for p in core.list_namespaced_pod(ns, label_selector="app=big").items)


def test_migration_limit_and_dry_run_are_enforced_before_acting(test_cluster: TestCluster) -> None:
    core = client.CoreV1Api(test_cluster.api_client())
    moves = [MigratePod(pod=f"nowhere/p{i}", from_node="n0", to_node="n1") for i in range(3)]
    report = apply_migrations(core, moves, MigrationLimits(max_migrations=1), dry_run=True)
    assert report.outcomes == {"nowhere/p0": MigrationOutcome.DRY_RUN, "nowhere/p1": MigrationOutcome.OVER_LIMIT,
                               "nowhere/p2": MigrationOutcome.OVER_LIMIT}
