"""The fleet-level routing LP: shifts to the fallback under pressure, back with hysteresis, never below the floor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.difficulty import weights_from_json
from policies.plan import Plan, Reason, SetRoutingShare, SolverStatus
from policies.profiles import REFERENCE_GPUS, default_table
from policies.routing import (
    DEFAULT_CLASSES,
    RoutingConfig,
    RoutingState,
    capacity,
    max_share_at_floor,
    plan_routing,
    plan_threshold,
    relative_quality,
    shares_for_total,
    threshold_for_share,
    total_share,
)
from policies.snapshot import (
    SLO,
    Demand,
    Fallback,
    GPUTelemetry,
    ModelDeployment,
    ModelShape,
    Node,
    Parallelism,
    Pool,
    ReplicaSet,
    ServingTelemetry,
    Snapshot,
)

H100 = REFERENCE_GPUS["h100"]
WEIGHTS = Path(__file__).resolve().parents[2] / "policies" / "data" / "router_weights.json"


def make_snapshot(
    demand_tok_s: float = 1000.0,
    large_replicas: int = 2,
    floor: float = 0.8,
    cap_w: float | None = None,
    small_replicas: int = 4,
    **overrides: Any,
) -> Snapshot:
    large = ModelDeployment(
        name="big", model=ModelShape(name="llama-3.1-70b", params_b=70, active_params_b=70),
        parallelism=Parallelism(tp=4), slo=SLO(), target_utilisation=0.8,
        fallback=Fallback(deployment="small", quality_floor=floor),
    )
    small = ModelDeployment(name="small", model=ModelShape(name="llama-3.1-8b", params_b=8, active_params_b=8))
    nodes = tuple(Node(name=f"n{i}", pool="h100", gpus=8) for i in range(2))
    telemetry = tuple(
        GPUTelemetry(node="n0", index=i, power_w=500.0, power_limit_w=cap_w, deployment="big") for i in range(8)
    ) if cap_w is not None else ()
    base: dict[str, Any] = dict(
        now=0.0,
        pools=(Pool(name="h100", accelerator=H100, gpus_per_node=8, cost_per_device_hour=2.0),),
        nodes=nodes,
        deployments=(large, small),
        replicas=(ReplicaSet(deployment="big", pool="h100", replicas=large_replicas),
                  ReplicaSet(deployment="small", pool="h100", replicas=small_replicas)),
        demand=(Demand(deployment="big", input_tokens_per_s=demand_tok_s, output_tokens_per_s=demand_tok_s),),
        gpu_telemetry=telemetry,
    )
    base.update(overrides)
    return Snapshot(**base)


def large_capacity(snapshot: Snapshot) -> float:
    return capacity(snapshot, snapshot.deployment("big"), default_table()).tokens_per_s


def share_of(plan: Plan) -> SetRoutingShare:
    (action,) = [a for a in plan.actions if isinstance(a, SetRoutingShare)]
    return action


def test_default_classes_match_packaged_calibration() -> None:
    weights = weights_from_json(WEIGHTS.read_text())
    assert len(weights.calibration) == len(DEFAULT_CLASSES)
    for a, b in zip(weights.calibration, DEFAULT_CLASSES, strict=True):
        assert a.share == pytest.approx(b.share, abs=1e-3)
        assert a.quality_large == pytest.approx(b.quality_large, abs=1e-3)
        assert a.quality_small == pytest.approx(b.quality_small, abs=1e-3)
        assert min(a.upper, 1e6) == pytest.approx(min(b.upper, 1e6), abs=1e-4)


def test_no_pressure_routes_only_where_the_fallback_is_better() -> None:
    snap = make_snapshot(demand_tok_s=10.0)
    plan = plan_routing(snap)
    a = share_of(plan)
    # only the easiest band (where the small model scores higher) goes to the fallback
    better = sum(b.share for b in DEFAULT_CLASSES if b.quality_small > b.quality_large + 1e-4)
    assert a.fallback_share <= better + 0.01
    assert plan.explanation.solver_status == SolverStatus.OPTIMAL
    assert a.expected_quality >= 1.0 - 1e-6  # no quality given up without pressure


def test_burst_beyond_capacity_shifts_traffic_to_fallback() -> None:
    calm = make_snapshot(demand_tok_s=100.0)
    cap = large_capacity(calm)
    burst = make_snapshot(demand_tok_s=cap * 1.2)
    p0 = plan_routing(calm)
    p1 = plan_routing(burst, state=RoutingState.model_validate(p0.state))
    a = share_of(p1)
    # large model keeps to its target utilisation: served share <= 0.8 * cap / demand
    assert (1 - a.fallback_share) * cap * 1.2 <= 0.8 * cap + 1e-6
    assert p1.explanation.reason == Reason.CAPACITY_PRESSURE
    assert a.version == share_of(p0).version + 1
    assert a.threshold > share_of(p0).threshold


def test_power_cap_reduces_capacity_and_shifts_more() -> None:
    demand = large_capacity(make_snapshot()) * 0.9
    uncapped = share_of(plan_routing(make_snapshot(demand_tok_s=demand)))
    capped_snap = make_snapshot(demand_tok_s=demand, cap_w=0.4 * H100.tdp_w)
    assert large_capacity(capped_snap) < large_capacity(make_snapshot())
    capped = share_of(plan_routing(capped_snap))
    assert capped.fallback_share > uncapped.fallback_share + 0.05


def test_quality_floor_is_never_violated() -> None:
    snap = make_snapshot(demand_tok_s=large_capacity(make_snapshot()) * 5, floor=0.95)
    plan = plan_routing(snap)
    a = share_of(plan)
    assert a.expected_quality >= 0.95 - 1e-6
    assert plan.explanation.reason == Reason.QUALITY_FLOOR


def test_hysteresis_shifts_back_only_below_release_utilisation() -> None:
    cap = large_capacity(make_snapshot())
    config = RoutingConfig(release_margin=0.3)
    state = RoutingState()
    p_burst = plan_routing(make_snapshot(demand_tok_s=cap * 1.5), config, state)
    high = share_of(p_burst).fallback_share
    # load falls to just under the target utilisation: the LP alone would route ~nothing,
    # but 0.75 * cap > release utilisation (0.5 * cap), so part of the shift is held
    p_hold = plan_routing(make_snapshot(demand_tok_s=cap * 0.75), config, RoutingState.model_validate(p_burst.state))
    held = share_of(p_hold).fallback_share
    fresh = share_of(plan_routing(make_snapshot(demand_tok_s=cap * 0.75), config)).fallback_share
    assert fresh < held < high
    assert p_hold.explanation.reason == Reason.STABILISING
    # well below the release utilisation the shift is undone
    p_low = plan_routing(make_snapshot(demand_tok_s=cap * 0.3), config, RoutingState.model_validate(p_hold.state))
    assert share_of(p_low).fallback_share == pytest.approx(fresh, abs=1e-3)


def serving(queue: float = 0.0, ttft_ms: float = 0.0, rps: float = 10.0, out_per_request: float = 200.0
            ) -> tuple[ServingTelemetry, ...]:
    return (ServingTelemetry(deployment="big", requests_per_s=rps, output_tokens_per_s=rps * out_per_request,
                             queue_depth=queue, ttft_p99_ms=ttft_ms),)


def test_a_queue_at_the_large_model_shifts_more_than_offered_load_alone() -> None:
    demand = large_capacity(make_snapshot()) * 0.9
    calm = share_of(plan_routing(make_snapshot(demand_tok_s=demand, serving=serving()))).fallback_share
    plan = plan_routing(make_snapshot(demand_tok_s=demand, serving=serving(queue=300.0)))
    queued = share_of(plan).fallback_share
    config = RoutingConfig()
    # the queue's tokens (300 x 200) drained within drain_s add to the demand the LP must place
    assert plan.explanation.metrics["big.backlog_tokens_per_s"] == pytest.approx(300 * 200 / config.drain_s)
    assert queued > calm + 0.05
    assert "queued" in plan.explanation.summary


def test_slow_ttft_lowers_the_target_utilisation_before_the_slo_is_missed() -> None:
    demand = large_capacity(make_snapshot()) * 0.85  # load alone needs less than the easiest band routes
    slo_ms = make_snapshot().deployment("big").slo.ttft_p99_ms
    config = RoutingConfig()
    fine = share_of(plan_routing(make_snapshot(demand_tok_s=demand, serving=serving(ttft_ms=0.5 * slo_ms))))
    # p99 still within the SLO but past the pressure point: shift now, not after it is missed
    slow_plan = plan_routing(make_snapshot(demand_tok_s=demand, serving=serving(ttft_ms=0.98 * slo_ms)))
    assert 0.98 * slo_ms > config.ttft_pressure * slo_ms
    assert slow_plan.explanation.metrics["big.utilisation_factor"] == pytest.approx(config.ttft_pressure / 0.98)
    assert share_of(slow_plan).fallback_share > fine.fallback_share + 0.03
    # the factor is bounded: a TTFT 10x the SLO does not send everything to the fallback
    worst = plan_routing(make_snapshot(demand_tok_s=demand, serving=serving(ttft_ms=10 * slo_ms)))
    assert worst.explanation.metrics["big.utilisation_factor"] == config.min_utilisation_factor
    assert share_of(worst).expected_quality >= 0.8 - 1e-6


def test_no_shift_back_while_the_large_model_still_queues() -> None:
    cap = large_capacity(make_snapshot())
    slo_ms = make_snapshot().deployment("big").slo.ttft_p99_ms
    burst = plan_routing(make_snapshot(demand_tok_s=cap * 1.5))
    high = share_of(burst).fallback_share
    state = RoutingState.model_validate(burst.state)
    # load is back to 30% of capacity (plain hysteresis would release) but the queue has not drained
    held = plan_routing(make_snapshot(demand_tok_s=cap * 0.3, serving=serving(queue=20.0, ttft_ms=0.3 * slo_ms)),
                        state=state)
    assert share_of(held).fallback_share == pytest.approx(high, abs=1e-3)
    assert held.explanation.reason == Reason.STABILISING and "queues" in held.explanation.summary
    assert 0.2 < RoutingConfig().ttft_release < 0.7
    slow = plan_routing(make_snapshot(demand_tok_s=cap * 0.3, serving=serving(ttft_ms=0.7 * slo_ms)), state=state)
    assert share_of(slow).fallback_share == pytest.approx(high, abs=1e-3)
    # queue drained and latency back to normal: the shift is undone
    released = plan_routing(make_snapshot(demand_tok_s=cap * 0.3, serving=serving(ttft_ms=0.2 * slo_ms)),
                            state=RoutingState.model_validate(held.state))
    assert share_of(released).fallback_share < high - 0.1


def test_same_snapshot_same_plan_and_stable_version() -> None:
    snap = make_snapshot(demand_tok_s=large_capacity(make_snapshot()))
    p1 = plan_routing(snap)
    p2 = plan_routing(snap)
    assert p1.id == p2.id
    p3 = plan_routing(snap, state=RoutingState.model_validate(p1.state))
    assert share_of(p3).version == share_of(p1).version
    assert p3.explanation.reason == Reason.NO_CHANGE
    json.loads(p3.to_json())


def test_threshold_baseline_ignores_capacity() -> None:
    cap = large_capacity(make_snapshot())
    a = share_of(plan_threshold(make_snapshot(demand_tok_s=10.0)))
    b = share_of(plan_threshold(make_snapshot(demand_tok_s=cap * 3)))
    assert a.fallback_share == b.fallback_share
    assert a.expected_quality >= 0.8 - 1e-6
    assert a.fallback_share == pytest.approx(max_share_at_floor(DEFAULT_CLASSES, 0.8), abs=1e-6)


def test_no_fallback_no_actions() -> None:
    snap = make_snapshot()
    big = snap.deployment("big").model_copy(update={"fallback": None})
    plan = plan_routing(snap.model_copy(update={"deployments": (big, snap.deployment("small"))}))
    assert plan.is_noop


@settings(max_examples=30, deadline=None)
@given(share=st.floats(0.0, 1.0))
def test_threshold_routes_the_requested_share(share: float) -> None:
    shares = shares_for_total(DEFAULT_CLASSES, share)
    assert total_share(DEFAULT_CLASSES, shares) == pytest.approx(share, abs=1e-9)
    t = threshold_for_share(DEFAULT_CLASSES, share)
    # the threshold is monotone in the share
    assert threshold_for_share(DEFAULT_CLASSES, min(share + 0.05, 1.0)) >= t


@settings(max_examples=25, deadline=None)
@given(load=st.floats(0.05, 6.0), floor=st.floats(0.7, 1.0), replicas=st.integers(0, 4))
def test_plan_never_below_floor_and_valid(load: float, floor: float, replicas: int) -> None:
    cap = large_capacity(make_snapshot()) or 1.0
    plan = plan_routing(make_snapshot(demand_tok_s=cap * load, floor=floor, large_replicas=replicas))
    a = share_of(plan)
    assert 0.0 <= a.fallback_share <= 1.0
    assert relative_quality(DEFAULT_CLASSES, shares_for_total(DEFAULT_CLASSES, a.fallback_share)) >= floor - 1e-4


def test_solver_failure_keeps_previous_table(monkeypatch: pytest.MonkeyPatch) -> None:
    import policies.routing as routing

    cap = large_capacity(make_snapshot())
    first = plan_routing(make_snapshot(demand_tok_s=cap * 1.5))
    unknown = routing.LPResult(shares=tuple(0.0 for _ in DEFAULT_CLASSES), status=SolverStatus.UNKNOWN,
                               objective=0.0, solve_ms=1.0, shortfall=0.0)
    monkeypatch.setattr(routing, "solve", lambda *a, **k: unknown)
    held = plan_routing(make_snapshot(demand_tok_s=cap * 1.5), state=RoutingState.model_validate(first.state))
    assert held.explanation.reason == Reason.SOLVER_FALLBACK
    assert held.explanation.fallback == "hold_previous"
    assert share_of(held).fallback_share == pytest.approx(share_of(first).fallback_share, abs=1e-6)
    fresh = plan_routing(make_snapshot(demand_tok_s=cap * 1.5))
    assert fresh.explanation.fallback == "large_only" and share_of(fresh).fallback_share == 0.0


def test_starting_replicas_do_not_count_as_capacity() -> None:
    """During a surge placement raises the large model's replicas; until they are ready the
    fallback must keep taking the overflow (the simulator showed routing handing it back early)."""
    ready = make_snapshot(demand_tok_s=5000.0, large_replicas=2,
                          replicas=(ReplicaSet(deployment="big", pool="h100", replicas=2, ready=2),
                                    ReplicaSet(deployment="small", pool="h100", replicas=4, ready=4)))
    scaling = make_snapshot(demand_tok_s=5000.0, large_replicas=2,
                            replicas=(ReplicaSet(deployment="big", pool="h100", replicas=6, ready=2),
                                      ReplicaSet(deployment="small", pool="h100", replicas=4, ready=4)))
    assert large_capacity(scaling) == pytest.approx(large_capacity(ready))
    assert share_of(plan_routing(scaling)).fallback_share == pytest.approx(share_of(plan_routing(ready)).fallback_share)
    assert share_of(plan_routing(ready)).fallback_share > 0.2  # the surge does go to the fallback
    # once they are ready, they count
    done = make_snapshot(demand_tok_s=5000.0, replicas=(ReplicaSet(deployment="big", pool="h100", replicas=6, ready=6),
                                                        ReplicaSet(deployment="small", pool="h100", replicas=4,
                                                                   ready=4)))
    assert large_capacity(done) == pytest.approx(3 * large_capacity(ready))


def test_fallback_room_counts_replicas_placement_can_add_on_free_devices() -> None:
    """Under a surge with a small fallback, the shift must not be capped by the fallback's current
    size when its pool has free devices: placement (next stage) sizes it for what is routed."""
    def snap(pool_nodes: int) -> Snapshot:
        nodes = tuple(Node(name=f"n{i}", pool="h100", gpus=8) for i in range(pool_nodes))
        return make_snapshot(demand_tok_s=12000.0, nodes=nodes,
                             replicas=(ReplicaSet(deployment="big", pool="h100", replicas=2, ready=2),
                                       ReplicaSet(deployment="small", pool="h100", replicas=1, ready=1)))

    full = snap(2)  # 8 + 1 devices used of 16: room for 7 more small replicas
    tight = snap(0)  # no node information: no free devices known, current size only
    from policies.routing import growth_capacity
    table = default_table()
    assert growth_capacity(full, full.deployment("small"), table) > 0
    assert growth_capacity(tight, tight.deployment("small"), table) == 0
    grown, stuck = share_of(plan_routing(full)), share_of(plan_routing(tight))
    assert grown.fallback_share > stuck.fallback_share + 0.05
    assert grown.expected_quality >= 0.8 - 1e-6  # the floor still holds
    # max_replicas bounds the growth
    capped = full.model_copy(update={"deployments": (full.deployment("big"), full.deployment("small").model_copy(
        update={"max_replicas": 1}))})
    assert growth_capacity(capped, capped.deployment("small"), table) == 0
