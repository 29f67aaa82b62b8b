"""Placement meets min_replicas before any load arrives, whatever pools look alike.

A controller once placed nothing for minutes (docs/architecture.md, the no-placement run): with no
demand yet, each deployment's replicas come from its min_replicas alone; when the cluster held two
identical pools, the LP put the minimum in the one the per-deployment search then set aside as
dominated, the search never tried a replica beyond what the need asks for, and it reported zero
replicas as proven optimal.
"""

from __future__ import annotations

import pytest

from policies.placement import PlacementConfig, PlacementState, plan_placement
from policies.plan import Reason, SetReplicas
from policies.profiles import REFERENCE_GPUS
from policies.snapshot import ModelDeployment, ModelShape, Parallelism, Pool, Snapshot

H100, A100 = REFERENCE_GPUS["h100"], REFERENCE_GPUS["a100"]


def _pool(name: str, acc: object = H100, price: float = 0.0, nodes: int = 3) -> Pool:
    return Pool(name=name, accelerator=acc, gpus_per_node=8, cost_per_device_hour=price, max_nodes=nodes)


def _dep(name: str, size: float, tp: int, ep: int = 1, min_replicas: int = 1) -> ModelDeployment:
    return ModelDeployment(name=name, model=ModelShape(name=name, params_b=size, active_params_b=size),
                           parallelism=Parallelism(tp=tp, ep=ep), min_replicas=min_replicas, max_replicas=8)


DEPLOYMENTS = (_dep("ns/chat-70b", 70, 4), _dep("ns/chat-8b", 8, 1), _dep("ns/moe", 30, 2, ep=2, min_replicas=2))


@pytest.mark.parametrize("pools", [
    (_pool("a"), _pool("b")),  # the CI case: two identical pools (leftovers of other tests)
    (_pool("a"), _pool("b"), _pool("c")),
    (_pool("a100", A100, 2.2, 4), _pool("h100", H100, 4.0, 4), _pool("rs-1"), _pool("rs-2")),
    (_pool("a", nodes=2), _pool("b", nodes=3)),
], ids=["two-alike", "three-alike", "quickstart-plus-two-alike", "alike-but-sizes"])
def test_every_minimum_is_placed_with_no_demand(pools: tuple[Pool, ...]) -> None:
    snap = Snapshot(pools=pools, deployments=DEPLOYMENTS, now=1000.0)
    plan = plan_placement(snap, PlacementConfig(), PlacementState())
    placed: dict[str, int] = {}
    for a in plan.actions:
        assert isinstance(a, SetReplicas)
        placed[a.deployment] = placed.get(a.deployment, 0) + a.replicas
    assert placed == {d.name: d.min_replicas for d in DEPLOYMENTS}, plan.explanation.summary
    assert plan.explanation.reason is Reason.DEMAND_CHANGED
    # the bound it reports is below what it found, as a bound must be (it once "proved" the empty plan)
    e = plan.explanation
    assert e.objective is not None and e.bound is not None and e.bound <= e.objective + 1e-6


def test_the_minimum_stays_when_it_is_already_met() -> None:
    """No churn: once the minimum runs, a plan with no demand changes nothing."""
    from policies.snapshot import ReplicaSet

    pools = (_pool("a"), _pool("b"))
    running = (ReplicaSet(deployment="ns/chat-70b", pool="b", replicas=1),
               ReplicaSet(deployment="ns/chat-8b", pool="a", replicas=1),
               ReplicaSet(deployment="ns/moe", pool="b", replicas=2))
    snap = Snapshot(pools=pools, deployments=DEPLOYMENTS, replicas=running, now=1000.0)
    plan = plan_placement(snap, PlacementConfig(), PlacementState())
    assert plan.actions == (), plan.explanation.summary
