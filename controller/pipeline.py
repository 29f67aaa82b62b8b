"""The policy pipeline the reconciler runs on each snapshot: the shared ``policies.pipeline``.

The FleetPolicy says which stages run. Placement always has an answer: when the FleetPolicy turns
it off, or the real policy is unavailable or fails, ``plan_placement_minimum`` stands in: min
replicas within bounds, kept where they already run (no churn), new ones first-fit on free GPUs
(GPUs foreign pods hold are not free) of preferred, then allowed pools. It is pure (no I/O, no clock) like every policy.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.api.models import DisruptionLimits, PoliciesEnabled, SolverLimits
from policies import pipeline as pp
from policies.placement_instance import foreign_devices
from policies.plan import Explanation, Plan, PolicyName, Reason, SetReplicas, SolverStatus
from policies.snapshot import ModelDeployment, Snapshot


@dataclass(frozen=True)
class PlacementConfig:
    """Knobs of the stand-in placement (the real policy brings its own frozen config)."""

    time_limit_s: float = 2.0


def _pools_for(d: ModelDeployment, snapshot: Snapshot) -> list[str]:
    names = [p.name for p in snapshot.pools]
    allowed = [p for p in names if not d.allowed_pools or p in d.allowed_pools]
    preferred = [p for p in d.preferred_pools if p in allowed]
    return preferred + sorted(p for p in allowed if p not in preferred)


def plan_placement_minimum(snapshot: Snapshot, config: PlacementConfig | None = None,
                           state: dict[str, Any] | None = None) -> Plan:
    """Run each deployment's min replicas; keep existing ones; place new ones first-fit on free GPUs."""
    del config
    held = foreign_devices(snapshot)  # other workloads' GPUs are not free for our replicas
    free: dict[str, int] = {x.name: max(x.gpus - held.get(x.name, 0), 0)
                            for x in snapshot.nodes if x.ready and x.schedulable and x.pool}
    nodes_by_pool: dict[str, list[str]] = defaultdict(list)
    for node in sorted(snapshot.nodes, key=lambda x: x.name):
        if node.name in free and node.pool is not None:
            nodes_by_pool[node.pool].append(node.name)
    order = sorted(snapshot.deployments, key=lambda d: (d.priority.rank, d.name))
    current: dict[tuple[str, str], int] = defaultdict(int)
    for rs in snapshot.replicas:
        current[(rs.deployment, rs.pool)] += rs.replicas

    def fits(pool: str, devices: int, reserve: bool) -> bool:
        """Reserve one replica's devices on nodes of ``pool`` (whole nodes when it spans several)."""
        per_node = snapshot.pool(pool).gpus_per_node
        if devices <= per_node:
            for node in nodes_by_pool[pool]:
                if free[node] >= devices:
                    if reserve:
                        free[node] -= devices
                    return True
            return False
        need = math.ceil(devices / per_node)
        whole = [node for node in nodes_by_pool[pool] if free[node] >= per_node][:need]
        if len(whole) < need:
            return False
        if reserve:
            for node in whole:
                free[node] -= per_node
        return True

    # existing replicas first: they keep their capacity (the scheduler already placed them)
    desired: dict[tuple[str, str], int] = {}
    for d in order:
        target = min(max(d.min_replicas, 0), d.max_replicas)
        kept = 0
        for pool in _pools_for(d, snapshot):
            n = min(current.get((d.name, pool), 0), target - kept)
            for _ in range(n):
                fits(pool, d.parallelism.devices, reserve=True)
            desired[(d.name, pool)] = n
            kept += n
    actions: list[SetReplicas] = []
    short: dict[str, int] = {}
    for d in order:
        target = min(d.min_replicas, d.max_replicas)
        pools = _pools_for(d, snapshot)
        have = sum(desired.get((d.name, p), 0) for p in pools)
        for pool in pools:
            while have < target and fits(pool, d.parallelism.devices, reserve=True):
                desired[(d.name, pool)] = desired.get((d.name, pool), 0) + 1
                have += 1
        if have < target:
            short[d.name] = target - have
    for dep_pool in sorted(current):
        desired.setdefault(dep_pool, 0)
    for (dep, pool), n in sorted(desired.items()):
        prev = current.get((dep, pool), 0)
        if n != prev:
            actions.append(SetReplicas(deployment=dep, pool=pool, replicas=n, previous=prev))
    if short:
        reason = Reason.INSUFFICIENT_CAPACITY
        summary = "no allowed pool has capacity for " + ", ".join(f"{k} ({v} short)" for k, v in sorted(short.items()))
    elif actions:
        reason = Reason.BOUNDS_CHANGED
        summary = f"{len(actions)} replica change(s) to meet minimum replicas"
    else:
        reason, summary = Reason.NO_CHANGE, "every deployment runs its minimum replicas"
    return Plan(
        policy=PolicyName.PLACEMENT,
        actions=tuple(actions),
        explanation=Explanation(
            reason=reason,
            summary=summary,
            solver_status=SolverStatus.HEURISTIC,
            fallback="min-replicas-first-fit",
            metrics={f"short:{k}": float(v) for k, v in short.items()},
        ),
        state=state or {},
    )


