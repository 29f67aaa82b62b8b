"""Placement keeps a fallback ready for its large model's bursts (the reserve routing will need)."""

from __future__ import annotations

from typing import Any

import pytest

from policies.placement import PlacementConfig, fallback_reserve, plan_placement
from policies.placement_instance import InstanceParams, build_instance
from policies.plan import SetReplicas
from policies.profiles import REFERENCE_GPUS, default_table
from policies.snapshot import Demand, Fallback, ModelDeployment, ModelShape, Parallelism, Pool, Snapshot

H100 = REFERENCE_GPUS["h100"]


def make_snapshot(big_out: float = 3000.0, small_out: float = 500.0, **big: Any) -> Snapshot:
    large = ModelDeployment(name="big", model=ModelShape(name="llama-3.1-70b", params_b=70, active_params_b=70),
                            parallelism=Parallelism(tp=4), **big)
    small = ModelDeployment(name="small", model=ModelShape(name="llama-3.1-8b", params_b=8, active_params_b=8),
                            target_utilisation=0.8, max_replicas=16)
    return Snapshot(
        pools=(Pool(name="h100", accelerator=H100, gpus_per_node=8, cost_per_device_hour=3.0, max_nodes=4),),
        deployments=(large, small),
        demand=(Demand(deployment="big", output_tokens_per_s=big_out, input_tokens_per_s=3 * big_out),
                Demand(deployment="small", output_tokens_per_s=small_out, input_tokens_per_s=3 * small_out)),
    )


def small_replicas(plan: Any) -> int:
    return sum(a.replicas for a in plan.actions if isinstance(a, SetReplicas) and a.deployment == "small")


def test_reserve_is_surge_times_the_large_models_load_at_the_fallbacks_utilisation() -> None:
    snap = make_snapshot(fallback=Fallback(deployment="small", quality_floor=0.8))
    inst = build_instance(snap, default_table(), InstanceParams())
    need = fallback_reserve(inst, snap, surge=2.0)
    big, small = inst.deployments.index("big"), inst.deployments.index("small")
    assert need[big] == inst.need[big]  # the large model's own need is untouched
    assert need[small] == pytest.approx(inst.need[small] + 2.0 * 3000.0 / 0.8)
    assert (fallback_reserve(inst, snap, surge=0.0) == inst.need).all()
    plain = make_snapshot()  # no fallback configured: no reserve
    inst_plain = build_instance(plain, default_table(), InstanceParams())
    assert (fallback_reserve(inst_plain, plain, surge=2.0) == inst_plain.need).all()


def test_fallback_is_sized_for_the_burst_not_only_for_todays_share() -> None:
    snap = make_snapshot(fallback=Fallback(deployment="small", quality_floor=0.8))
    plain = small_replicas(plan_placement(snap, PlacementConfig(fallback_surge=0.0)))
    ready = small_replicas(plan_placement(snap, PlacementConfig(fallback_surge=2.0)))
    assert ready > plain
    # the reserve never goes past the fallback's bounds
    huge = make_snapshot(big_out=200_000.0, fallback=Fallback(deployment="small", quality_floor=0.8))
    assert small_replicas(plan_placement(huge, PlacementConfig(fallback_surge=2.0))) <= 16
