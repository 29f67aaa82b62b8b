"""The in-memory fleet behind the executor ports: placement, make-before-break, migrations, caps."""

from __future__ import annotations

import numpy as np

from policies.plan import Explanation, MigratePod, Plan, PolicyName, Reason, SetPowerCap, SetReplicas
from wattplane.simulate.fleet import ApplyReport, SimulatedFleet, apply_plan

from .conftest import make_scenario


def _fleet(**overrides: object) -> SimulatedFleet:
    sc = make_scenario(**overrides)
    f = SimulatedFleet(sc, np.random.default_rng(0))
    for i, d in enumerate(sc.deployments):
        for pool, n in d.initial_replicas.items():
            f.desired[i, f.pool_index[pool]] = n
    f.reconcile_replicas(0.0)
    return f


def _plan(*actions: object) -> Plan:
    return Plan(policy=PolicyName.PLACEMENT, actions=actions,  # type: ignore[arg-type]
                explanation=Explanation(reason=Reason.DEMAND_CHANGED, summary="test"))


def test_initial_replicas_are_placed_whole_and_ready() -> None:
    f = _fleet()
    big = [r for r in f.replicas.values() if r.deployment == 0]
    assert len(big) == 2 and all(len(r.gpus) == 4 and r.ready_at == 0.0 for r in big)
    assert all(len(set(f.gpu_node[r.gpus].tolist())) == 1 for r in big)  # TP 4 fits one node
    assert not f.check()


def test_scale_out_beyond_capacity_leaves_pending_and_never_overcommits() -> None:
    f = _fleet()
    report = ApplyReport()
    apply_plan(f, _plan(SetReplicas(deployment="big", pool="h100", replicas=10, previous=2)), 10.0, report)
    assert len(f.running(0, 0)) == 4  # 2 nodes x 8 GPUs / TP 4
    assert f.pending(0, 0) == 6
    assert (f.owner >= 0).sum() == 16 + 1  # h100 full, plus the small model's one A100 GPU
    assert not f.check()


def test_make_before_break_keeps_old_replicas_until_new_ones_are_ready() -> None:
    f = _fleet()
    report = ApplyReport()
    # move "big" from h100 to a100: the a100 replicas start at t=10 and are ready at t=40
    apply_plan(f, _plan(SetReplicas(deployment="big", pool="h100", replicas=0, previous=2),
                        SetReplicas(deployment="big", pool="a100", replicas=2, previous=0)), 10.0, report)
    assert len(f.running(0, 0)) == 2 and len(f.running(0, 1)) == 2
    f.reconcile_replicas(39.0)
    assert len(f.running(0, 0)) == 2  # replacements still starting: old ones keep serving
    f.reconcile_replicas(40.0)
    assert len(f.running(0, 0)) == 0 and len(f.running(0, 1)) == 2


def test_migration_moves_a_background_pod_and_refuses_an_impossible_one() -> None:
    f = _fleet(background={"count": 6, "fractional_share": 1.0, "pools": ["a100"]})
    f.seed_background()
    name, pod = sorted(f.background.items())[0]
    target = next(n for n in f.node_names if n.startswith("a100") and n != f.node_names[pod.node])
    report = ApplyReport()
    apply_plan(f, _plan(MigratePod(pod=name, from_node=f.node_names[pod.node], to_node=target)), 5.0, report)
    assert report.migrations == 1 and f.node_names[f.background[name].node] == target
    apply_plan(f, _plan(MigratePod(pod=name, from_node=target, to_node="no-such-node")), 6.0, report)
    assert report.migrations_rejected == 1
    assert not f.check()


def test_power_caps_go_through_the_executor_and_are_clamped() -> None:
    f = _fleet()
    report = ApplyReport()
    apply_plan(f, _plan(SetPowerCap(node="h100-0000", gpu=3, power_limit_w=50.0)), 1.0, report)
    g = int(f.node_first[0]) + 3
    assert f.cap[g] == f.spec(0).min_power_w  # the agent applies only legal limits
    assert report.caps_set == 1
    apply_plan(f, _plan(SetPowerCap(node="h100-0000", gpu=3, power_limit_w=None)), 2.0, report)
    assert np.isnan(f.cap[g]) and report.caps_set == 1


def test_failed_node_drops_its_replicas() -> None:
    f = _fleet()
    node = int(f.gpu_node[next(iter(f.replicas.values())).gpus[0]])
    before = len(f.replicas)
    f.fail_node(f.node_names[node], True)
    assert len(f.replicas) < before
    assert not f.free_whole()[f.node_gpus(node)].any()
    assert not f.check()
