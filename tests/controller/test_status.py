"""Status is computed from observations: conditions, transition times, and other policies' effects."""

from __future__ import annotations

from controller.api import models as api
from controller.executor.executor import Observed
from controller.reconciler.status import Effects, Problem, deployment_status, effects_of, pool_status, wire
from policies.plan import Explanation, Plan, PolicyName, Reason, SetExpertPlacement, SetPowerCap, SetRoutingShare
from tests.controller.helpers import md_obj, node_obj, pool_obj

POOLS = {"h100": api.AcceleratorPool.model_validate(pool_obj("h100"))}


def conds(s: api.ModelDeploymentStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in s.conditions}


def test_progressing_then_ready_keeps_unchanged_transition_times() -> None:
    md = api.ModelDeployment.model_validate(md_obj(minReplicas=2))
    s1 = deployment_status(md, {"h100": 2}, {"h100": Observed("h100", "Deployment", 2, 0)}, POOLS, None, None, "t1")
    assert conds(s1)["Ready"] == ("False", "Progressing") and conds(s1)["Progressing"][0] == "True"
    assert s1.desired_replicas == 2 and s1.ready_replicas == 0
    md2 = md.model_copy(update={"status": s1})
    s2 = deployment_status(md2, {"h100": 2}, {"h100": Observed("h100", "Deployment", 2, 2)}, POOLS, None, None, "t2")
    assert conds(s2)["Ready"] == ("True", "AllReplicasReady")
    times = {c.type: c.last_transition_time for c in s2.conditions}
    assert times["Ready"] == "t2" and times["Degraded"] == "t1"  # only what flipped gets a new time
    # the same facts again: the wire form is identical, so the reconciler skips the write
    md3 = md.model_copy(update={"status": s2})
    s3 = deployment_status(md3, {"h100": 2}, {"h100": Observed("h100", "Deployment", 2, 2)}, POOLS, None, None, "t3")
    assert wire(s3) == wire(s2)


def test_degraded_is_never_ready() -> None:
    md = api.ModelDeployment.model_validate(md_obj(minReplicas=3))
    s = deployment_status(md, {"h100": 1}, {"h100": Observed("h100", "Deployment", 1, 1)}, POOLS,
                          Problem("InsufficientCapacity", "2 short"), None, "t")
    assert conds(s)["Degraded"] == ("True", "InsufficientCapacity")
    assert conds(s)["Ready"] == ("False", "Degraded")


def test_effects_of_other_policies_show_in_status() -> None:
    plans = [
        Plan(policy=PolicyName.ROUTING, explanation=Explanation(reason=Reason.CAPACITY_PRESSURE, summary=""),
             actions=(SetRoutingShare(deployment="ns1/llama", fallback="ns1/small", threshold=0.3,
                                      fallback_share=0.25),)),
        Plan(policy=PolicyName.MOE, explanation=Explanation(reason=Reason.LOAD_DRIFT, summary=""),
             actions=(SetExpertPlacement(deployment="ns1/llama", version=7, devices=1, slots_per_device=1,
                                         phy2log=((0,),)),)),
        Plan(policy=PolicyName.POWER, explanation=Explanation(reason=Reason.OVER_BUDGET, summary=""),
             actions=(SetPowerCap(node="n1", gpu=0, power_limit_w=400), SetPowerCap(node="n2", gpu=0,
                                                                                     power_limit_w=400),
                      SetPowerCap(node="n1", gpu=1))),  # a release is not a cap
    ]
    fx = effects_of(plans, "ns1/llama", {"n1"}, None)
    assert fx == Effects(routing_share=0.25, fallback="ns1/small", expert_version=7, capped_gpus=1)
    md = api.ModelDeployment.model_validate(md_obj())
    s = deployment_status(md, {"h100": 2}, {"h100": Observed("h100", "Deployment", 2, 2)}, POOLS, None, None, "t",
                          fx)
    assert conds(s)["RoutedToFallback"] == ("True", "RoutedToFallback")
    assert conds(s)["PowerCapped"] == ("True", "PowerCapped")
    assert s.routing_share == 0.25 and s.expert_placement_version == 7


def test_pool_status_counts_devices_and_stranded_free_ones() -> None:
    pool = POOLS["h100"]
    nodes = [node_obj("a", "h100"), node_obj("b", "h100"), node_obj("c", "h100", ready=False)]
    s = pool_status(pool, nodes, {"a": 8, "b": 3})
    assert (s.nodes, s.nodes_ready, s.devices, s.devices_ready) == (3, 2, 24, 16)
    assert (s.devices_allocated, s.devices_free) == (11, 5)
    assert s.fragmentation == 1.0  # the 5 free GPUs sit on a partly used node: no whole node is free
