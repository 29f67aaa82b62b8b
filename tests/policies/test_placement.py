"""Placement: limits always hold, partial plans explain themselves, determinism, optimality on small cases."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import policies.placement as placement
from policies.baselines.greedy import greedy_replicas, plan_greedy
from policies.baselines.homogeneous import best_homogeneous
from policies.placement import PlacementConfig, optimise, plan_placement, relax
from policies.placement_instance import InstanceParams, build_instance, evaluate
from policies.plan import Reason, SetReplicas, SolverStatus
from policies.profiles import REFERENCE_GPUS, default_table
from policies.snapshot import (
    Demand,
    GPUTelemetry,
    ModelDeployment,
    ModelShape,
    Node,
    Parallelism,
    Pool,
    PowerDomain,
    ReplicaSet,
    Snapshot,
)

H100, A100, L4 = REFERENCE_GPUS["h100"], REFERENCE_GPUS["a100"], REFERENCE_GPUS["l4"]


def pool(name: str, acc: Any = H100, nodes: int = 2, price: float = 3.0, domain: str | None = None) -> Pool:
    return Pool(name=name, accelerator=acc, gpus_per_node=8, cost_per_device_hour=price, max_nodes=nodes,
                power_domain=domain)


def dep(name: str, model: str = "llama-3.1-8b", size: float = 8, tp: int = 1, **kw: Any) -> ModelDeployment:
    return ModelDeployment(name=name, model=ModelShape(name=model, params_b=size, active_params_b=size),
                           parallelism=Parallelism(tp=tp), **kw)


def make_snapshot(**overrides: Any) -> Snapshot:
    base: dict[str, Any] = {
        "pools": (pool("h100", H100, 2, 3.0), pool("a100", A100, 2, 1.8), pool("l4", L4, 2, 0.5)),
        "deployments": (dep("small"), dep("big", "llama-3.1-70b", 70, tp=4)),
        "demand": (Demand(deployment="small", output_tokens_per_s=8000, input_tokens_per_s=30000),
                   Demand(deployment="big", output_tokens_per_s=3000, input_tokens_per_s=9000)),
    }
    base.update(overrides)
    return Snapshot(**base)


def applied(snap: Snapshot, plan: Any) -> dict[tuple[str, str], int]:
    """Replicas after the plan: current ones overwritten by the plan's SetReplicas."""
    out = {(r.deployment, r.pool): r.replicas for r in snap.replicas}
    for a in plan.actions:
        assert isinstance(a, SetReplicas)
        assert out.get((a.deployment, a.pool), 0) == a.previous
        out[(a.deployment, a.pool)] = a.replicas
    return out


def check_limits(snap: Snapshot, plan: Any) -> None:
    """Independent of the solver's own bookkeeping: devices per pool, bounds, power budgets."""
    table = default_table()
    after = applied(snap, plan)
    per_pool: dict[str, int] = {}
    per_dep: dict[str, int] = {}
    draw: dict[str, float] = {}
    for (d, p), n in after.items():
        if n == 0:
            continue
        dp, pl = snap.deployment(d), snap.pool(p)
        prof = table.for_deployment(dp, pl.accelerator)
        assert prof is not None, f"{d} placed on {p} where it does not fit"
        assert not dp.allowed_pools or p in dp.allowed_pools
        devs = n * max(dp.parallelism.devices, 1)
        per_pool[p] = per_pool.get(p, 0) + devs
        per_dep[d] = per_dep.get(d, 0) + n
        if pl.power_domain:
            draw[pl.power_domain] = draw.get(pl.power_domain, 0.0) + devs * min(prof.power_w, pl.accelerator.tdp_w)
    for p, devs in per_pool.items():
        pl = snap.pool(p)
        assert devs <= (pl.max_nodes or 0) * pl.gpus_per_node, f"pool {p} over capacity"
    for d, n in per_dep.items():
        assert n <= snap.deployment(d).max_replicas
    for dom in snap.power_domains:
        assert draw.get(dom.name, 0.0) <= dom.budget_w * (1 - dom.safety_margin) + 1e-6


def test_meets_demand_cheaply_and_explains() -> None:
    snap = make_snapshot()
    plan = plan_placement(snap)
    check_limits(snap, plan)
    ex = plan.explanation
    assert ex.reason == Reason.DEMAND_CHANGED
    assert ex.metrics["need_covered"] == pytest.approx(1.0)
    assert ex.objective is not None and ex.bound is not None and ex.bound <= ex.objective + 1e-6
    assert ex.solver_status in (SolverStatus.OPTIMAL, SolverStatus.FEASIBLE)
    assert "changed" in ex.summary


