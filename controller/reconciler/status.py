"""Status of a ModelDeployment, an AcceleratorPool and a PowerDomain, computed (purely) from what was observed.

Conditions keep their ``lastTransitionTime`` while their status is unchanged, so rewriting the
same facts is a no-op and the reconciler can skip the write entirely.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.api import models as api
from controller.executor import render as r
from controller.executor.executor import Observed
from controller.telemetry.summary import CapState, PowerReadings
from policies.plan import Plan, PolicyName, SetExpertPlacement, SetPowerCap, SetRoutingShare

# Progressing reason (and Event reason) while old ready replicas serve until their replacements are Ready
KEEPING_OLD_REPLICAS = "KeepingOldReplicas"


@dataclass(frozen=True)
class Problem:
    """Why a deployment is Degraded: a CamelCase reason (metric label, Event reason) and a sentence."""

    reason: str
    message: str


@dataclass(frozen=True)
class Effects:
    """What this cycle's other policies decided for the deployment (routing, experts, power)."""

    routing_share: float = 0.0
    fallback: str = ""
    expert_version: int = 0
    capped_gpus: int = 0


def effects_of(plans: Sequence[Plan], deployment: str, nodes: set[str], prev: api.ModelDeploymentStatus | None
               ) -> Effects:
    """Routing share and expert placement version from the plans; GPUs capped on the nodes it runs on."""
    share = prev.routing_share if prev else 0.0
    version = prev.expert_placement_version if prev else 0
    fallback, capped = "", 0
    for plan in plans:
        for a in plan.actions:
            if isinstance(a, SetRoutingShare) and a.deployment == deployment:
                share, fallback = a.fallback_share, a.fallback
            elif isinstance(a, SetExpertPlacement) and a.deployment == deployment:
                version = a.version
            elif isinstance(a, SetPowerCap) and a.node in nodes and (a.power_limit_w or a.clock_limit_mhz):
                capped += 1
    return Effects(routing_share=share, fallback=fallback, expert_version=version, capped_gpus=capped)


