"""The policy pipeline the reconciler runs on each snapshot: placement first, others as they land.

Until ``policies.placement`` exists, ``plan_placement`` below is a stand-in: min replicas within
bounds, kept where they already run (no churn), new ones first-fit on nodes of preferred, then
allowed pools. To switch to the real policy, change the one import marked PLACEMENT. The stand-in
is pure (no I/O, no clock) like every policy, so swapping it changes no caller.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

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
    free: dict[str, int] = {x.name: x.gpus for x in snapshot.nodes if x.ready and x.schedulable and x.pool}
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


# PLACEMENT: swap for `from policies.placement import plan_placement` when it lands.
plan_placement = plan_placement_minimum


def run_pipeline(snapshot: Snapshot, states: dict[str, dict[str, Any]] | None = None) -> list[Plan]:
    """Placement first; moe, power, routing and rescheduling plug in here in that order."""
    states = states or {}
    return [plan_placement(snapshot, None, states.get(PolicyName.PLACEMENT.value))]


def unplaced(plan: Plan, deployment: str) -> int:
    """Replicas of ``deployment`` the placement could not fit anywhere (0 when satisfied)."""
    return int(plan.explanation.metrics.get(f"short:{deployment}", 0))
