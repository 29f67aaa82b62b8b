"""Placement and routing count only the GPUs other workloads leave free.

On a shared cluster a 70B replica was once placed into a pool whose GPUs another team's pods held,
and stayed Pending while a free pool sat empty: the pool's devices were all counted as
Wattplane's. Foreign pods are pods bound to a node that are no replica of a deployment in the
snapshot (``policies.placement_instance.foreign_devices``).
"""

from __future__ import annotations

from typing import Any

import pytest

from policies.placement import PlacementConfig, PlacementState, plan_placement
from policies.placement_instance import build_instance, foreign_devices, pool_room
from policies.plan import SetReplicas
from policies.profiles import REFERENCE_GPUS, default_table
from policies.routing import growth_capacity
from policies.snapshot import ModelDeployment, ModelShape, Node, Parallelism, Pod, Pool, ReplicaSet, Snapshot

H100 = REFERENCE_GPUS["h100"]


def _pool(name: str, price: float, max_nodes: int | None = None) -> Pool:
    return Pool(name=name, accelerator=H100, gpus_per_node=8, cost_per_device_hour=price, max_nodes=max_nodes)


def _nodes(pool: str, count: int = 2) -> tuple[Node, ...]:
    return tuple(Node(name=f"{pool}-{i}", pool=pool, accelerator_model=H100.model, gpus=8) for i in range(count))


def _dep(name: str, tp: int, replicas: int, size: float = 70, **kw: Any) -> ModelDeployment:
    """A deployment held at exactly ``replicas`` by its minimum (no demand: the minimum decides)."""
    return ModelDeployment(name=name, model=ModelShape(name="llama-3.1-70b" if size > 10 else "llama-3.1-8b",
                                                       params_b=size, active_params_b=size),
                           parallelism=Parallelism(tp=tp), min_replicas=replicas, max_replicas=replicas, **kw)


def _foreign(node: str, gpus: int, name: str = "", milli: int = 1000, indices: tuple[int, ...] = ()) -> Pod:
    return Pod(name=name or f"other-team/{node}-{gpus}-{milli}-{indices}", node=node, num_gpu=gpus, gpu_milli=milli,
               gpu_indices=indices)


def _snapshot(pods: tuple[Pod, ...], deployments: tuple[ModelDeployment, ...], **kw: Any) -> Snapshot:
    # "cheap" is the pool placement prefers when both are free
    return Snapshot(pools=(_pool("cheap", 1.0), _pool("dear", 3.0)), nodes=_nodes("cheap") + _nodes("dear"),
                    deployments=deployments, pods=pods, now=100.0, **kw)


def _placed(snap: Snapshot) -> dict[str, int]:
    plan = plan_placement(snap, PlacementConfig(), PlacementState())
    out = {(r.deployment, r.pool): r.replicas for r in snap.replicas}
    for a in plan.actions:
        assert isinstance(a, SetReplicas)
        out[(a.deployment, a.pool)] = a.replicas
    per_pool: dict[str, int] = {}
    for (_, pool), n in out.items():
        per_pool[pool] = per_pool.get(pool, 0) + n
    return per_pool


def test_a_pool_full_of_foreign_pods_gets_no_replicas() -> None:
    deps = (_dep("ns/chat-70b", tp=8, replicas=2),)
    assert _placed(_snapshot((), deps)).get("cheap") == 2  # control: both free, the cheap pool wins
    full = tuple(_foreign(f"cheap-{i}", 4, name=f"other/job-{i}-{k}") for i in range(2) for k in range(2))
    placed = _placed(_snapshot(full, deps))
    assert placed.get("cheap", 0) == 0
    assert placed.get("dear") == 2