def condition(
    prev: Sequence[api.Condition], type_: str, status: bool, reason: str, message: str, now: str, generation: int | None
) -> api.Condition:
    value: Any = "True" if status else "False"
    old = next((c for c in prev if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == value else now
    return api.Condition(type=type_, status=value, reason=reason, message=message, last_transition_time=since,
                         observed_generation=generation)


def deployment_status(
    md: api.ModelDeployment,
    desired: Mapping[str, int],
    observed: Mapping[str, Observed],
    pools: Mapping[str, api.AcceleratorPool],
    problem: Problem | None,
    decision: api.Decision | None,
    now: str,
    effects: Effects | None = None,
    kept_waiting: int = 0,
) -> api.ModelDeploymentStatus:
    prev = md.status or api.ModelDeploymentStatus()
    fx = effects or Effects(routing_share=prev.routing_share, expert_version=prev.expert_placement_version)
    gen = md.metadata.get("generation")
    rows = []
    for name in sorted(set(desired) | {p for p in pools if r.short(p) in observed}):
        seen = observed.get(r.short(name))
        want = desired.get(name, 0)
        if not want and seen is None:
            continue
        shape = r.shape_for(md, pools[name]).kind if name in pools else r.SHAPE_DEPLOYMENT
        rows.append(api.PoolReplicas(pool=name, replicas=seen.replicas if seen else 0,
                                     ready=seen.ready if seen else 0, shape=shape))
    total_desired = sum(desired.values())
    replicas = sum(x.replicas for x in rows)
    ready = sum(x.ready for x in rows)
    converged = replicas == total_desired and ready >= total_desired
    satisfied = problem is None
    conds = [
        condition(prev.conditions, api.ConditionType.READY, converged and satisfied and ready >= md.spec.min_replicas,
                  "AllReplicasReady" if converged and satisfied else ("Degraded" if not satisfied else "Progressing"),
                  f"{ready}/{total_desired} replicas ready", now, gen),
        condition(prev.conditions, api.ConditionType.PROGRESSING, not converged,
                  KEEPING_OLD_REPLICAS if kept_waiting else ("ScalingReplicas" if not converged else "Converged"),
                  f"{replicas} replicas running, {total_desired} desired"
                  + (f"; {kept_waiting} old ready replica(s) kept until replacements are Ready" if kept_waiting
                     else ""), now, gen),
        condition(prev.conditions, api.ConditionType.DEGRADED, not satisfied,
                  problem.reason if problem else "AsExpected", problem.message if problem else "", now, gen),
        condition(prev.conditions, api.ConditionType.POWER_CAPPED, fx.capped_gpus > 0,
                  "PowerCapped" if fx.capped_gpus else "NoCaps",
                  f"{fx.capped_gpus} GPU(s) serving it are power-capped" if fx.capped_gpus else "", now, gen),
        condition(prev.conditions, api.ConditionType.ROUTED_TO_FALLBACK, fx.routing_share > 0,
                  "RoutedToFallback" if fx.routing_share > 0 else "NotRouted",
                  f"{fx.routing_share:.0%} of requests go to {fx.fallback}" if fx.routing_share > 0 else "", now, gen),
    ]
    return api.ModelDeploymentStatus(
        replicas=replicas,
        ready_replicas=ready,
        desired_replicas=total_desired,
        pools=rows,
        load_tokens_per_s=prev.load_tokens_per_s,
        slo_attainment=prev.slo_attainment,
        routing_share=fx.routing_share,
        expert_placement_version=fx.expert_version,
        conditions=conds,
        last_decision=decision or prev.last_decision,
        observed_generation=gen,
        policy_state=prev.policy_state,
    )


def pool_status(
    pool: api.AcceleratorPool, nodes: Sequence[Mapping[str, Any]], allocated_by_node: Mapping[str, int],
    foreign_by_node: Mapping[str, int] | None = None,
) -> api.AcceleratorPoolStatus:
    """Devices ready / allocated / free, and how fragmented the free devices are.

    ``allocated_by_node`` counts every pod's devices, other workloads' too: a GPU another team's pod
    holds is no more free than one a replica holds (placement counts it the same way); the part
    ``foreign_by_node`` names is reported apart as ``devices_foreign``.
    """
    n_ready = devices = devices_ready = allocated = free = stranded = foreign = 0
    for node in nodes:
        gpus = int((node.get("status") or {}).get("allocatable", {}).get(r.GPU_RESOURCE, 0) or 0)
        conds = {c.get("type"): c.get("status") for c in (node.get("status") or {}).get("conditions") or []}
        ready = conds.get("Ready") == "True" and not (node.get("spec") or {}).get("unschedulable")
        used = min(gpus, allocated_by_node.get(node["metadata"]["name"], 0))
        devices += gpus
        allocated += used
        foreign += min(used, (foreign_by_node or {}).get(node["metadata"]["name"], 0))
        if ready:
            n_ready += 1
            devices_ready += gpus
            free += gpus - used
            if 0 < gpus - used < pool.spec.gpus_per_node:
                stranded += gpus - used
    return api.AcceleratorPoolStatus(
        nodes=len(nodes),
        nodes_ready=n_ready,
        devices=devices,
        devices_ready=devices_ready,
        devices_allocated=allocated,
        devices_free=free,
        devices_foreign=foreign,
        fragmentation=round(stranded / free, 4) if free else 0.0,
        observed_generation=pool.metadata.get("generation"),
        power_drawn_w=(pool.status.power_drawn_w if pool.status else 0.0),
        caps_in_force=(pool.status.caps_in_force if pool.status else 0),
    )


DRAW_WINDOW_S = 60  # seconds of per-second domain draw behind the status percentiles
CAPPED_GPUS_LISTED = 1024  # the status names at most this many capped GPUs (the count is exact)


def domain_draws(readings: PowerReadings, nodes: Sequence[str]) -> dict[int, float]:
    """Per-second domain draw (W) from the nodes' ring buffers: ``{unix second: watts}``.

    Only seconds every reporting node covers count (from the latest of their first samples to the
    earliest of their last ones), each node contributing its last reading at or before that
    second; so a node whose report for a second has not arrived yet never makes it look low.
    Nodes that report nothing are left out (the Reporting condition says so).
    """
    series = []
    for name in nodes:
        node = readings.nodes.get(name)
        if node is None or not node.draws:
            continue
        per_second: dict[int, float] = {}
        for t, w in node.draws:
            per_second[int(t)] = w  # the last report within a second stands for it
        series.append(per_second)
    if not series:
        return {}
    first = max(min(s) for s in series)
    last = min(max(s) for s in series)
    out: dict[int, float] = {}
    for second in range(first, last + 1):
        total = 0.0
        for s in series:
            at = max((k for k in s if k <= second), default=None)
            total += s[at] if at is not None else 0.0
        out[second] = total
    return out


def merge_window(window: Mapping[int, float], fresh: Mapping[int, float], span_s: int = DRAW_WINDOW_S
                 ) -> dict[int, float]:
    """The remembered per-second draws plus fresh ones (fresh wins), trimmed to the last ``span_s`` s."""
    merged = {**window, **fresh}
    if not merged:
        return {}
    newest = max(merged)
    return {k: v for k, v in sorted(merged.items()) if k > newest - span_s}


def _nearest_rank(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def power_plan_summary(plans: Sequence[Plan], domain: str, nodes: set[str], prev: api.PowerPlanSummary | None,
                       now: str) -> api.PowerPlanSummary | None:
    """The power plan of this cycle as the domain's status shows it; the previous one when none ran."""
    plan = next((p for p in plans if p.policy is PolicyName.POWER), None)
    if plan is None:
        return prev
    e = plan.explanation
    changes = sum(1 for a in plan.actions if isinstance(a, SetPowerCap) and a.node in nodes)
    mine = [part for part in e.summary.split("; ") if part.startswith(f"{domain}:")]
    head = e.summary.split("; ", 1)[0]
    return api.PowerPlanSummary(
        plan_id=plan.id, reason=e.reason.value, summary=("; ".join([head, *mine]))[:1000], objective=e.objective,
        bound=e.bound, solver_status=e.solver_status.value, solve_ms=round(e.solve_ms, 3), fallback=e.fallback,
        cap_changes=changes, time=prev.time if prev is not None and prev.plan_id == plan.id else now,
    )


def power_domain_status(
    pd: api.PowerDomain,
    nodes: Sequence[str],
    readings: PowerReadings,
    window: Mapping[int, float],
    last_plan: api.PowerPlanSummary | None,
    now: str,
) -> api.PowerDomainStatus:
    """The domain's status from observed facts only: hub draws, agents' limits and command results.

    ``window`` is the per-second domain draw the caller remembers (:func:`merge_window` of
    :func:`domain_draws`). Over-budget seconds continue from the current status: seconds after
    its ``overBudgetThrough`` watermark that drew more than the budget are added, so passes that
    see the same seconds again, or a restarted controller, count each second once.
    """
    prev = pd.status or api.PowerDomainStatus()
    budget = pd.spec.budget_w
    members = set(nodes)
    over = prev.over_budget_seconds
    through = prev.over_budget_through
    for second in sorted(window):
        if through is None or second > through:
            if window[second] > budget:
                over += 1.0
            through = float(second)
    draws = list(window.values())
    measured = window[max(window)] if window else 0.0
    reporting = sorted(n for n in members if n in readings.nodes and readings.nodes[n].fresh)
    capped = []
    for name in reporting:
        for gpu, limit, top in readings.nodes[name].limits:
            if top > 0 and 0 < limit < top - 0.5:
                capped.append(f"{name}/{gpu}")
    commands = [c for c in readings.caps if c.node in members and c.watts is not None]
    acked = sum(1 for c in commands if c.state is CapState.ACKNOWLEDGED)
    pending = sum(1 for c in commands if c.state is CapState.PENDING)
    failed = sum(1 for c in commands if c.state is CapState.FAILED)
    gen = pd.metadata.get("generation")
    is_over = bool(window) and measured > budget
    capping = bool(capped) or pending > 0
    conds = [
        condition(prev.conditions, api.ConditionType.OVER_BUDGET, is_over, "OverBudget" if is_over else "WithinBudget",
                  f"draw {measured:.0f} W of budget {budget:.0f} W" if window else "no draw observed", now, gen),
        condition(prev.conditions, api.ConditionType.CAPPING, capping,
                  "CapsInForce" if capped else ("CapsPending" if pending else "NoCaps"),
                  f"{len(capped)} GPU(s) capped, {pending} cap(s) awaiting their agent" if capping else "", now, gen),
        condition(prev.conditions, api.ConditionType.REPORTING, bool(members) and len(reporting) == len(members),
                  "AllNodesReport" if len(reporting) == len(members) else "NodesSilent",
                  f"{len(reporting)}/{len(members)} nodes report fresh telemetry", now, gen),
    ]
    return api.PowerDomainStatus(
        draw_p50_w=round(_nearest_rank(draws, 0.50), 1),
        draw_p99_w=round(_nearest_rank(draws, 0.99), 1),
        headroom_w=round(budget - measured, 1),
        caps_applied=len(capped),
        over_budget_seconds=over,
        nodes=len(members),
        observed_generation=gen,
        conditions=conds,
        budget_w=budget,
        measured_w=round(measured, 1),
        draw_window_s=float(len(window)),
        nodes_reporting=len(reporting),
        capped_gpus=sorted(capped)[:CAPPED_GPUS_LISTED],
        caps_acknowledged=acked,
        caps_pending=pending,
        caps_failed=failed,
        over_budget_through=through,
        last_plan=last_plan,
    )


def wire(status: api.ApiModel) -> dict[str, Any]:
    """The status as the API server stores it (for comparison and for the patch body)."""
    out: dict[str, Any] = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return out
