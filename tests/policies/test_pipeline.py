"""The pure policy pipeline: stage order, periods, state threading, projections, registry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.pipeline import (
    OFF,
    OURS,
    REGISTRY,
    STAGE_ORDER,
    PipelineConfig,
    PipelineState,
    Stage,
    StageSetting,
    UnknownMethodError,
    project,
    project_routing,
    resolve,
    run_pipeline,
)
from policies.plan import Explanation, Plan, PolicyName, Reason, SetPowerCap, SetReplicas, SetRoutingShare
from policies.profiles import REFERENCE_GPUS
from policies.snapshot import (
    Demand,
    GPUTelemetry,
    ModelDeployment,
    ModelShape,
    Node,
    Pool,
    ReplicaSet,
    ServingTelemetry,
    Snapshot,
)


def make_snapshot(now: float = 0.0, rate: float = 1000.0) -> Snapshot:
    pool = Pool(name="h100", accelerator=REFERENCE_GPUS["h100"], gpus_per_node=8, cost_per_device_hour=4.0)
    dep = ModelDeployment(name="m", model=ModelShape(name="llama-3.1-8b", params_b=8, active_params_b=8),
                          min_replicas=1, max_replicas=4)
    return Snapshot(
        now=now, pools=(pool,), nodes=(Node(name="n0", pool="h100", gpus=8),), deployments=(dep,),
        replicas=(ReplicaSet(deployment="m", pool="h100", replicas=1, ready=1),),
        gpu_telemetry=tuple(GPUTelemetry(node="n0", index=i, power_w=300.0) for i in range(8)),
        serving=(ServingTelemetry(deployment="m", requests_per_s=rate / 200, input_tokens_per_s=5 * rate,
                                  output_tokens_per_s=rate),),
    )


def only(**methods: str) -> PipelineConfig:
    return PipelineConfig(stages={s: StageSetting(method=methods.get(s.value, OFF)) for s in STAGE_ORDER})


def _plan(*actions: object) -> Plan:
    return Plan(policy=PolicyName.PLACEMENT, actions=actions,  # type: ignore[arg-type]
                explanation=Explanation(reason=Reason.DEMAND_CHANGED, summary="test"))


def test_all_off_does_nothing_and_demand_is_observed() -> None:
    res = run_pipeline(make_snapshot(), only(), PipelineState())
    assert res.plans == () and res.ran == ()
    assert res.demand[0].output_tokens_per_s == 1000.0


def test_unknown_method_is_rejected_with_choices() -> None:
    with pytest.raises(UnknownMethodError, match=r"power: unknown method 'magic' \(choose from off"):
        run_pipeline(make_snapshot(), only(power="magic"), PipelineState())


def test_forecast_state_is_threaded_between_cycles() -> None:
    cfg = only(forecast=OURS)
    r1 = run_pipeline(make_snapshot(0.0, 1000.0), cfg, PipelineState())
    assert "forecast/wattplane" in r1.state.states
    # the forecast falls slowly (scale-down window): a drop in observed load is not followed at once
    r2 = run_pipeline(make_snapshot(30.0, 100.0), cfg, r1.state)
    assert r2.demand[0].output_tokens_per_s > 100.0
    fresh = run_pipeline(make_snapshot(30.0, 100.0), cfg, PipelineState())
    assert fresh.demand[0].output_tokens_per_s == pytest.approx(100.0)


def test_stage_period_skips_until_due() -> None:
    cfg = PipelineConfig(stages={s: StageSetting(method=OURS if s == Stage.FORECAST else OFF,
                                                 period_s=60.0 if s == Stage.FORECAST else 0.0)
                                 for s in STAGE_ORDER})
    r1 = run_pipeline(make_snapshot(0.0), cfg, PipelineState())
    r2 = run_pipeline(make_snapshot(30.0), cfg, r1.state)
    r3 = run_pipeline(make_snapshot(60.0), cfg, r2.state)
    assert (r1.ran, r2.ran, r3.ran) == (("forecast",), (), ("forecast",))


def test_project_replicas_caps_and_routing() -> None:
    snap = make_snapshot()
    snap = snap.model_copy(update={"demand": (Demand(deployment="m", output_tokens_per_s=1000.0,
                                                     input_tokens_per_s=5000.0, requests_per_s=5.0),)})
    out = project(snap, _plan(SetReplicas(deployment="m", pool="h100", replicas=3, previous=1),
                              SetPowerCap(node="n0", gpu=2, power_limit_w=400.0)))
    assert out.current_replicas("m", "h100") == 3
    assert [g.power_limit_w for g in out.gpu_telemetry][1:4] == [None, 400.0, None]
    moved = project_routing(snap.demand, [SetRoutingShare(deployment="m", fallback="s", threshold=0.5,
                                                          fallback_share=0.25)])
    by = {d.deployment: d for d in moved}
    assert by["m"].output_tokens_per_s == pytest.approx(750.0)
    assert by["s"].output_tokens_per_s == pytest.approx(250.0)
    assert sum(d.requests_per_s for d in moved) == pytest.approx(5.0)


def test_registry_entries_resolve_when_their_module_exists() -> None:
    """A typo in an entry must not hide as 'not available yet' once the module is there."""
    import importlib.util

    for (stage, method), entry in REGISTRY.items():
        if importlib.util.find_spec(entry.module) is None:
            continue
        module = importlib.import_module(entry.module)
        if not hasattr(module, entry.function):
            continue  # the module exists but its policy function has not landed yet
        assert resolve(stage, method) is not None, (stage, method, entry)


def test_every_stage_has_ours_registered() -> None:
    for s in STAGE_ORDER:
        assert (s, OURS) in REGISTRY


@settings(max_examples=60, deadline=None)
@given(
    out=st.lists(st.floats(0, 1e5), min_size=2, max_size=4),
    shares=st.lists(st.floats(0, 1), min_size=1, max_size=3),
)
def test_routing_projection_conserves_demand(out: list[float], shares: list[float]) -> None:
    names = [f"d{i}" for i in range(len(out))]
    demand = tuple(Demand(deployment=n, output_tokens_per_s=o, input_tokens_per_s=5 * o, requests_per_s=o / 200)
                   for n, o in zip(names, out, strict=True))
    actions = [SetRoutingShare(deployment=names[i % len(names)], fallback=names[(i + 1) % len(names)],
                               threshold=0.5, fallback_share=s) for i, s in enumerate(shares)]
    moved = project_routing(demand, actions)
    assert sum(d.output_tokens_per_s for d in moved) == pytest.approx(sum(out), rel=1e-9, abs=1e-6)
    assert all(d.output_tokens_per_s >= 0 and d.requests_per_s >= 0 for d in moved)
