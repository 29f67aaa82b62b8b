"""The POLCA baseline: thresholds escalate, hysteresis releases, brake as last resort."""

from __future__ import annotations

import pytest

from policies.baselines.polca import PolcaConfig, PolcaLevel, PolcaState, next_level, plan_polca, thresholds_for
from policies.plan import Reason, SetPowerCap
from policies.power_model import clock_for_cap
from policies.snapshot import (
    AcceleratorSpec,
    GPUTelemetry,
    Node,
    PolcaThresholds,
    Pool,
    PowerDomain,
    PriorityClass,
    Snapshot,
)

H100 = AcceleratorSpec(
    model="H100-80GB", memory_gib=80, bf16_tflops=989, hbm_gbps=3350, tdp_w=700, min_power_w=200, max_power_w=700
)
BE, LC = PriorityClass.BEST_EFFORT, PriorityClass.LATENCY_CRITICAL
T = PolcaThresholds(lp_cap_at=0.8, all_cap_at=0.9, release_below=0.05, brake_at=1.0)


def make_snapshot(draw_each: float, limits: list[float | None] | None = None,
                  thresholds: PolcaThresholds | None = None) -> Snapshot:
    """Four GPUs (two best-effort, two latency-critical) under a 2,000 W budget."""
    prios = [BE, BE, LC, LC]
    limits = limits or [None] * 4
    return Snapshot(
        pools=(Pool(name="h100", accelerator=H100, gpus_per_node=1, cost_per_device_hour=2.0),),
        nodes=tuple(Node(name=f"n{i}", pool="h100", gpus=1, power_domain="row") for i in range(4)),
        power_domains=(PowerDomain(name="row", budget_w=2000.0, thresholds=thresholds),),
        gpu_telemetry=tuple(
            GPUTelemetry(node=f"n{i}", index=0, power_w=draw_each, priority=p, power_limit_w=lim)
            for i, (p, lim) in enumerate(zip(prios, limits, strict=True))
        ),
    )


@pytest.mark.parametrize(
    ("level", "draw", "expected"),
    [
        (PolcaLevel.NORMAL, 0.5, PolcaLevel.NORMAL),
        (PolcaLevel.NORMAL, 0.85, PolcaLevel.LOW_PRIORITY),
        (PolcaLevel.NORMAL, 0.95, PolcaLevel.ALL),
        (PolcaLevel.NORMAL, 1.02, PolcaLevel.BRAKE),
        (PolcaLevel.LOW_PRIORITY, 0.78, PolcaLevel.LOW_PRIORITY),  # inside the release band
        (PolcaLevel.LOW_PRIORITY, 0.74, PolcaLevel.NORMAL),
        (PolcaLevel.ALL, 0.87, PolcaLevel.ALL),
        (PolcaLevel.ALL, 0.84, PolcaLevel.LOW_PRIORITY),
        (PolcaLevel.ALL, 0.30, PolcaLevel.LOW_PRIORITY),  # one stage per cycle
        (PolcaLevel.BRAKE, 0.97, PolcaLevel.BRAKE),
        (PolcaLevel.BRAKE, 0.94, PolcaLevel.ALL),
    ],
)
def test_next_level_table(level: PolcaLevel, draw: float, expected: PolcaLevel) -> None:
    assert next_level(level, draw, T) is expected


def caps(plan_actions: tuple[object, ...]) -> dict[str, float | None]:
    return {a.node: a.power_limit_w for a in plan_actions if isinstance(a, SetPowerCap)}


def test_first_threshold_locks_only_best_effort_gpus() -> None:
    plan = plan_polca(make_snapshot(425.0), PolcaConfig(), PolcaState())  # 85% of budget
    got = caps(plan.actions)
    assert set(got) == {"n0", "n1"} and set(got.values()) == {490.0}
    assert all(a.clock_limit_mhz == pytest.approx(clock_for_cap(H100, 490.0)) for a in plan.actions
               if isinstance(a, SetPowerCap))
    assert plan.explanation.reason is Reason.OVER_BUDGET


def test_second_threshold_caps_everyone_and_brake_goes_to_minimum() -> None:
    plan = plan_polca(make_snapshot(475.0), PolcaConfig(), PolcaState())  # 95%
    got = caps(plan.actions)
    assert got == {"n0": 490.0, "n1": 490.0, "n2": 560.0, "n3": 560.0}
    brake = plan_polca(make_snapshot(510.0), PolcaConfig(), PolcaState())  # 102%
    assert set(caps(brake.actions).values()) == {H100.min_power_w}


def test_release_waits_for_the_hysteresis_band_over_cycles() -> None:
    config = PolcaConfig()
    first = plan_polca(make_snapshot(425.0), config, PolcaState())
    state = PolcaState.model_validate(first.state)
    limits: list[float | None] = [490.0, 490.0, None, None]
    inside = plan_polca(make_snapshot(390.0, limits), config, state)  # 78%: still capped
    assert inside.actions == ()
    below = plan_polca(make_snapshot(370.0, limits), config, PolcaState.model_validate(inside.state))  # 74%
    assert caps(below.actions) == {"n0": None, "n1": None}


def test_domain_thresholds_override_the_config() -> None:
    own = PolcaThresholds(lp_cap_at=0.5, all_cap_at=0.6, release_below=0.05, brake_at=1.0)
    assert thresholds_for(make_snapshot(0.0, thresholds=own).power_domains[0], PolcaConfig()) == own
    plan = plan_polca(make_snapshot(275.0, thresholds=own), PolcaConfig(), PolcaState())  # 55%
    assert set(caps(plan.actions)) == {"n0", "n1"}
