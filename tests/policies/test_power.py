"""The power-cap policy: budget held, priorities respected, hysteresis, determinism, solver bounds."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.plan import Plan, Reason, SetPowerCap, SolverStatus
from policies.power import (
    Option,
    PowerConfig,
    PowerState,
    cap_levels,
    plan_power,
    slowdown_cost,
    solve_greedy,
    volatility_allowance,
)
from policies.snapshot import (
    AcceleratorSpec,
    GPUTelemetry,
    Node,
    Pool,
    PowerDomain,
    PriorityClass,
    Snapshot,
)

H100 = AcceleratorSpec(
    model="H100-80GB", memory_gib=80, bf16_tflops=989, hbm_gbps=3350, tdp_w=700, min_power_w=200, max_power_w=700
)
BE, LC, STD = PriorityClass.BEST_EFFORT, PriorityClass.LATENCY_CRITICAL, PriorityClass.STANDARD


def make_snapshot(
    draws: list[float],
    priorities: list[PriorityClass] | None = None,
    limits: list[float | None] | None = None,
    budget_w: float = 4000.0,
    now: float = 0.0,
    **overrides: Any,
) -> Snapshot:
    """One node per GPU (``n{i}``, GPU 0) in one domain ``row``."""
    n = len(draws)
    priorities = priorities or [BE] * n
    limits = limits or [None] * n
    telemetry = tuple(
        GPUTelemetry(node=f"n{i}", index=0, power_w=d, priority=p, power_limit_w=lim)
        for i, (d, p, lim) in enumerate(zip(draws, priorities, limits, strict=True))
    )
    fields: dict[str, Any] = {
        "now": now,
        "pools": (Pool(name="h100", accelerator=H100, gpus_per_node=1, cost_per_device_hour=2.0),),
        "nodes": tuple(Node(name=f"n{i}", pool="h100", gpus=1, power_domain="row") for i in range(n)),
        "power_domains": (PowerDomain(name="row", budget_w=budget_w, safety_margin=0.05),),
        "gpu_telemetry": telemetry,
    }
    fields.update(overrides)
    return Snapshot(**fields)


def caps_of(plan: Plan) -> dict[str, float | None]:
    return {a.node: a.power_limit_w for a in plan.actions if isinstance(a, SetPowerCap)}


def applied(draws: list[float], plan: Plan, old: list[float | None]) -> list[float | None]:
    caps = caps_of(plan)
    return [caps.get(f"n{i}", old[i]) if f"n{i}" in caps else old[i] for i in range(len(draws))]


def predicted(draws: list[float], limits: list[float | None]) -> float:
    return sum(d if c is None else min(d, c) for d, c in zip(draws, limits, strict=True))


def test_under_budget_changes_nothing() -> None:
    plan = plan_power(make_snapshot([500.0] * 4, budget_w=4000.0), PowerConfig(), PowerState())
    assert plan.actions == ()
    assert plan.explanation.reason is Reason.NO_CHANGE


def test_over_budget_caps_best_effort_before_latency_critical() -> None:
    draws = [690.0] * 8
    prios = [BE] * 4 + [LC] * 4
    snap = make_snapshot(draws, prios, budget_w=5000.0)
    plan = plan_power(snap, PowerConfig(), PowerState())
    limits = applied(draws, plan, [None] * 8)
    target = 5000.0 * 0.95
    assert predicted(draws, limits) <= target + 1e-6
    assert all(limits[i] is None for i in range(4, 8)), "latency-critical GPUs capped while best-effort could absorb"
    assert any(limits[i] is not None for i in range(4))
    assert plan.explanation.reason is Reason.OVER_BUDGET
    assert plan.explanation.bound is not None and plan.explanation.objective is not None
    assert plan.explanation.bound <= plan.explanation.objective + 1e-9
    assert all(a.priority is BE for a in plan.actions if isinstance(a, SetPowerCap))


def test_latency_critical_capped_only_when_best_effort_is_not_enough() -> None:
    draws = [690.0] * 4
    prios = [BE, LC, LC, LC]
    # Even BE at its deepest level (0.3 TDP -> 210 W) leaves 690*3+210 = 2280 > 0.95 * 2300.
    plan = plan_power(make_snapshot(draws, prios, budget_w=2300.0), PowerConfig(), PowerState())
    limits = applied(draws, plan, [None] * 4)
    assert limits[0] == min(cap_levels(H100, PowerConfig()))
    assert any(limits[i] is not None for i in (1, 2, 3))
    assert predicted(draws, limits) <= 2300 * 0.95 + 1e-6


def test_unreachable_budget_applies_deepest_caps_and_says_so() -> None:
    plan = plan_power(make_snapshot([690.0] * 4, budget_w=500.0), PowerConfig(), PowerState())
    assert set(caps_of(plan).values()) == {min(cap_levels(H100, PowerConfig()))}
    assert plan.explanation.fallback == "deepest-caps"
    assert plan.explanation.solver_status is SolverStatus.INFEASIBLE


def test_same_snapshot_same_plan() -> None:
    snap = make_snapshot([650.0, 600.0, 690.0, 300.0, 680.0], [BE, STD, BE, LC, BE], budget_w=2600.0)
    a = plan_power(snap, PowerConfig(), PowerState())
    b = plan_power(snap, PowerConfig(), PowerState())
    assert a.id == b.id and a.actions and a.state == b.state


def test_release_has_hysteresis_and_minimum_hold() -> None:
    config = PowerConfig(min_hold_s=5.0, release_hysteresis=0.05, volatility_k=0.0)
    draws = [690.0] * 6
    budget = 4000.0
    first = plan_power(make_snapshot(draws, budget_w=budget, now=0.0), config, PowerState())
    limits = applied(draws, first, [None] * 6)
    state = PowerState.model_validate(first.state)
    # Demand eases a little: the capped GPUs still want 690 W, uncapped ones draw slightly less, so
    # releasing a cap would land inside the hysteresis band: nothing is raised.
    eased = [min(c, 690.0) if c is not None else 640.0 for c in limits]
    held = plan_power(make_snapshot(eased, limits=limits, budget_w=budget, now=10.0), config, state)
    assert all(v is not None for v in caps_of(held).values()), "a cap was raised inside the hysteresis band"
    # Load drops far below: caps are released (None clears a cap), but not before min_hold_s.
    state2 = PowerState.model_validate(held.state)
    low = [250.0 if c is None else min(c, 250.0) for c in limits]
    early = plan_power(make_snapshot(low, limits=limits, budget_w=budget, now=2.0), config, state)
    assert not [v for v in caps_of(early).values() if v is None]
    late = plan_power(make_snapshot(low, limits=limits, budget_w=budget, now=20.0), config, state2)
    released = [n for n, v in caps_of(late).items() if v is None]
    assert released and late.explanation.reason is Reason.UNDER_BUDGET


def test_pinned_gpu_without_history_is_assumed_to_want_max_power() -> None:
    # Three GPUs pinned at 400 W, no state: the policy must assume 700 W each if it uncapped them.
    draws = [400.0, 400.0, 400.0]
    limits: list[float | None] = [400.0, 400.0, 400.0]
    plan = plan_power(make_snapshot(draws, limits=limits, budget_w=1500.0), PowerConfig(min_hold_s=0), PowerState())
    new = applied(draws, plan, limits)
    assert predicted([700.0] * 3, new) <= 1500.0 * 0.95 + 1e-6


def test_frequency_lock_sends_clock_with_the_cap() -> None:
    plan = plan_power(make_snapshot([690.0] * 4, budget_w=2500.0), PowerConfig(frequency_lock=True), PowerState())
    capped = [a for a in plan.actions if isinstance(a, SetPowerCap) and a.power_limit_w is not None]
    assert capped and all(a.clock_limit_mhz is not None and a.clock_limit_mhz < 1980.0 for a in capped)


def test_state_round_trips_through_plan_json() -> None:
    plan = plan_power(make_snapshot([690.0] * 4, budget_w=2500.0), PowerConfig(), PowerState())
    again = Plan.from_json(plan.to_json())
    assert PowerState.model_validate(again.state) == PowerState.model_validate(plan.state)
    metrics = plan.explanation.metrics
    assert metrics["row.budget_w"] == 2500.0 and metrics["row.caps_applied"] >= 1


def test_gpus_without_telemetry_count_at_max_power() -> None:
    snap = make_snapshot([300.0, 300.0], budget_w=1300.0)
    nodes = (*snap.nodes, Node(name="silent", pool="h100", gpus=1, power_domain="row"))
    plan = plan_power(snap.model_copy(update={"nodes": nodes}), PowerConfig(), PowerState())
    # 700 W assumed for the silent GPU + 600 W = 1300 > 0.95 * 1300: someone is capped.
    assert plan.actions


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(min_value=150, max_value=700), st.sampled_from([BE, STD, LC])), min_size=1, max_size=12
    ),
    budget_share=st.floats(min_value=0.3, max_value=1.2),
)
def test_plan_never_exceeds_target_when_achievable(
    data: list[tuple[float, PriorityClass]], budget_share: float
) -> None:
    draws = [d for d, _ in data]
    prios = [p for _, p in data]
    budget = budget_share * 700.0 * len(draws)
    plan = plan_power(make_snapshot(draws, prios, budget_w=budget), PowerConfig(use_solver=False), PowerState())
    limits = applied(draws, plan, [None] * len(draws))
    deepest = min(cap_levels(H100, PowerConfig()))
    achievable = predicted(draws, [deepest] * len(draws)) <= 0.95 * budget
    if achievable:
        assert predicted(draws, limits) <= 0.95 * budget + 1e-6
    else:
        assert plan.explanation.fallback == "deepest-caps"


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.tuples(st.floats(min_value=0, max_value=300), st.floats(min_value=0, max_value=5)), min_size=1,
                 max_size=4),
        min_size=1, max_size=4,
    ),
    capacity=st.floats(min_value=0, max_value=1200),
)
def test_greedy_bound_brackets_the_brute_force_optimum(
    rows: list[list[tuple[float, float]]], capacity: float
) -> None:
    options = [[Option(None, p, c) for p, c in row] for row in rows]
    best = None
    for combo in itertools.product(*[range(len(r)) for r in options]):
        power = sum(options[i][k].power_w for i, k in enumerate(combo))
        cost = sum(options[i][k].cost for i, k in enumerate(combo))
        if power <= capacity + 1e-9 and (best is None or cost < best):
            best = cost
    sol = solve_greedy(options, capacity)
    if best is None:
        assert not sol.feasible
        return
    assert sol.feasible
    assert sol.bound <= best + 1e-6 <= sol.objective + 2e-6
    assert sum(options[i][k].power_w for i, k in enumerate(sol.choice)) <= capacity + 1e-6


def test_cap_levels_are_legal_and_below_max() -> None:
    levels = cap_levels(H100, PowerConfig())
    assert levels == tuple(sorted(levels, reverse=True))
    assert all(H100.min_power_w <= c < H100.max_power_w for c in levels)


@pytest.mark.parametrize("priority", [BE, STD])
def test_cheaper_classes_absorb_caps_first(priority: PriorityClass) -> None:
    draws = [690.0] * 4
    prios = [priority, priority, LC, LC]
    plan = plan_power(make_snapshot(draws, prios, budget_w=2500.0), PowerConfig(), PowerState())
    assert {a.node for a in plan.actions} <= {"n0", "n1"}


def test_queue_aware_cost_prefers_capping_light_gpus() -> None:
    # The same slowdown costs a busy GPU (its queue grows) far more than a light one.
    assert slowdown_cost(0.9, 0.8, 20.0, True) > slowdown_cost(0.9, 0.1, 20.0, True) > 0
    assert slowdown_cost(0.7, 0.8, 20.0, True) == 20.0
    assert slowdown_cost(0.9, 0.5, 20.0, False) == pytest.approx(0.1)
    assert slowdown_cost(1.0, 0.9, 20.0, True) == 0.0


def test_status_percentiles_come_from_the_remembered_draws() -> None:
    state = PowerState()
    for k, d in enumerate([400.0, 500.0, 600.0]):
        plan = plan_power(make_snapshot([d] * 2, budget_w=4000.0, now=float(k)), PowerConfig(), state)
        state = PowerState.model_validate(plan.state)
    assert plan.explanation.metrics["row.draw_p50_w"] == 1000.0
    assert plan.explanation.metrics["row.draw_p99_w"] == 1200.0
    assert state.domains["row"].recent_draw_w == (800.0, 1000.0, 1200.0)


def test_light_gpu_is_capped_before_a_saturated_one() -> None:
    plan = plan_power(make_snapshot([450.0, 690.0], budget_w=1130.0), PowerConfig(), PowerState())
    assert set(caps_of(plan)) == {"n0"}
    blind = plan_power(make_snapshot([450.0, 690.0], budget_w=1130.0), PowerConfig(queue_aware=False), PowerState())
    assert "n1" in caps_of(blind)  # throughput-only costs pick the busy GPU (fewest watts lost per unit speed)


def test_known_prompt_share_lets_a_cap_above_the_average_clip_prompt_bursts() -> None:
    # 30% prompt passes at 700 W and a 430 W token phase average 511 W; shedding ~40 W needs no
    # cap below the average when the policy knows the split: clipping the bursts is enough.
    draw = 0.3 * 700.0 + 0.7 * 430.0
    snap = make_snapshot([draw], budget_w=(draw - 40.0) / 0.95)
    tel = snap.gpu_telemetry[0].model_copy(update={"prefill_fraction": 0.3})
    phased = plan_power(snap.model_copy(update={"gpu_telemetry": (tel,)}), PowerConfig(volatility_k=0), PowerState())
    blind = plan_power(snap, PowerConfig(volatility_k=0), PowerState())
    phased_cap = caps_of(phased)["n0"]
    blind_cap = caps_of(blind)["n0"]
    assert phased_cap is not None and phased_cap > draw
    assert blind_cap is not None and blind_cap < draw


def test_recent_max_rise_keeps_room_for_the_largest_recent_jump() -> None:
    state = PowerState()
    for k, d in enumerate([300.0, 300.0, 600.0, 600.0]):  # one 600 W jump (2 GPUs x 300 W)
        plan = plan_power(make_snapshot([d] * 2, budget_w=4000.0, now=float(k)), PowerConfig(), state)
        state = PowerState.model_validate(plan.state)
    memory = state.domains["row"]
    assert volatility_allowance(memory, PowerConfig(recent_max_rise=True)) == pytest.approx(600.0)
    assert volatility_allowance(memory, PowerConfig()) < 600.0


def test_burst_room_counts_demand_rises_not_a_brake_lifting() -> None:
    """A brake (every GPU held at 200 W) lifting raises the draw but not the demand; a real burst raises both."""
    config = PowerConfig(burst_room=True, history=60)
    state = PowerState()
    draws = [[500.0] * 4, [500.0] * 4, [200.0] * 4, [200.0] * 4, [500.0] * 4, [500.0] * 4]
    limits: list[list[float | None]] = [[None] * 4, [None] * 4, [200.0] * 4, [200.0] * 4, [None] * 4, [None] * 4]
    for k, (d, lim) in enumerate(zip(draws, limits, strict=True)):
        plan = plan_power(make_snapshot(d, limits=lim, budget_w=10_000.0, now=float(k)), config, state)
        state = PowerState.model_validate(plan.state)
    memory = state.domains["row"]
    assert volatility_allowance(memory, PowerConfig(recent_max_rise=True)) == pytest.approx(1200.0)  # 4 x 300 W
    assert volatility_allowance(memory, config) < 100.0  # pinned GPUs kept their remembered demand
    # a real burst: the same 1,200 W rise with nobody capped is demand, and room is kept for it
    for k, d in enumerate([[200.0] * 4, [500.0] * 4], start=10):
        plan = plan_power(make_snapshot(d, budget_w=10_000.0, now=float(k)), config, state)
        state = PowerState.model_validate(plan.state)
    assert volatility_allowance(state.domains["row"], config) == pytest.approx(1200.0)


def test_priority_comes_from_the_pods_when_telemetry_does_not_say() -> None:
    """A live cluster's telemetry names no workload: the snapshot's pods (by device, else by node) do."""
    from policies.snapshot import ModelDeployment, ModelShape, Pod

    shape = ModelShape(name="m", params_b=8, active_params_b=8)
    deployments = (ModelDeployment(name="ns/batch", model=shape, priority=BE),
                   ModelDeployment(name="ns/chat", model=shape, priority=LC))
    pods = (Pod(name="ns/b0", node="n0", num_gpu=1, gpu_milli=1000, deployment="ns/batch"),
            Pod(name="ns/c0", node="n1", num_gpu=1, gpu_milli=1000, deployment="ns/chat"),
            Pod(name="ns/b1", node="n2", num_gpu=1, gpu_milli=1000, deployment="ns/batch", gpu_indices=(0,)),
            Pod(name="ns/c1", node="n2", num_gpu=1, gpu_milli=1000, deployment="ns/chat", gpu_indices=(1,)))
    tel = tuple(GPUTelemetry(node=f"n{i // 2}", index=i % 2, power_w=650.0) for i in range(6))
    snap = Snapshot(now=0.0, pools=(Pool(name="h100", accelerator=H100, gpus_per_node=2, cost_per_device_hour=2.0),),
                    nodes=tuple(Node(name=f"n{i}", pool="h100", gpus=2, power_domain="row") for i in range(3)),
                    power_domains=(PowerDomain(name="row", budget_w=3700.0, safety_margin=0.05),),
                    deployments=deployments, pods=pods, gpu_telemetry=tel)
    from policies.power import domain_gpus

    gpus, _ = domain_gpus(snap, snap.power_domains[0], PowerState())
    assert {g.key: g.priority for g in gpus} == {"n0/0": BE, "n0/1": BE, "n1/0": LC, "n1/1": LC,
                                                 "n2/0": BE, "n2/1": LC}
    plan = plan_power(snap, PowerConfig(), PowerState())
    capped = {f"{a.node}/{a.gpu}" for a in plan.actions if isinstance(a, SetPowerCap) and a.power_limit_w}
    assert capped and capped <= {"n0/0", "n0/1", "n2/0"}  # only best-effort work is capped


# -- the vectorised path (large domains) is the scalar model, bit for bit ------------------------

A100 = AcceleratorSpec(
    model="A100-80GB", memory_gib=80, bf16_tflops=312, hbm_gbps=2039, tdp_w=400, min_power_w=150, max_power_w=400
)
gpu_rows = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=1.0),  # draw as a share of TDP
        st.sampled_from([None, 0.0, 0.05, 0.3, 1.0]),  # prompt share (None: unknown)
        st.sampled_from([None, 0.9, 0.7, 0.5, 0.43, 0.3]),  # limit in force x TDP
        st.sampled_from([BE, STD, LC]),
        st.booleans(),  # A100 instead of H100
        st.sampled_from([None, 0.0, 3.0, 10.0]),  # capped since (None: no memory of this GPU)
    ),
    min_size=1, max_size=24,
)


def mixed_snapshot(rows: list[tuple[float, float | None, float | None, PriorityClass, bool, float | None]],
                   now: float) -> tuple[Snapshot, PowerState]:
    tel, nodes, memory = [], [], {}
    for i, (share, prefill, limit, prio, a100, since) in enumerate(rows):
        spec = A100 if a100 else H100
        cap = None if limit is None else max(spec.min_power_w, limit * spec.tdp_w)
        draw = share * spec.tdp_w if cap is None else min(share * spec.tdp_w, cap)
        tel.append(GPUTelemetry(node=f"n{i}", index=0, power_w=draw, priority=prio, power_limit_w=cap,
                                prefill_fraction=prefill))
        nodes.append(Node(name=f"n{i}", pool="a100" if a100 else "h100", gpus=1, power_domain="row"))
        if since is not None:
            memory[f"n{i}/0"] = {"demand_w": 0.6 * spec.tdp_w, "capped_since": since}
    snap = Snapshot(now=now, pools=(Pool(name="h100", accelerator=H100, gpus_per_node=1, cost_per_device_hour=2.0),
                                    Pool(name="a100", accelerator=A100, gpus_per_node=1, cost_per_device_hour=1.0)),
                    nodes=tuple(nodes), power_domains=(PowerDomain(name="row", budget_w=1.0, safety_margin=0.05),),
                    gpu_telemetry=tuple(tel))
    return snap, PowerState.model_validate({"gpus": memory})


@settings(max_examples=80, deadline=None)
@given(rows=gpu_rows, allow_lower=st.booleans(), capacity_share=st.floats(min_value=0.2, max_value=1.1),
       queue_aware=st.booleans())
def test_option_table_and_its_greedy_equal_the_scalar_options_and_greedy(
    rows: list[tuple[float, float | None, float | None, PriorityClass, bool, float | None]], allow_lower: bool,
    capacity_share: float, queue_aware: bool,
) -> None:
    from policies.power import domain_gpus, option_table, options_for, solve_greedy_table

    snap, state = mixed_snapshot(rows, now=8.0)
    config = PowerConfig(queue_aware=queue_aware)
    gpus, _ = domain_gpus(snap, snap.power_domains[0], state)
    levels = {spec: cap_levels(spec, config) for spec in {g.spec for g in gpus}}
    table = option_table(gpus, config, allow_lower, snap.now, state.gpus, levels)
    scalar = [options_for(g, config, allow_lower, snap.now, state.gpus.get(g.key), levels[g.spec]) for g in gpus]
    assert table.rows() == scalar  # same options, same order, same floats
    capacity = capacity_share * sum(o[0].power_w for o in scalar)
    assert solve_greedy_table(table, capacity) == solve_greedy(scalar, capacity)


def test_state_json_is_what_the_state_model_writes() -> None:
    snap, state = mixed_snapshot([(0.9, 0.2, 0.7, BE, False, 0.0), (0.5, None, None, LC, True, None)], now=20.0)
    snap = snap.model_copy(update={"power_domains": (PowerDomain(name="row", budget_w=600.0),)})
    plan = plan_power(snap, PowerConfig(), state)
    assert PowerState.model_validate(plan.state).model_dump(mode="json") == plan.state


def test_a_domain_without_reporting_gpus_gets_an_empty_option_table() -> None:
    """A controller's first cycle often has a PowerDomain but no telemetry yet: no crash, nothing to cap."""
    from policies.power import option_table

    table = option_table((), PowerConfig(), allow_lower=True, now=0.0, memory={}, levels={})
    assert table.rows() == []
    snap, state = mixed_snapshot([], now=1.0)
    plan = plan_power(snap, PowerConfig(), state)
    assert not plan.actions


