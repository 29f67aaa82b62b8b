"""POLCA's power-oversubscription mechanism as published, the anchor for the power policy.

POLCA (Patel et al., "POLCA: Power Oversubscription in LLM Cloud Providers", 2023): watch the
domain's measured power; above a first threshold lock the frequency of low-priority inference GPUs;
above a second, cap all GPUs; release each step with hysteresis once power falls a set share below
its threshold; a power brake (every GPU to its minimum) is the last resort. Thresholds are
fractions of the domain budget and are parameters (a PowerDomain's ``thresholds`` override them),
so the benchmark can sweep them. It reacts to measured draw only — it predicts nothing and treats
every low-priority GPU alike — which is exactly what the Wattplane policy is compared against.
"""

from __future__ import annotations

from enum import IntEnum

from pydantic import Field

from policies.plan import Explanation, Plan, PolicyName, Reason, SetPowerCap, SolverStatus
from policies.power_model import clock_for_cap, legal_cap_w
from policies.snapshot import AcceleratorSpec, Fraction, Frozen, PolcaThresholds, PowerDomain, PriorityClass, Snapshot


class PolcaLevel(IntEnum):
    """The domain's capping stage; each edge is one rule of :func:`next_level`."""

    NORMAL = 0  # no caps
    LOW_PRIORITY = 1  # best-effort GPUs frequency-locked
    ALL = 2  # every GPU capped (best-effort at the lower lock)
    BRAKE = 3  # every GPU at its minimum power


class PolcaConfig(Frozen):
    lp_cap_at: Fraction = 0.8  # x budget: above, lock best-effort GPUs
    all_cap_at: Fraction = 0.9  # x budget: above, cap every GPU
    release_below: Fraction = 0.05  # x budget: step down once draw is this far below a stage's threshold
    brake_at: float = Field(default=1.0, gt=0)  # x budget: power brake at or above
    lp_cap_fraction: Fraction = 0.7  # x TDP: the low-priority lock (sent as a clock and a power limit)
    all_cap_fraction: Fraction = 0.8  # x TDP: everyone else's cap in the ALL stage
    low_priority: tuple[PriorityClass, ...] = (PriorityClass.BEST_EFFORT,)
    frequency_lock: bool = True  # POLCA locks clocks; the power limit is sent alongside


class PolcaState(Frozen):
    levels: dict[str, PolcaLevel] = Field(default_factory=dict)  # domain -> current stage


def thresholds_for(domain: PowerDomain, config: PolcaConfig) -> PolcaThresholds:
    """The domain's own thresholds when it sets them, else the config's."""
    if domain.thresholds is not None:
        return domain.thresholds
    return PolcaThresholds(lp_cap_at=config.lp_cap_at, all_cap_at=config.all_cap_at,
                           release_below=config.release_below, brake_at=min(config.brake_at, 1.0))


def next_level(level: PolcaLevel, draw_fraction: float, t: PolcaThresholds) -> PolcaLevel:
    """Escalate straight to the stage the draw calls for; release one stage per cycle with hysteresis."""
    triggers = {PolcaLevel.LOW_PRIORITY: t.lp_cap_at, PolcaLevel.ALL: t.all_cap_at, PolcaLevel.BRAKE: t.brake_at}
    wanted = PolcaLevel.NORMAL
    for stage, at in triggers.items():
        if draw_fraction >= at:
            wanted = stage
    if wanted >= level:
        return wanted
    if draw_fraction < triggers[level] - t.release_below:
        return PolcaLevel(level - 1)
    return level


def cap_for(spec: AcceleratorSpec, priority: PriorityClass, level: PolcaLevel, config: PolcaConfig) -> float | None:
    """The power limit a GPU gets in a stage (None: uncapped)."""
    low = priority in config.low_priority
    if level is PolcaLevel.BRAKE:
        return spec.min_power_w
    if level is PolcaLevel.NORMAL or (level is PolcaLevel.LOW_PRIORITY and not low):
        return None
    fraction = config.lp_cap_fraction if low else config.all_cap_fraction
    cap = legal_cap_w(spec, round(fraction * spec.tdp_w, 1))
    return None if cap is None or cap >= spec.max_power_w else cap


def plan_polca(snapshot: Snapshot, config: PolcaConfig, state: PolcaState) -> Plan:
    pools = {p.name: p for p in snapshot.pools}
    specs = {n.name: pools[n.pool].accelerator for n in snapshot.nodes if n.pool in pools}
    deployments = {d.name: d for d in snapshot.deployments}
    levels: dict[str, PolcaLevel] = {}
    actions: list[SetPowerCap] = []
    metrics: dict[str, float] = {}
    parts: list[str] = []
    for domain in snapshot.power_domains:
        members = set(domain.nodes) | {n.name for n in snapshot.nodes if n.power_domain == domain.name}
        readings = [t for t in snapshot.gpu_telemetry if t.node in members]
        draw = sum(t.power_w for t in readings)
        fraction = draw / domain.budget_w
        old = state.levels.get(domain.name, PolcaLevel.NORMAL)
        level = next_level(old, fraction, thresholds_for(domain, config))
        levels[domain.name] = level
        capped = 0
        for t in sorted(readings, key=lambda t: (t.node, t.index)):
            spec = specs.get(t.node)
            if spec is None:
                continue
            priority = t.priority or (deployments[t.deployment].priority if t.deployment in deployments
                                      else PriorityClass.STANDARD)
            cap = cap_for(spec, priority, level, config)
            capped += cap is not None
            current = legal_cap_w(spec, t.power_limit_w)
            current = None if current is None or current >= spec.max_power_w else current
            if cap == current:
                continue
            clock = clock_for_cap(spec, cap) if (config.frequency_lock and cap is not None) else None
            actions.append(SetPowerCap(node=t.node, gpu=t.index, power_limit_w=cap, clock_limit_mhz=clock,
                                       priority=priority))
        metrics[f"{domain.name}.draw_fraction"] = round(fraction, 4)
        metrics[f"{domain.name}.level"] = float(level)
        metrics[f"{domain.name}.caps_applied"] = float(capped)
        parts.append(f"{domain.name}: draw {fraction:.0%} of budget, stage {old.name} -> {level.name}")
    raised = any(levels[d] > state.levels.get(d, PolcaLevel.NORMAL) for d in levels)
    reason = Reason.NO_CHANGE if not actions else (Reason.OVER_BUDGET if raised else Reason.UNDER_BUDGET)
    return Plan(
        policy=PolicyName.POWER,
        actions=tuple(actions),
        explanation=Explanation(reason=reason, summary=f"POLCA thresholds; {len(actions)} cap changes; "
                                + "; ".join(parts), solver_status=SolverStatus.HEURISTIC if actions
                                else SolverStatus.NOT_RUN, fallback=None, metrics=metrics),
        state=PolcaState(levels=levels).model_dump(mode="json"),
    )


__all__ = ["PolcaConfig", "PolcaLevel", "PolcaState", "cap_for", "next_level", "plan_polca", "thresholds_for"]
