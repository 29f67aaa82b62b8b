"""PowerDomain status from observed facts: per-second draws, caps from reports and command results."""

from __future__ import annotations

from typing import Any

from controller.api import models as api
from controller.reconciler.status import (
    domain_draws,
    merge_window,
    power_domain_status,
    power_plan_summary,
    wire,
)
from controller.telemetry.summary import CapCommand, CapState, NodePower, PowerReadings
from policies.plan import Explanation, Plan, PolicyName, Reason, SetPowerCap, SolverStatus


def pd_obj(budget: float = 1000.0, status: dict[str, Any] | None = None) -> api.PowerDomain:
    obj: dict[str, Any] = {"metadata": {"name": "row1", "generation": 3}, "spec": {"budgetW": budget}}
    if status is not None:
        obj["status"] = status
    return api.PowerDomain.model_validate(obj)


def node(name: str, draws: list[tuple[float, float]], limits: tuple[tuple[int, float, float], ...] = (),
         fresh: bool = True) -> NodePower:
    return NodePower(name, fresh, tuple(draws), limits)


def test_domain_draw_counts_only_seconds_every_node_covers() -> None:
    readings = PowerReadings(nodes={
        "a": node("a", [(100.2, 300.0), (101.1, 320.0), (102.5, 340.0), (103.0, 360.0)]),
        "b": node("b", [(101.7, 500.0), (102.1, 510.0)]),  # b's report for 103 has not arrived yet
        "other": node("other", [(101.0, 9999.0)]),  # not in the domain
    }, caps=())
    draws = domain_draws(readings, ["a", "b", "silent"])
    # 100 is before b's first report and 103 after its last: neither is complete
    assert draws == {101: 320.0 + 500.0, 102: 340.0 + 510.0}
    assert domain_draws(readings, ["silent"]) == {}


def test_two_reports_in_one_second_the_last_stands_for_it() -> None:
    readings = PowerReadings(nodes={"a": node("a", [(10.1, 100.0), (10.9, 200.0), (11.2, 150.0)])}, caps=())
    assert domain_draws(readings, ["a"]) == {10: 200.0, 11: 150.0}


def test_window_merges_and_trims() -> None:
    w = merge_window({}, {i: float(i) for i in range(100)}, span_s=60)
    assert min(w) == 40 and max(w) == 99 and len(w) == 60
    w2 = merge_window(w, {99: 5.0, 100: 7.0}, span_s=60)
    assert w2[99] == 5.0 and w2[100] == 7.0 and min(w2) == 41


def test_status_percentiles_headroom_and_conditions() -> None:
    window = {s: 900.0 for s in range(100, 150)} | {150: 1100.0}
    readings = PowerReadings(nodes={"a": node("a", [(150.0, 1100.0)], ((0, 700.0, 700.0), (1, 450.0, 700.0)))},
                             caps=(CapCommand("a", 1, 450.0, CapState.ACKNOWLEDGED),
                                   CapCommand("a", 2, 500.0, CapState.PENDING),
                                   CapCommand("a", 3, 500.0, CapState.FAILED),
                                   CapCommand("a", 4, None, CapState.ACKNOWLEDGED)))  # a clear is not a cap
    s = power_domain_status(pd_obj(1000.0), ["a", "b"], readings, window, None, "t1")
    assert s.draw_p50_w == 900.0 and s.draw_p99_w == 1100.0 and s.measured_w == 1100.0
    assert s.headroom_w == -100.0 and s.budget_w == 1000.0 and s.draw_window_s == 51
    assert s.caps_applied == 1 and s.capped_gpus == ["a/1"]
    assert (s.caps_acknowledged, s.caps_pending, s.caps_failed) == (1, 1, 1)
    assert s.over_budget_seconds == 1.0 and s.over_budget_through == 150.0
    conds = {c.type: (c.status, c.reason) for c in s.conditions}
    assert conds["OverBudget"] == ("True", "OverBudget")
    assert conds["Capping"] == ("True", "CapsInForce")
    assert conds["Reporting"] == ("False", "NodesSilent")  # b never reported
    assert s.nodes == 2 and s.nodes_reporting == 1 and s.observed_generation == 3


def test_over_budget_seconds_accumulate_once_across_passes_and_restarts() -> None:
    readings = PowerReadings(nodes={}, caps=())
    window1 = {100: 1200.0, 101: 1300.0, 102: 900.0}
    s1 = power_domain_status(pd_obj(1000.0), [], readings, window1, None, "t1")
    assert s1.over_budget_seconds == 2.0
    # the next pass sees the same seconds again plus new ones: only the new ones count
    pd2 = pd_obj(1000.0, wire(s1))
    window2 = window1 | {103: 1100.0, 104: 800.0}
    s2 = power_domain_status(pd2, [], readings, window2, None, "t2")
    assert s2.over_budget_seconds == 3.0 and s2.over_budget_through == 104.0
    # a restarted controller remembers nothing but reads the status back: it continues the count
    pd3 = pd_obj(1000.0, wire(s2))
    window3 = {103: 1100.0, 104: 800.0, 105: 1500.0}
    s3 = power_domain_status(pd3, [], readings, window3, None, "t3")
    assert s3.over_budget_seconds == 4.0
    # same facts again: same wire form, so the controller skips the write
    s4 = power_domain_status(pd_obj(1000.0, wire(s3)), [], readings, window3, None, "t4")
    assert wire(s4) == wire(s3)


def test_last_plan_keeps_its_first_seen_time_and_names_this_domain() -> None:
    plan = Plan(policy=PolicyName.POWER,
                actions=(SetPowerCap(node="a", gpu=0, power_limit_w=490.0), SetPowerCap(node="z", gpu=0,
                                                                                          power_limit_w=490.0)),
                explanation=Explanation(reason=Reason.OVER_BUDGET, summary="2 cap changes; row1: tighten; row2: hold",
                                        objective=1.5, bound=1.4, solver_status=SolverStatus.HEURISTIC, solve_ms=3.2,
                                        fallback=None))
    first = power_plan_summary([plan], "row1", {"a"}, None, "t1")
    assert first is not None
    assert first.plan_id == plan.id and first.cap_changes == 1 and first.time == "t1"
    assert first.summary == "2 cap changes; row1: tighten"
    assert (first.objective, first.bound, first.solver_status, first.solve_ms) == (1.5, 1.4, "HEURISTIC", 3.2)
    again = power_plan_summary([plan], "row1", {"a"}, first, "t2")
    assert again == first
    assert power_plan_summary([], "row1", {"a"}, first, "t3") == first  # no power plan this cycle
