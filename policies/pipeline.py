"""The policy pipeline: forecast -> routing -> placement -> moe -> power -> rescheduling.

The controller and ``wattplane simulate`` run this one function, so a simulation exercises the same
decisions the cluster would get. Each stage is chosen per run as ``wattplane`` (our policy), a
baseline's name (``greedy``, ``eplb``, ``polca``, ``descheduler``, ``threshold``, ...) or ``off``.

Why the stages see each other's decisions: a later stage must plan for the fleet the earlier
stages asked for (placement sizes for the demand left after routing; power caps the replicas
placement wants). After each stage the pipeline *projects* its plan onto the snapshot (pure
functions below) and hands the projected snapshot to the next stage; the caller's executor applies
the plans to the real (or simulated) world afterwards.

Each stage may run on its own period (power every few seconds, placement every minute): a stage
that is not due returns no plan this cycle. Every stage's State is threaded through
:class:`PipelineState`, a JSON-able value the caller stores between cycles.

A policy plugs in by one :data:`REGISTRY` entry naming its module, function, config and state
classes. Entries are resolved when first used, so a missing module (a policy still being built)
makes only that stage unavailable — the pipeline says so in :attr:`PipelineResult.unavailable`
and runs the rest.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from policies.plan import (
    MigratePod,
    Plan,
    SetExpertPlacement,
    SetPowerCap,
    SetReplicas,
    SetRoutingShare,
)
from policies.snapshot import Demand, ExpertPlacement, Frozen, GPUTelemetry, NonNegFloat, ReplicaSet, Snapshot

OURS = "wattplane"
OFF = "off"


class Stage(StrEnum):
    FORECAST = "forecast"
    ROUTING = "routing"
    PLACEMENT = "placement"
    MOE = "moe"
    POWER = "power"
    RESCHEDULING = "rescheduling"


STAGE_ORDER: tuple[Stage, ...] = (
    Stage.FORECAST, Stage.ROUTING, Stage.PLACEMENT, Stage.MOE, Stage.POWER, Stage.RESCHEDULING,
)


@dataclass(frozen=True)
class PolicyEntry:
    """Where one (stage, method) lives: ``module.function(snapshot, config, state)``.

    ``config`` and ``state`` name classes importable from ``module`` as ``"Name"`` or from another
    module as ``"pkg.mod:Name"``; a pydantic config is validated from the scenario's dict, a
    dataclass built from it. ``state=None`` marks a stateless baseline, called as
    ``function(snapshot, config)``. ``kind`` is ``plan`` for policies returning a :class:`Plan`,
    ``forecast`` for the forecast (which returns demand plus its state rather than actions).
    """

    module: str
    function: str
    config: str
    state: str | None
    kind: str = "plan"


# (stage, method) -> entry. Baselines are named by their anchor (design §6).
REGISTRY: Mapping[tuple[Stage, str], PolicyEntry] = {
    (Stage.FORECAST, OURS): PolicyEntry("policies.forecast", "forecast_demand", "ForecastConfig", "ForecastState",
                                        kind="forecast"),
    (Stage.PLACEMENT, OURS): PolicyEntry("policies.placement", "plan_placement", "PlacementConfig", "PlacementState"),
    (Stage.PLACEMENT, "greedy"): PolicyEntry("policies.baselines.greedy", "plan_greedy",
                                             "policies.placement_instance:InstanceParams", None),
    (Stage.MOE, OURS): PolicyEntry("policies.moe", "plan_moe", "MoEConfig", "MoEState"),
    (Stage.MOE, "eplb"): PolicyEntry("policies.baselines.eplb", "plan_eplb", "EPLBConfig", None),
    (Stage.POWER, OURS): PolicyEntry("policies.power", "plan_power", "PowerConfig", "PowerState"),
    (Stage.POWER, "polca"): PolicyEntry("policies.baselines.polca", "plan_polca", "PolcaConfig", "PolcaState"),
    (Stage.RESCHEDULING, OURS): PolicyEntry("policies.rescheduling", "plan_reschedule", "RescheduleConfig",
                                            "RescheduleState"),
    (Stage.RESCHEDULING, "descheduler"): PolicyEntry("policies.baselines.descheduler", "plan_descheduler",
                                                     "DeschedulerConfig", None),
    (Stage.ROUTING, OURS): PolicyEntry("policies.routing", "plan_routing", "RoutingConfig", "RoutingState"),
    (Stage.ROUTING, "threshold"): PolicyEntry("policies.routing", "plan_threshold", "RoutingConfig",
                                              "RoutingState"),
}

# The anchor each stage is compared against by ``--compare baselines``.
BASELINES: Mapping[Stage, str] = {
    Stage.FORECAST: OFF,
    Stage.ROUTING: "threshold",
    Stage.PLACEMENT: "greedy",
    Stage.MOE: "eplb",
    Stage.POWER: "polca",
    Stage.RESCHEDULING: "descheduler",
}


class StageSetting(Frozen):
    """How one stage runs: which method, how often, and its config (validated by the policy's class)."""

    method: str = OURS
    period_s: NonNegFloat = 0.0  # 0: every cycle
    config: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(Frozen):
    stages: dict[Stage, StageSetting] = Field(default_factory=dict)

    def setting(self, stage: Stage) -> StageSetting:
        return self.stages.get(stage, StageSetting())

    def methods(self) -> dict[str, str]:
        return {s.value: self.setting(s).method for s in STAGE_ORDER}


def uniform_config(method_per_stage: Mapping[Stage, str], base: PipelineConfig | None = None) -> PipelineConfig:
    """``base`` with each named stage's method replaced (periods and configs kept)."""
    base = base or PipelineConfig()
    stages = {s: base.setting(s) for s in STAGE_ORDER}
    for s, m in method_per_stage.items():
        stages[s] = stages[s].model_copy(update={"method": m})
    return PipelineConfig(stages=stages)


class PipelineState(Frozen):
    """Each stage's State as JSON (keyed ``stage/method``) and when it last ran."""

    states: dict[str, dict[str, Any]] = Field(default_factory=dict)
    last_run: dict[str, float] = Field(default_factory=dict)


class PipelineResult(Frozen):
    plans: tuple[Plan, ...] = ()
    demand: tuple[Demand, ...] = ()
    snapshot: Snapshot  # the input with every plan projected onto it
    state: PipelineState
    ran: tuple[str, ...] = ()  # stages that ran this cycle
    unavailable: tuple[str, ...] = ()  # "stage/method" whose module is not importable
    stage_ms: dict[str, float] = Field(default_factory=dict)  # wall time per stage, when a clock was given


class UnknownMethodError(ValueError):
    """A stage names a method with no registry entry."""


def available_methods(stage: Stage) -> tuple[str, ...]:
    return (OFF, *(m for (s, m) in REGISTRY if s == stage))


def check_config(config: PipelineConfig) -> None:
    """Raise :class:`UnknownMethodError` naming every stage whose method is not registered."""
    bad = [
        f"{s.value}: unknown method {config.setting(s).method!r} (choose from {', '.join(available_methods(s))})"
        for s in STAGE_ORDER
        if config.setting(s).method != OFF and (s, config.setting(s).method) not in REGISTRY
    ]
    if bad:
        raise UnknownMethodError("; ".join(bad))


@dataclass(frozen=True)
class _Resolved:
    call: Callable[..., Any]
    config_cls: type[Any]
    state_cls: type[BaseModel] | None
    kind: str
    takes_clock: bool = False

    def make_config(self, values: Mapping[str, Any]) -> Any:
        if issubclass(self.config_cls, BaseModel):
            return self.config_cls.model_validate(dict(values))
        return self.config_cls(**values)


def resolve(stage: Stage, method: str) -> _Resolved | None:
    """The callable and classes of a registry entry, or None when it is not there yet.

    "Not there yet" is a missing module or a missing name in it (a policy still being written);
    any other import error propagates.
    """
    entry = REGISTRY.get((stage, method))
    if entry is None:
        raise UnknownMethodError(f"{stage.value}: unknown method {method!r}")
    try:
        module = importlib.import_module(entry.module)
        call = getattr(module, entry.function)
        config_cls = _class(module, entry.config)
        state_cls = _class(module, entry.state) if entry.state is not None else None
    except ModuleNotFoundError as exc:
        if exc.name is not None and entry.module.startswith(exc.name):
            return None
        raise
    except AttributeError:
        return None
    takes_clock = "clock" in inspect.signature(call).parameters
    return _Resolved(call=call, config_cls=config_cls, state_cls=state_cls, kind=entry.kind, takes_clock=takes_clock)


def _class(module: Any, name: str) -> type[Any]:
    if ":" in name:
        mod, _, attr = name.partition(":")
        return getattr(importlib.import_module(mod), attr)  # type: ignore[no-any-return]
    return getattr(module, name)  # type: ignore[no-any-return]


def run_pipeline(snapshot: Snapshot, config: PipelineConfig, state: PipelineState,
                 clock: Callable[[], float] | None = None) -> PipelineResult:
    """Run every due stage in order on the progressively projected snapshot (module docstring).

    ``clock`` (seconds, e.g. ``time.perf_counter`` passed in by the caller) times each stage into
    :attr:`PipelineResult.stage_ms` and is handed to every policy that takes one, so their time
    limits hold (without it a search is bounded by its step counts only: reproducible, but its
    run time is not bounded by the configured seconds).
    """
    check_config(config)
    plans: list[Plan] = []
    ran: list[str] = []
    unavailable: list[str] = []
    states = dict(state.states)
    last_run = dict(state.last_run)
    stage_ms: dict[str, float] = {}
    current = snapshot
    demand: tuple[Demand, ...] = snapshot.demand or observed_demand(snapshot)
    current = current.model_copy(update={"demand": demand})
    for stage in STAGE_ORDER:
        setting = config.setting(stage)
        if setting.method == OFF or not _due(stage, setting, snapshot.now, last_run):
            continue
        resolved = resolve(stage, setting.method)
        key = f"{stage.value}/{setting.method}"
        if resolved is None:
            unavailable.append(key)
            continue
        policy_config = resolved.make_config(setting.config)
        t0 = clock() if clock is not None else 0.0
        ran.append(stage.value)
        last_run[stage.value] = snapshot.now
        extra: dict[str, Any] = {"clock": clock} if clock is not None and resolved.takes_clock else {}
        if resolved.state_cls is None:
            plan: Plan = resolved.call(current, policy_config, **extra)
            plans.append(plan)
            current = project(current, plan)
        elif resolved.kind == "forecast":
            forecast = resolved.call(current, policy_config, resolved.state_cls.model_validate(states.get(key, {})),
                                     **extra)
            demand = tuple(forecast.demand)
            states[key] = forecast.state.model_dump(mode="json")
            current = current.model_copy(update={"demand": demand})
        else:
            plan = resolved.call(current, policy_config, resolved.state_cls.model_validate(states.get(key, {})),
                                 **extra)
            states[key] = dict(plan.state)
            plans.append(plan)
            current = project(current, plan)
        if clock is not None:
            stage_ms[stage.value] = (clock() - t0) * 1000
    return PipelineResult(
        plans=tuple(plans), demand=demand, snapshot=current,
        state=PipelineState(states=states, last_run=last_run), ran=tuple(ran), unavailable=tuple(unavailable),
        stage_ms=stage_ms,
    )


def _due(stage: Stage, setting: StageSetting, now: float, last_run: Mapping[str, float]) -> bool:
    last = last_run.get(stage.value)
    return last is None or now - last >= setting.period_s - 1e-9


def observed_demand(snapshot: Snapshot) -> tuple[Demand, ...]:
    """Demand as currently served (what placement sees when the forecast stage is off)."""
    return tuple(
        Demand(deployment=s.deployment, input_tokens_per_s=s.input_tokens_per_s,
               output_tokens_per_s=s.output_tokens_per_s, requests_per_s=s.requests_per_s)
        for s in snapshot.serving
    )


# -- projecting a plan onto the snapshot (pure) -------------------------------------------------

def project(snapshot: Snapshot, plan: Plan) -> Snapshot:
    """The snapshot as it will be once ``plan`` is applied, for the stages that follow."""
    update: dict[str, Any] = {}
    replicas = [a for a in plan.actions if isinstance(a, SetReplicas)]
    if replicas:
        update["replicas"] = _project_replicas(snapshot.replicas, replicas)
    shares = [a for a in plan.actions if isinstance(a, SetRoutingShare)]
    if shares:
        update["demand"] = project_routing(snapshot.demand, shares)
    placements = [a for a in plan.actions if isinstance(a, SetExpertPlacement)]
    if placements:
        new = {p.deployment: p for p in placements}
        update["expert_placements"] = tuple(
            ExpertPlacement(deployment=e.deployment, version=new[e.deployment].version,
                            devices=new[e.deployment].devices, slots_per_device=new[e.deployment].slots_per_device,
                            phy2log=new[e.deployment].phy2log)
            if e.deployment in new else e
            for e in snapshot.expert_placements
        ) + tuple(
            ExpertPlacement(deployment=p.deployment, version=p.version, devices=p.devices,
                            slots_per_device=p.slots_per_device, phy2log=p.phy2log)
            for p in placements
            if p.deployment not in {e.deployment for e in snapshot.expert_placements}
        )
    caps = {(a.node, a.gpu): a for a in plan.actions if isinstance(a, SetPowerCap)}
    if caps:
        update["gpu_telemetry"] = tuple(_project_cap(g, caps.get((g.node, g.index))) for g in snapshot.gpu_telemetry)
    moves = {a.pod: a.to_node for a in plan.actions if isinstance(a, MigratePod)}
    if moves:
        update["pods"] = tuple(
            p.model_copy(update={"node": moves[p.name]}) if p.name in moves else p
            for p in snapshot.pods
        )
    return snapshot.model_copy(update=update) if update else snapshot


def _project_replicas(current: tuple[ReplicaSet, ...], actions: list[SetReplicas]) -> tuple[ReplicaSet, ...]:
    wanted = {(a.deployment, a.pool): a.replicas for a in actions}
    out = [
        ReplicaSet(deployment=r.deployment, pool=r.pool, replicas=wanted.pop((r.deployment, r.pool)),
                   ready=r.ready)
        if (r.deployment, r.pool) in wanted else r
        for r in current
    ]
    out += [ReplicaSet(deployment=d, pool=p, replicas=n) for (d, p), n in wanted.items()]
    return tuple(out)


def project_routing(demand: tuple[Demand, ...], shares: list[SetRoutingShare]) -> tuple[Demand, ...]:
    """Move ``fallback_share`` of each routed deployment's demand onto its fallback."""
    by_name = {d.deployment: [d.input_tokens_per_s, d.output_tokens_per_s, d.requests_per_s] for d in demand}
    for s in shares:
        src = by_name.get(s.deployment)
        if src is None:
            continue
        moved = [x * s.fallback_share for x in src]
        by_name[s.deployment] = [x - m for x, m in zip(src, moved, strict=True)]
        dst = by_name.setdefault(s.fallback, [0.0, 0.0, 0.0])
        by_name[s.fallback] = [x + m for x, m in zip(dst, moved, strict=True)]
    return tuple(
        Demand(deployment=n, input_tokens_per_s=max(v[0], 0.0), output_tokens_per_s=max(v[1], 0.0),
               requests_per_s=max(v[2], 0.0))
        for n, v in by_name.items()
    )


def _project_cap(g: GPUTelemetry, cap: SetPowerCap | None) -> GPUTelemetry:
    if cap is None:
        return g
    return g.model_copy(update={"power_limit_w": cap.power_limit_w})


__all__ = [
    "BASELINES", "OFF", "OURS", "REGISTRY", "STAGE_ORDER", "PipelineConfig", "PipelineResult", "PipelineState",
    "PolicyEntry", "Stage", "StageSetting", "UnknownMethodError", "available_methods", "check_config",
    "observed_demand", "project", "project_routing", "resolve", "run_pipeline", "uniform_config",
]