def test_same_input_same_plan() -> None:
    snap = make_snapshot()
    a, b = plan_placement(snap), plan_placement(snap)
    assert a.id == b.id
    assert a.actions == b.actions
    assert a.explanation.objective == b.explanation.objective


def test_insufficient_capacity_gives_best_partial_plan() -> None:
    snap = make_snapshot(demand=(Demand(deployment="small", output_tokens_per_s=10_000_000),))
    plan = plan_placement(snap)
    check_limits(snap, plan)
    ex = plan.explanation
    assert ex.reason == Reason.INSUFFICIENT_CAPACITY
    assert "small" in ex.summary and "cannot be served" in ex.summary
    # best partial: every device that can host "small" is used for it (big has no demand beyond min 0)
    after = applied(snap, plan)
    assert sum(n for (d, _), n in after.items() if d == "small") == 3 * 16


def test_current_placement_kept_when_demand_barely_moves() -> None:
    snap = make_snapshot()
    first = plan_placement(snap)
    current = tuple(ReplicaSet(deployment=d, pool=p, replicas=n) for (d, p), n in applied(snap, first).items() if n)
    nudged = tuple(d.model_copy(update={"output_tokens_per_s": d.output_tokens_per_s * 0.97}) for d in snap.demand)
    again = plan_placement(snap.model_copy(update={"replicas": current, "demand": nudged}))
    assert again.actions == ()
    assert again.explanation.reason == Reason.NO_CHANGE


def test_power_caps_reduce_capacity() -> None:
    only_h100 = make_snapshot(pools=(pool("h100", H100, 4, 3.0),), deployments=(dep("small"),),
                              demand=(Demand(deployment="small", output_tokens_per_s=20000, input_tokens_per_s=80000),))
    nodes = tuple(Node(name=f"n{i}", pool="h100", gpus=8) for i in range(4))
    capped = only_h100.model_copy(update={
        "nodes": nodes,
        "gpu_telemetry": tuple(GPUTelemetry(node=f"n{i}", index=j, power_w=300, power_limit_w=350)
                               for i in range(4) for j in range(8)),
    })
    free = sum(a.replicas for a in plan_placement(only_h100.model_copy(update={"nodes": nodes})).actions)
    tight = sum(a.replicas for a in plan_placement(capped).actions)
    assert tight > free


def test_power_domain_budget_limits_placement() -> None:
    pools = (pool("h100", H100, 4, 3.0, domain="row"), pool("a100", A100, 4, 1.8, domain="row"))
    snap = make_snapshot(pools=pools, power_domains=(PowerDomain(name="row", budget_w=6000, safety_margin=0.0),),
                         deployments=(dep("small"),),
                         demand=(Demand(deployment="small", output_tokens_per_s=1e6, input_tokens_per_s=1e6),))
    plan = plan_placement(snap)
    check_limits(snap, plan)
    assert plan.explanation.reason == Reason.INSUFFICIENT_CAPACITY
    assert plan.explanation.metrics["power_w"] <= 6000 + 1e-6


def test_solver_failure_falls_back_to_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(placement, "optimise", broken)
    snap = make_snapshot()
    plan = plan_placement(snap)
    check_limits(snap, plan)
    assert plan.explanation.fallback == "greedy"
    assert plan.explanation.reason == Reason.SOLVER_FALLBACK
    assert "boom" in plan.explanation.summary


def test_min_replicas_and_disallowed_pools() -> None:
    snap = make_snapshot(deployments=(dep("small", min_replicas=3, allowed_pools=("a100",)),),
                         demand=(Demand(deployment="small", output_tokens_per_s=1.0),),
                         replicas=(ReplicaSet(deployment="small", pool="h100", replicas=2),))
    plan = plan_placement(snap)
    after = applied(snap, plan)
    assert after[("small", "h100")] == 0  # drained: not allowed there
    assert after[("small", "a100")] == 3


def _brute_force(inst: Any, limit: int = 5) -> float:
    best = float("inf")
    ranges = [range(0, min(int(u), limit) + 1) for u in inst.ub]
    for combo in itertools.product(*ranges):
        r = np.array(combo, dtype=np.int64)
        ev = evaluate(inst, r)
        if ev.feasible:
            best = min(best, ev.objective)
    return best


# each example solves and brute-forces a fleet: shrinking a failure would take minutes, and the
# failing parameters are printed as they are
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)

