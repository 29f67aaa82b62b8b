"""Make before break when the replacement cannot land: a move into a pool whose GPUs other workloads
hold leaves its new replicas Pending, and the old ready replicas must keep serving (Kubernetes would
not hand their capacity to a replica that has no node)."""

from __future__ import annotations

from typing import Any

import numpy as np

import wattplane.simulate.engine as engine
from policies.pipeline import OFF, STAGE_ORDER, PipelineConfig, StageSetting
from policies.plan import Explanation, Plan, PolicyName, Reason, SetReplicas
from wattplane.simulate.engine import Simulation
from wattplane.simulate.fleet import ApplyReport, SimulatedFleet, apply_plan
from wattplane.simulate.load import generate_load

from .conftest import make_scenario

BIG, H100, A100 = 0, 0, 1
# whole-GPU pods that take every A100 GPU the small model's replica leaves: 8 on the empty node, 7 beside it
FILL_A100 = [(8, 1000, 4000, 16384), (7, 1000, 4000, 16384)]


def _plan(*actions: SetReplicas) -> Plan:
    return Plan(policy=PolicyName.PLACEMENT, actions=actions,
                explanation=Explanation(reason=Reason.DEMAND_CHANGED, summary="test"))


def _move(replicas_on_a100: int) -> Plan:
    return _plan(SetReplicas(deployment="big", pool="h100", replicas=0, previous=2),
                 SetReplicas(deployment="big", pool="a100", replicas=replicas_on_a100, previous=0))


def _full_a100_fleet() -> SimulatedFleet:
    sc = make_scenario(background={"count": 0, "pools": ["a100"]})
    f = SimulatedFleet(sc, np.random.default_rng(0))
    for i, d in enumerate(sc.deployments):
        for pool, n in d.initial_replicas.items():
            f.desired[i, f.pool_index[pool]] = n
    f.reconcile_replicas(0.0)
    f.seed_background(FILL_A100)
    assert len(f.background) == 2 and not f.free_whole()[f.gpu_pool == A100].any()  # the premise
    return f


def _ready(f: SimulatedFleet, dep: int, now: float) -> int:
    return sum(1 for r in f.replicas.values() if r.deployment == dep and r.ready_at <= now)


def test_a_move_into_a_full_pool_keeps_the_old_replicas_serving() -> None:
    f = _full_a100_fleet()
    apply_plan(f, _move(2), 10.0, ApplyReport())
    assert f.pending(BIG, A100) == 2  # nowhere to go
    for now in (10.0, 60.0, 600.0):
        f.reconcile_replicas(now)
        assert len(f.running(BIG, H100)) == 2 and _ready(f, BIG, now) == 2
    assert not f.check()


def test_old_replicas_go_one_for_one_as_replacements_become_ready() -> None:
    f = _full_a100_fleet()
    apply_plan(f, _move(2), 10.0, ApplyReport())
    f.finish_background(1.0)  # the other team's pods finish: room for both replacements
    f.reconcile_replicas(20.0)
    assert len(f.running(BIG, A100)) == 2 and len(f.running(BIG, H100)) == 2  # starting, not ready
    startup = f.scenario.replica_startup_s
    f.reconcile_replicas(20.0 + startup)
    assert len(f.running(BIG, H100)) == 0 and _ready(f, BIG, 20.0 + startup) == 2
    assert not f.check()


def test_a_move_that_also_shrinks_removes_only_what_the_smaller_total_frees() -> None:
    f = _full_a100_fleet()
    apply_plan(f, _move(1), 10.0, ApplyReport())  # 2 on H100 -> 1 on A100 (Pending)
    assert f.pending(BIG, A100) == 1
    assert len(f.running(BIG, H100)) == 1  # the shrink goes at once, the move waits for its replacement
    apply_plan(f, _plan(SetReplicas(deployment="big", pool="a100", replicas=0, previous=1)), 20.0, ApplyReport())
    assert len(f.running(BIG, H100)) == 0  # the deployment removed as a whole: nothing to wait for


def test_simulated_slo_does_not_collapse_when_the_target_pool_is_full(monkeypatch: Any) -> None:
    """Through the engine: a placement plan at the first cycle moves the 70B into the A100 pool other
    pods fill; before the fix its H100 replicas were removed and it served nothing for the rest of the run."""
    sc = make_scenario(background={"count": 0, "pools": ["a100"]}, duration_s=180, load={
        "synthetic": {"requests_per_s": 4}})
    static = PipelineConfig(stages={s: StageSetting(method=OFF) for s in STAGE_ORDER})
    sim = Simulation(sc, static, generate_load(sc, seed=1), seed=1, policy_set="static")
    monkeypatch.setattr(sim, "_trace_pods", lambda: FILL_A100)
    real = engine.run_pipeline
    sent: list[float] = []

    def pipeline_with_a_move(snapshot: Any, config: Any, state: Any, clock: Any = None) -> Any:
        result = real(snapshot, config, state, clock=clock)
        if sent:
            return result
        sent.append(snapshot.now)
        return result.model_copy(update={"plans": (_move(2),)})

    monkeypatch.setattr(engine, "run_pipeline", pipeline_with_a_move)
    result = sim.run()
    assert sent and sent[0] < 60.0  # the move came early in the run
    assert sim.fleet.pending(BIG, A100) == 2  # and never landed
    ready = result.series["ready_replicas"][result.series_labels["ready_replicas"].index("big@h100")]
    assert ready.min() == 2  # the H100 replicas served the whole run
    assert result.per_deployment["big"]["slo_attainment"] > 0.9
    assert not result.invariant_violations
