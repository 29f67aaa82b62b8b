"""Status of a ModelDeployment and an AcceleratorPool, computed (purely) from what was observed.

Conditions keep their ``lastTransitionTime`` while their status is unchanged, so rewriting the
same facts is a no-op and the reconciler can skip the write entirely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from controller.api import models as api
from controller.executor import render as r
from controller.executor.executor import Observed
from policies.plan import Plan, SetExpertPlacement, SetPowerCap, SetRoutingShare


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
                  "ScalingReplicas" if not converged else "Converged",
                  f"{replicas} replicas running, {total_desired} desired", now, gen),
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
    pool: api.AcceleratorPool, nodes: Sequence[Mapping[str, Any]], allocated_by_node: Mapping[str, int]
) -> api.AcceleratorPoolStatus:
    """Devices ready / allocated / free, and how fragmented the free devices are."""
    n_ready = devices = devices_ready = allocated = free = stranded = 0
    for node in nodes:
        gpus = int((node.get("status") or {}).get("allocatable", {}).get(r.GPU_RESOURCE, 0) or 0)
        conds = {c.get("type"): c.get("status") for c in (node.get("status") or {}).get("conditions") or []}
        ready = conds.get("Ready") == "True" and not (node.get("spec") or {}).get("unschedulable")
        used = min(gpus, allocated_by_node.get(node["metadata"]["name"], 0))
        devices += gpus
        allocated += used
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
        fragmentation=round(stranded / free, 4) if free else 0.0,
        observed_generation=pool.metadata.get("generation"),
        power_drawn_w=(pool.status.power_drawn_w if pool.status else 0.0),
        caps_in_force=(pool.status.caps_in_force if pool.status else 0),
    )


def wire(status: api.ApiModel) -> dict[str, Any]:
    """The status as the API server stores it (for comparison and for the patch body)."""
    out: dict[str, Any] = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return out
