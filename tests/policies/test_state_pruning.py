"""States that round-trip between cycles forget deployments that no longer exist (found by the churn
soak: a controller under ModelDeployment churn must not carry every deployment it ever saw)."""

from __future__ import annotations

from policies.moe import MoEState, plan_moe
from policies.placement import PlacementState, plan_placement
from tests.policies.test_placement import make_snapshot as placement_snapshot
from tests.policies.test_routing import make_snapshot as routing_snapshot


def test_moe_state_drops_deleted_deployments() -> None:
    snap = routing_snapshot()
    live = snap.deployments[0].name
    plan = plan_moe(snap, None, MoEState(last_rebalance_s={"ns/deleted": 5.0, live: 7.0}))
    assert plan.state["last_rebalance_s"] == {live: 7.0}


def test_placement_state_keeps_only_current_deployments() -> None:
    snap = placement_snapshot()
    names = {d.name for d in snap.deployments}
    stale = PlacementState(first_seen={"ns/deleted": 0.0}, needs={"ns/deleted": ((0.0, 1.0),)})
    plan = plan_placement(snap, None, stale)
    assert set(plan.state["first_seen"]) == names and set(plan.state["needs"]) == names


def test_placement_state_forgets_the_last_deployment_too() -> None:
    snap = placement_snapshot().model_copy(update={"deployments": ()})
    stale = PlacementState(first_seen={"ns/deleted": 0.0}, needs={"ns/deleted": ((0.0, 1.0),)})
    plan = plan_placement(snap, None, stale)
    assert plan.state["first_seen"] == {} and plan.state["needs"] == {}


def test_routing_state_drops_deleted_deployments() -> None:
    from policies.routing import RouteDecision, RoutingState, plan_routing

    snap = routing_snapshot()
    gone = RouteDecision(fallback="small", fallback_share=0.5, threshold=0.5, expected_quality=0.9, version=4)
    plan = plan_routing(snap, None, RoutingState(routes={"ns/deleted": gone}))
    assert "ns/deleted" not in plan.state["routes"]
    assert set(plan.state["routes"]) <= {d.name for d in snap.deployments}