def test_node_shares_leave_each_node_room_to_rise_within_the_budget() -> None:
    from policies.power import node_shares

    shares = node_shares(10_000.0, {"a": 2_000.0, "b": 5_000.0}, {"a": 5_600.0, "b": 5_600.0})
    assert shares is not None
    assert sum(shares.values()) <= 10_000.0
    assert shares["a"] >= 2_000.0 and shares["b"] >= 5_000.0  # nobody is held below its draw
    assert shares["a"] - 2_000.0 > shares["b"] - 5_000.0  # room where a node can still rise
    assert all(v % 100 == 0 for v in shares.values())


def test_node_shares_count_a_silent_node_at_its_peak_and_keep_old_shares_over_budget() -> None:
    from policies.power import node_shares

    shares = node_shares(10_000.0, {"a": 2_000.0, "quiet": None}, {"a": 5_600.0, "quiet": 5_600.0})
    assert shares is not None and set(shares) == {"a"} and shares["a"] <= 10_000.0 - 5_600.0
    assert node_shares(6_000.0, {"a": 4_000.0, "b": 4_000.0}, {"a": 5_600.0, "b": 5_600.0}) is None
    assert node_shares(6_000.0, {"quiet": None}, {"quiet": 5_600.0}) is None


def test_node_shares_split_headroom_by_draw_so_busy_nodes_keep_room_for_their_swings() -> None:
    from policies.power import node_shares

    shares = node_shares(6_000.0, {"idle": 1_000.0, "busy": 4_000.0}, {"idle": 5_600.0, "busy": 5_600.0})
    assert shares is not None and sum(shares.values()) <= 6_000.0
    assert shares["busy"] - 4_000.0 > shares["idle"] - 1_000.0 > 0  # by draw, not by room to rise


