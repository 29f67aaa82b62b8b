"""The stand-in placement (min replicas, first fit, sticky) and the snapshot builder feeding it."""

from __future__ import annotations

from typing import Any

from controller.pipeline import plan_placement_minimum, unplaced
from controller.snapshot_builder import build_snapshot
from policies.plan import Reason, SetReplicas
from tests.controller.helpers import md_obj, node_obj, pool_obj


def build(mds: list[dict[str, Any]], nodes: dict[str, int], owned: dict[str, Any] | None = None,
          pools: tuple[str, ...] = ("h100", "l4")):  # type: ignore[no-untyped-def]
    node_objs = [node_obj(f"{p}-{i}", p, gpus=8 if p == "h100" else 4) for p in pools for i in range(nodes.get(p, 0))]
    return build_snapshot(pools=[pool_obj(p, gpus=8 if p == "h100" else 4) for p in pools], deployments=mds,
                          nodes=node_objs, owned=owned or {})


def deployment(n: int) -> dict[str, Any]:
    """An observed Deployment of ``ns1/a`` in pool h100 with ``n`` ready replicas."""
    labels = {"wattplane.io/pool": "h100", "wattplane.io/shape": "Deployment"}
    return {"kind": "Deployment", "metadata": {"name": "a-h100", "namespace": "ns1", "labels": labels},
            "spec": {"replicas": n}, "status": {"readyReplicas": n}}


def replicas(plan: Any) -> dict[tuple[str, str], int]:
    return {(a.deployment, a.pool): a.replicas for a in plan.actions if isinstance(a, SetReplicas)}


def test_min_replicas_land_in_preferred_pool_first() -> None:
    b = build([md_obj("a", preferredPools=["l4"], minReplicas=3, parallelism={"tp": 2})], {"h100": 1, "l4": 1})
    plan = plan_placement_minimum(b.snapshot)
    # l4 node has 4 GPUs: two 2-GPU replicas there, the third spills to h100
    assert replicas(plan) == {("ns1/a", "l4"): 2, ("ns1/a", "h100"): 1}
    assert plan.explanation.reason is Reason.BOUNDS_CHANGED and unplaced(plan, "ns1/a") == 0


def test_allowed_pools_are_respected_and_shortfall_reported() -> None:
    b = build([md_obj("a", allowedPools=["l4"], minReplicas=3, parallelism={"tp": 4})], {"h100": 4, "l4": 2})
    plan = plan_placement_minimum(b.snapshot)
    assert replicas(plan) == {("ns1/a", "l4"): 2}
    assert plan.explanation.reason is Reason.INSUFFICIENT_CAPACITY and unplaced(plan, "ns1/a") == 1


def test_wide_replicas_need_whole_distinct_nodes() -> None:
    wide = md_obj("w", minReplicas=2, parallelism={"tp": 8, "pp": 4})
    assert replicas(plan_placement_minimum(build([wide], {"h100": 7}).snapshot)) == {("ns1/w", "h100"): 1}
    assert replicas(plan_placement_minimum(build([wide], {"h100": 8}).snapshot)) == {("ns1/w", "h100"): 2}


def test_higher_priority_is_placed_first_under_scarcity() -> None:
    mds = [md_obj("be", priority="best-effort", minReplicas=2, parallelism={"tp": 8}),
           md_obj("lc", priority="latency-critical", minReplicas=2, parallelism={"tp": 8})]
    plan = plan_placement_minimum(build(mds, {"h100": 2}).snapshot)
    assert replicas(plan) == {("ns1/lc", "h100"): 2}
    assert unplaced(plan, "ns1/be") == 2


def test_existing_replicas_are_kept_and_plan_is_noop_when_converged() -> None:
    md = md_obj("a", minReplicas=2, parallelism={"tp": 8}, allowedPools=["h100", "l4"], preferredPools=["l4"])
    dep = deployment(2)
    b = build([md], {"h100": 2, "l4": 4}, owned={"ns1/a": [dep]})
    assert b.snapshot.current_replicas("ns1/a", "h100") == 2
    plan = plan_placement_minimum(b.snapshot)
    assert plan.actions == () and plan.explanation.reason is Reason.NO_CHANGE


def test_scaling_bounds_down_removes_replicas() -> None:
    dep = deployment(3)
    b = build([md_obj("a", minReplicas=1, maxReplicas=1)], {"h100": 2}, owned={"ns1/a": [dep]})
    assert replicas(plan_placement_minimum(b.snapshot)) == {("ns1/a", "h100"): 1}


def test_same_snapshot_same_plan() -> None:
    mds = [md_obj(f"m{i}", minReplicas=i % 3 + 1, parallelism={"tp": 1 + i % 4}) for i in range(12)]
    b = build(mds, {"h100": 3, "l4": 2})
    assert plan_placement_minimum(b.snapshot).id == plan_placement_minimum(b.snapshot).id


def test_builder_skips_bad_objects_and_reports_them() -> None:
    bad = md_obj("bad", minReplicas=5, maxReplicas=1)
    b = build([bad, md_obj("good")], {"h100": 1})
    assert "ns1/bad" in b.invalid and "minReplicas" in b.invalid["ns1/bad"]
    assert [d.name for d in b.snapshot.deployments] == ["ns1/good"]


def test_builder_maps_nodes_to_pools_by_selector() -> None:
    b = build([], {"h100": 2, "l4": 1})
    assert {n.name: (n.pool, n.gpus) for n in b.snapshot.nodes} == {
        "h100-0": ("h100", 8), "h100-1": ("h100", 8), "l4-0": ("l4", 4)}
