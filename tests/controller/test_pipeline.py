"""The stand-in placement (min replicas, first fit, sticky) and the snapshot builder feeding it."""

from __future__ import annotations

from typing import Any

import pytest

from controller.api.models import PoliciesEnabled
from controller.pipeline import plan_placement_minimum, run_pipeline, shortfall
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
    unplaced = lambda d: shortfall(b.snapshot, [plan], d)  # noqa: E731
    # l4 node has 4 GPUs: two 2-GPU replicas there, the third spills to h100
    assert replicas(plan) == {("ns1/a", "l4"): 2, ("ns1/a", "h100"): 1}
    assert plan.explanation.reason is Reason.BOUNDS_CHANGED and unplaced("ns1/a") == 0


def test_allowed_pools_are_respected_and_shortfall_reported() -> None:
    b = build([md_obj("a", allowedPools=["l4"], minReplicas=3, parallelism={"tp": 4})], {"h100": 4, "l4": 2})
    plan = plan_placement_minimum(b.snapshot)
    assert replicas(plan) == {("ns1/a", "l4"): 2}
    assert plan.explanation.reason is Reason.INSUFFICIENT_CAPACITY and shortfall(b.snapshot, [plan], "ns1/a") == 1


def test_wide_replicas_need_whole_distinct_nodes() -> None:
    wide = md_obj("w", minReplicas=2, parallelism={"tp": 8, "pp": 4})
    assert replicas(plan_placement_minimum(build([wide], {"h100": 7}).snapshot)) == {("ns1/w", "h100"): 1}
    assert replicas(plan_placement_minimum(build([wide], {"h100": 8}).snapshot)) == {("ns1/w", "h100"): 2}


def test_higher_priority_is_placed_first_under_scarcity() -> None:
    mds = [md_obj("be", priority="best-effort", minReplicas=2, parallelism={"tp": 8}),
           md_obj("lc", priority="latency-critical", minReplicas=2, parallelism={"tp": 8})]
    b = build(mds, {"h100": 2})
    plan = plan_placement_minimum(b.snapshot)
    assert replicas(plan) == {("ns1/lc", "h100"): 2}
    assert shortfall(b.snapshot, [plan], "ns1/be") == 2


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


def test_pipeline_runs_the_real_placement_when_enabled() -> None:
    b = build([md_obj("a", minReplicas=2, parallelism={"tp": 2})], {"h100": 2, "l4": 2})
    out = run_pipeline(b.snapshot, PoliciesEnabled(placement=True))
    placement = [p for p in out.plans if p.policy.value == "placement"]
    assert len(placement) == 1 and placement[0].explanation.fallback != "min-replicas-first-fit"
    assert sum(r for (d, _), r in replicas(placement[0]).items() if d == "ns1/a") == 2
    assert shortfall(b.snapshot, out.plans, "ns1/a") == 0 and out.notes == ()


def test_pipeline_uses_the_stand_in_when_placement_is_off_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    b = build([md_obj("a", minReplicas=2, parallelism={"tp": 2})], {"h100": 2})
    off = run_pipeline(b.snapshot, PoliciesEnabled(placement=False))
    assert [p.explanation.fallback for p in off.plans] == ["min-replicas-first-fit"]

    def broken(*_: object) -> None:
        raise RuntimeError("solver exploded")

    monkeypatch.setattr("policies.pipeline.run_pipeline", broken)
    failed = run_pipeline(b.snapshot, PoliciesEnabled(placement=True))
    assert [p.explanation.fallback for p in failed.plans] == ["min-replicas-first-fit"]
    assert failed.notes and "solver exploded" in failed.notes[0]
    assert replicas(failed.plans[0]) == {("ns1/a", "h100"): 2}


def test_pipeline_state_round_trips_through_the_fleet_policy_status() -> None:
    from controller.api.models import FleetPolicy
    from controller.reconciler.controller import restore_state

    b = build([md_obj("a", minReplicas=1)], {"h100": 1})
    out = run_pipeline(b.snapshot, PoliciesEnabled(placement=True))
    saved = {"metadata": {"name": "default"}, "status": {"pipelineState": out.state.model_dump(mode="json")}}
    assert restore_state(FleetPolicy.model_validate(saved)) == out.state
    assert restore_state(FleetPolicy.model_validate({"metadata": {"name": "default"}})).states == {}
    broken = {"metadata": {"name": "default"}, "status": {"pipelineState": {"states": "not a dict"}}}
    assert restore_state(FleetPolicy.model_validate(broken)).states == {}