def test_node_shares_cover_a_recent_high_and_release_a_held_node_first() -> None:
    from policies.power import node_shares

    draws = {"swing": 2_500.0, "steady": 2_500.0, "pinned": 2_000.0}
    peaks = dict.fromkeys(draws, 5_600.0)
    # the swinging node's recent high fits in the headroom: it gets at least that, the others no less than now
    shares = node_shares(8_000.0, draws, peaks, highs={"swing": 3_000.0, "steady": 2_500.0, "pinned": 2_000.0})
    assert shares is not None and sum(shares.values()) <= 8_000.0
    assert shares["swing"] >= 3_000.0 and shares["steady"] >= 2_500.0 and shares["pinned"] >= 2_000.0
    # a node whose guard holds it hides its demand: it gets the headroom before anyone's draw-share
    held = node_shares(8_000.0, draws, peaks, held={"pinned"})
    assert held is not None and sum(held.values()) <= 8_000.0
    assert held["pinned"] - 2_000.0 > held["swing"] - 2_500.0
    assert held["steady"] >= 2_500.0  # but never at the price of holding another node below its draw
    # wants beyond the headroom: shared in proportion to what each wants
    short = node_shares(7_900.0, draws, peaks, highs={"swing": 3_400.0}, held={"pinned"})
    assert short is not None and sum(short.values()) <= 7_900.0
    assert short["pinned"] - 2_000.0 > short["swing"] - 2_500.0 > 0