# The stand-in's public name: what runs when the FleetPolicy turns placement off or the real one is unavailable.
plan_placement = plan_placement_minimum


def pipeline_config(policies: PoliciesEnabled, limits: SolverLimits,
                    disruption: DisruptionLimits | None = None) -> pp.PipelineConfig:
    """The FleetPolicy's switches as the shared pipeline's config (the simulator builds the same thing).

    The rescheduler plans within the FleetPolicy's migration limit and only when a pending pod waits
    for room (the executor enforces the limit again; planning within it keeps the plan's order useful).
    """
    disruption = disruption or DisruptionLimits()

    def stage(on: bool, config: dict[str, Any] | None = None) -> pp.StageSetting:
        return pp.StageSetting(method=pp.OURS if on else pp.OFF, config=config or {})

    return pp.PipelineConfig(stages={
        pp.Stage.FORECAST: stage(policies.placement),
        pp.Stage.ROUTING: stage(policies.routing),
        pp.Stage.PLACEMENT: stage(policies.placement, {"time_limit_s": limits.placement_s}),
        pp.Stage.MOE: stage(policies.moe),
        pp.Stage.POWER: stage(policies.power),
        pp.Stage.RESCHEDULING: stage(policies.rescheduling, {
            "mnl": disruption.max_migrations_per_cycle, "time_limit_s": limits.rescheduling_s,
            "require_pending": True}),
    })


@dataclass(frozen=True)
class PipelineOutcome:
    plans: list[Plan]
    state: pp.PipelineState
    notes: tuple[str, ...] = ()  # stages that could not run, and why


def run_pipeline(snapshot: Snapshot, policies: PoliciesEnabled | None = None, limits: SolverLimits | None = None,
                 state: pp.PipelineState | None = None, disruption: DisruptionLimits | None = None,
                 reschedule_input: Callable[[Snapshot], Snapshot] | None = None) -> PipelineOutcome:
    """The shared policy pipeline (forecast -> routing -> placement -> moe -> power -> rescheduling).

    When placement is off, unavailable or fails, the stand-in keeps every deployment at its minimum
    replicas, so the controller always has a placement to execute. ``reschedule_input`` widens what
    the last stage sees (every GPU pod and PDB, not only the managed replicas): the stages before it
    run first, then rescheduling alone on ``reschedule_input(projected snapshot)``, with the same
    State threaded through and the wall clock, so its time limit holds.
    """
    policies = policies or PoliciesEnabled()
    limits = limits or SolverLimits()
    state = state or pp.PipelineState()
    notes: list[str] = []
    config = pipeline_config(policies, limits, disruption)
    try:
        if reschedule_input is None or not policies.rescheduling:
            result = pp.run_pipeline(snapshot, config, state)
            plans, state = list(result.plans), result.state
            unavailable = list(result.unavailable)
        else:
            off = pp.StageSetting(method=pp.OFF)
            before = pp.PipelineConfig(stages={**config.stages, pp.Stage.RESCHEDULING: off})
            only = pp.PipelineConfig(stages={s: config.setting(s) if s is pp.Stage.RESCHEDULING else off
                                             for s in pp.STAGE_ORDER})
            first = pp.run_pipeline(snapshot, before, state)
            # the wall clock bounds this stage's search (it runs inside the planner's lock); the
            # stages before it stay bounded by their deterministic limits
            last = pp.run_pipeline(reschedule_input(first.snapshot), only, first.state, clock=time.monotonic)
            plans, state = [*first.plans, *last.plans], last.state
            unavailable = [*first.unavailable, *last.unavailable]
        notes += [f"{u} unavailable" for u in unavailable]
    except Exception as exc:  # a policy bug must not stop the fleet: fall back, and say so
        plans, notes = [], [f"pipeline failed: {type(exc).__name__}: {exc}"]
    if not any(p.policy is PolicyName.PLACEMENT for p in plans):
        plans.insert(0, plan_placement(snapshot))
    return PipelineOutcome(plans, state, tuple(notes))


def shortfall(snapshot: Snapshot, plans: list[Plan], deployment: str) -> int:
    """Replicas below the deployment's minimum after the plans (0 when satisfied)."""
    d = snapshot.deployment(deployment)
    per_pool = {r.pool: r.replicas for r in snapshot.replicas if r.deployment == deployment}
    for plan in plans:
        for a in plan.actions:
            if isinstance(a, SetReplicas) and a.deployment == deployment:
                per_pool[a.pool] = a.replicas
    return max(0, min(d.min_replicas, d.max_replicas) - sum(per_pool.values()))