def test_a_partly_used_pool_gets_only_what_fits_node_by_node() -> None:
    """One GPU of cheap-0 is partly used (a fractional pod): that node takes no whole-node replica,
    and smaller replicas use its other seven devices."""
    pods = (_foreign("cheap-0", 1, milli=300),)
    wide = _placed(_snapshot(pods, (_dep("ns/chat-70b", tp=8, replicas=2),)))
    assert wide == {"cheap": 1, "dear": 1}
    half = _placed(_snapshot(pods, (_dep("ns/chat-70b", tp=4, replicas=4),)))
    assert half == {"cheap": 3, "dear": 1}  # 1 on cheap-0 (7 free), 2 on cheap-1
    inst = build_instance(_snapshot(pods, (_dep("ns/chat-70b", tp=4, replicas=4),)), default_table())
    assert inst.pool_devices.tolist() == [15.0, 16.0]


def test_pending_and_own_pods_hold_nothing_foreign() -> None:
    deps = (_dep("ns/chat-70b", tp=8, replicas=2),)
    pending = Pod(name="other/waiting", node=None, num_gpu=8, gpu_milli=1000)
    ours = Pod(name="ns/chat-70b-0", node="cheap-0", num_gpu=8, gpu_milli=1000, deployment="ns/chat-70b")
    snap = _snapshot((pending, ours), deps, replicas=(ReplicaSet(deployment="ns/chat-70b", pool="cheap", replicas=1),))
    assert foreign_devices(snap) == {}
    assert _placed(snap).get("cheap") == 2
    # a pod of a deployment the snapshot does not plan (being deleted, invalid) holds its devices too
    stale = Pod(name="ns/gone-0", node="cheap-1", num_gpu=8, gpu_milli=1000, deployment="ns/gone")
    assert foreign_devices(_snapshot((stale,), deps)) == {"cheap-1": 8}


@pytest.mark.parametrize(("pods", "held"), [
    # fractional pods naming the same device hold it once
    ((_foreign("n", 1, milli=250, indices=(3,)), _foreign("n", 1, milli=500, indices=(3,))), 1),
    # without indices nothing says they share: one device each
    ((_foreign("n", 1, milli=250), _foreign("n", 1, milli=500)), 2),
    ((_foreign("n", 2, indices=(0, 1)), _foreign("n", 4)), 6),
    ((_foreign("n", 8), _foreign("n", 8, name="other/second")), 8),  # never more than the node has
])
def test_fractional_and_named_devices(pods: tuple[Pod, ...], held: int) -> None:
    snap = Snapshot(pools=(_pool("p", 1.0),), nodes=(Node(name="n", pool="p", gpus=8),), pods=pods)
    room = pool_room(snap, snap.pools[0])
    assert room.devices == 8 - held
    assert room.fits(1) == 8 - held
    assert room.fits(8) == (1 if held == 0 else 0)


def test_an_autoscaling_pool_counts_foreign_pods_on_its_present_nodes() -> None:
    """``max_nodes`` pools count nodes not yet present as empty; foreign pods still hold theirs."""
    snap = Snapshot(pools=(_pool("p", 1.0, max_nodes=3),), nodes=_nodes("p", 2),
                    pods=(_foreign("p-0", 8), _foreign("p-1", 2)))
    room = pool_room(snap, snap.pools[0])
    assert room.devices == 24 - 10
    assert room.fits(8) == 1  # only the node yet to come is whole
    assert room.fits(2) == 3 + 4


def test_routing_sees_no_room_for_the_fallback_where_foreign_pods_are() -> None:
    small = _dep("ns/chat-8b", tp=1, replicas=1, size=8).model_copy(update={"max_replicas": 40})
    free = _snapshot((), (small,))
    foreign_everywhere = tuple(_foreign(n.name, 8) for n in free.nodes)
    table = default_table()
    assert growth_capacity(free, small, table) > 0
    assert growth_capacity(_snapshot(foreign_everywhere, (small,)), small, table) == 0
    half = tuple(_foreign(n.name, 4) for n in free.nodes)
    full_room, half_room = growth_capacity(free, small, table), growth_capacity(_snapshot(half, (small,)), small, table)
    assert half_room == pytest.approx(full_room / 2, rel=0.01)
