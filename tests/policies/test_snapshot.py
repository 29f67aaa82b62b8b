"""The domain model validates on load, round-trips through JSON, and plans have content ids."""

from __future__ import annotations

import json

import pytest

from policies.plan import Explanation, Plan, PolicyName, Reason, SetPowerCap, SetReplicas, noop_plan
from policies.snapshot import (
    AcceleratorSpec,
    BadInputError,
    ModelDeployment,
    ModelShape,
    MoEShape,
    Node,
    Pool,
    ReplicaSet,
    Snapshot,
)

H100 = AcceleratorSpec(model="H100-80GB", memory_gib=80, bf16_tflops=989, hbm_gbps=3350, tdp_w=700,
                       min_power_w=200, max_power_w=700)


def make_snapshot(**overrides: object) -> Snapshot:
    base: dict[str, object] = {
        "now": 10.0,
        "pools": (Pool(name="h100", accelerator=H100, gpus_per_node=8, cost_per_device_hour=4.0),),
        "nodes": (Node(name="n0", pool="h100", gpus=8), Node(name="n1", pool="h100", gpus=8)),
        "deployments": (
            ModelDeployment(name="ns/llama", model=ModelShape(name="llama-70b", params_b=70, active_params_b=70)),
        ),
        "replicas": (ReplicaSet(deployment="ns/llama", pool="h100", replicas=2),),
    }
    base.update(overrides)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_round_trip_is_lossless() -> None:
    snap = make_snapshot()
    again = Snapshot.from_json(snap.to_json())
    assert again == snap
    assert again.current_replicas("ns/llama", "h100") == 2
    assert [n.name for n in again.nodes_in_pool("h100")] == ["n0", "n1"]


def test_snapshot_is_immutable() -> None:
    snap = make_snapshot()
    with pytest.raises(Exception, match="frozen"):
        snap.now = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["nodes"].append({"name": "n9", "pool": "nope"}), "unknown pool 'nope'"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "duplicate node 'n0'"),
        (lambda d: d["replicas"][0].update(deployment="ns/ghost"), "unknown deployment 'ns/ghost'"),
        (lambda d: d["pools"][0]["accelerator"].update(min_power_w=900), "min_power_w 900.0 > max_power_w"),
        (lambda d: d["deployments"][0].update(min_replicas=5, max_replicas=2), "min_replicas 5 > max_replicas 2"),
        (lambda d: d.update(version=2), "version: Input should be 1"),
        (lambda d: d.update(surprise=1), "surprise: Extra inputs are not permitted"),
    ],
)
def test_bad_files_give_a_clear_error(mutate, message) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(make_snapshot().to_json())
    mutate(doc)
    with pytest.raises(BadInputError) as err:
        Snapshot.from_json(json.dumps(doc), source="snap.json")
    assert str(err.value).startswith("snap.json: ")
    assert message in str(err.value)


def test_not_json_is_a_clear_error() -> None:
    with pytest.raises(BadInputError, match=r"bad\.json: .*Invalid JSON"):
        Snapshot.from_json("{nope", source="bad.json")


def test_moe_shape_checks() -> None:
    with pytest.raises(ValueError, match="top_k 9 > experts 8"):
        MoEShape(moe_layers=2, experts=8, top_k=9, bytes_per_expert=1)
    with pytest.raises(ValueError, match="not divisible"):
        MoEShape(moe_layers=2, experts=10, top_k=2, bytes_per_expert=1, expert_groups=3)


def test_fallback_must_be_another_deployment() -> None:
    with pytest.raises(ValueError, match="fallback must name another deployment"):
        ModelDeployment(
            name="ns/a", model=ModelShape(name="m", params_b=1, active_params_b=1),
            fallback={"deployment": "ns/a"},  # type: ignore[arg-type]
        )


def test_plan_id_depends_on_actions_not_explanation() -> None:
    def plan(replicas: int, summary: str) -> Plan:
        return Plan(
            policy=PolicyName.PLACEMENT,
            actions=(SetReplicas(deployment="ns/llama", pool="h100", replicas=replicas, previous=2),),
            explanation=Explanation(reason=Reason.DEMAND_CHANGED, summary=summary, solve_ms=1.0),
        )

    assert plan(3, "a").id == plan(3, "b").id
    assert plan(3, "a").id != plan(4, "a").id
    p = plan(3, "x")
    assert Plan.from_json(p.to_json()) == p


def test_plan_actions_are_a_discriminated_union() -> None:
    p = Plan(
        policy=PolicyName.POWER,
        actions=(SetPowerCap(node="n0", gpu=1, power_limit_w=450.0),),
        explanation=Explanation(reason=Reason.OVER_BUDGET, summary="cap", objective=2.0, bound=1.9),
    )
    loaded = Plan.from_json(p.to_json())
    assert isinstance(loaded.actions[0], SetPowerCap)
    assert loaded.explanation.gap == pytest.approx(0.05)
    with pytest.raises(BadInputError, match=r"plan: actions\.0"):
        Plan.from_json(json.dumps({"policy": "power", "explanation": {"reason": "NoChange", "summary": ""},
                                   "actions": [{"kind": "Teleport"}]}))


def test_noop_plan_is_safe_and_explained() -> None:
    p = noop_plan(PolicyName.RESCHEDULE, "nothing fragmented")
    assert p.is_noop and p.explanation.reason is Reason.NO_CHANGE and "fragmented" in p.explanation.summary