def test_node_shares_rounding_never_holds_a_node_below_its_draw_when_the_headroom_covers_it() -> None:
    """Shares are rounded down to 100 W; a steady node given no headroom beyond its draw (1,026 W)
    would be held at 1,000 W, its guard would engage and its draw fall — every pass."""
    from policies.power import node_shares

    draws = {"steady": 1_026.0, "held": 2_000.0}
    peaks = dict.fromkeys(draws, 2_400.0)
    shares = node_shares(3_300.0, draws, peaks, held={"held"})
    assert shares is not None
    assert shares["steady"] >= 1_026.0 and shares["held"] >= 2_000.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), st.floats(0.0, 6_000.0)), st.floats(0.0, 6_000.0),
                          st.floats(0.0, 6_000.0), st.booleans()), min_size=1, max_size=8),
       st.floats(0.0, 40_000.0))
def test_node_shares_never_exceed_the_budget_nor_hold_a_node_below_its_draw_with_room_to_spare(
        nodes: list[tuple[float | None, float, float, bool]], budget: float) -> None:
    from policies.power import node_shares

    draws = {f"n{i}": d for i, (d, _, _, _) in enumerate(nodes)}
    peaks = {f"n{i}": p for i, (_, p, _, _) in enumerate(nodes)}
    highs = {f"n{i}": h for i, (_, _, h, _) in enumerate(nodes)}
    held = {f"n{i}" for i, (_, _, _, x) in enumerate(nodes) if x}
    shares = node_shares(budget, draws, peaks, highs=highs, held=held)
    known = {n: d for n, d in draws.items() if d is not None}
    headroom = budget - (sum(known.values()) + sum(peaks[n] for n, d in draws.items() if d is None))
    if headroom < 0 or not known:
        assert shares is None
        return
    assert shares is not None and set(shares) == set(known)
    assert sum(shares.values()) <= budget + 1e-6
    if headroom >= 100.0 * len(known):
        assert all(shares[n] >= d - 1e-6 for n, d in known.items())


@given(st.lists(st.tuples(st.one_of(st.just(0.0), st.floats(1e-3, 1_000.0)), st.floats(0.0, 1_000.0)),
                min_size=1, max_size=8),
       st.floats(0.0, 10_000.0))
def test_fill_by_weight_sums_to_the_amount_and_fills_by_weight_up_to_each_room(
        items: list[tuple[float, float]], amount: float) -> None:
    import numpy as np

    from policies.power import fill_by_weight

    weights = np.array([w for w, _ in items])
    room = np.array([r for _, r in items])
    out = fill_by_weight(amount, weights, room)
    assert float(out.sum()) == pytest.approx(amount, abs=1e-6)
    assert (out >= 0).all()
    if amount <= float(room[weights > 0].sum() if (weights > 0).any() else room.sum()):
        assert (out <= room + 1e-6).all()
        # one level: an entry below its room got exactly level x weight
        open_ = np.nonzero((weights > 0) & (out < room - 1e-6))[0]
        if len(open_):
            level = out[open_[0]] / weights[open_[0]]
            assert out[open_] == pytest.approx(level * weights[open_], rel=1e-6, abs=1e-6)