small_fleets = st.fixed_dictionaries({
    "nodes": st.lists(st.integers(0, 1), min_size=3, max_size=3),
    "out": st.lists(st.floats(0, 12000), min_size=2, max_size=2),
    "r0": st.lists(st.integers(0, 3), min_size=2, max_size=2),
    "budget": st.floats(300, 5000),
    "min_r": st.integers(0, 2),
})


def _fleet(params: dict[str, Any]) -> Snapshot:
    pools = (Pool(name="h100", accelerator=H100, gpus_per_node=4, cost_per_device_hour=3.0,
                  max_nodes=params["nodes"][0] + 1, power_domain="row"),
             Pool(name="a100", accelerator=A100, gpus_per_node=2, cost_per_device_hour=1.8,
                  max_nodes=params["nodes"][1] + 1, power_domain="row"),
             Pool(name="l4", accelerator=L4, gpus_per_node=2, cost_per_device_hour=0.5,
                  max_nodes=params["nodes"][2] + 1))
    deps = (dep("a", min_replicas=params["min_r"], max_replicas=5), dep("b", "qwen3-32b", 32, tp=2, max_replicas=5))
    return Snapshot(
        pools=pools, deployments=deps,
        power_domains=(PowerDomain(name="row", budget_w=params["budget"], safety_margin=0.0),),
        demand=(Demand(deployment="a", output_tokens_per_s=params["out"][0], input_tokens_per_s=params["out"][0] * 3),
                Demand(deployment="b", output_tokens_per_s=params["out"][1], input_tokens_per_s=params["out"][1])),
        replicas=(ReplicaSet(deployment="a", pool="a100", replicas=params["r0"][0]),
                  ReplicaSet(deployment="b", pool="h100", replicas=params["r0"][1])),
    )


@settings(max_examples=30, deadline=None, phases=NO_SHRINK)
@given(small_fleets)
def test_property_limits_bounds_and_optimality(params: dict[str, Any]) -> None:
    """Every plan respects capacity, bounds and budgets; bound <= brute-force optimum <= plan objective."""
    snap = _fleet(params)
    plan = plan_placement(snap, PlacementConfig(polish_gap=0.0))  # always polish: the plan must be optimal
    inst = build_instance(snap, default_table(), PlacementConfig().instance_params())
    if inst.n_pairs > 6:
        return
    opt = _brute_force(inst)
    ex = plan.explanation
    assert ex.objective is not None and ex.bound is not None
    if ex.fallback is None:
        check_limits(snap, plan)
        assert ex.bound <= opt + 1e-6 * max(1.0, opt)
        assert ex.objective >= opt - 1e-6 * max(1.0, opt)
        # small instances get CP-SAT: the plan is optimal, up to CP-SAT's integer scaling of costs
        assert ex.objective == pytest.approx(opt, rel=1e-4, abs=1e-6)
    assert plan_placement(snap, PlacementConfig(polish_gap=0.0)).id == plan.id


@settings(max_examples=20, deadline=None, phases=NO_SHRINK)
@given(small_fleets)
def test_property_decomposition_without_cpsat(params: dict[str, Any]) -> None:
    """The large-instance path alone (no CP-SAT): valid limits and a valid bound."""
    snap = _fleet(params)
    inst = build_instance(snap, default_table(), PlacementConfig().instance_params())
    sol = optimise(inst, PlacementConfig(cpsat_max_pairs=0))
    assert evaluate(inst, sol.r).feasible
    if inst.n_pairs <= 6:
        opt = _brute_force(inst)
        assert sol.bound <= opt + 1e-6 * max(1.0, opt)
        assert relax(inst).objective <= sol.bound + 1e-6 * max(1.0, opt)  # Lagrangian >= LP bound


def test_greedy_respects_limits_and_ignores_current() -> None:
    snap = make_snapshot(pools=(pool("h100", H100, 1, 3.0), pool("a100", A100, 1, 1.8)))
    plan = plan_greedy(snap)
    check_limits(snap, plan)
    inst = build_instance(snap, default_table(), InstanceParams())
    r = greedy_replicas(inst)
    assert evaluate(inst, r).feasible


def test_homogeneous_uses_one_gpu_type() -> None:
    snap = make_snapshot()
    inst = build_instance(snap, default_table(), InstanceParams(unlimited_capacity=True))
    acc, r = best_homogeneous(inst, lambda sub: optimise(sub, PlacementConfig()).r)
    used = {inst.pool_accelerator[int(inst.pair_p[k])] for k in np.flatnonzero(r)}
    assert used == {acc}
    assert evaluate(inst, r).shortfall.sum() == pytest.approx(0.0, abs=1e-6)
