"""The one executor, against a recording fake of the cluster port: shapes, idempotence, limits, dry-run."""

from __future__ import annotations

from typing import Any

from controller.api import models as api
from controller.executor import render as r
from controller.executor.executor import DisruptionBudget, Executor, observe
from controller.executor.ports import RecordingCluster
from policies.plan import Explanation, Plan, PolicyName, Reason, SetExpertPlacement, SetReplicas
from tests.controller.helpers import md_obj, pool_obj

POOLS = {
    "h100": api.AcceleratorPool.model_validate(pool_obj("h100", tolerations=[{"key": "gpu", "operator": "Exists"}])),
    "l4": api.AcceleratorPool.model_validate(pool_obj("l4", gpus=4)),
}


def md(**spec: Any) -> api.ModelDeployment:
    return api.ModelDeployment.model_validate(md_obj(**spec))


def as_observed(cluster: RecordingCluster, ready: bool = True) -> list[dict[str, Any]]:
    """What the caches would show after the writes: the applied objects, with kwok-like status."""
    out = []
    for (kind, _, _), obj in cluster.objects.items():
        obj = {**obj}
        if kind == "Deployment":
            n = obj["spec"]["replicas"]
            obj["status"] = {"readyReplicas": n if ready else 0}
        elif kind == "Pod":
            obj["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else
                                                                   "False"}]}
        else:
            continue
        out.append(obj)
    return out


def kinds(cluster: RecordingCluster) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind, _, _ in cluster.objects:
        out[kind] = out.get(kind, 0) + 1
    return out


def test_single_node_replicas_become_one_deployment_per_pool() -> None:
    c = RecordingCluster()
    m = md(parallelism={"tp": 4})
    res = Executor(c).apply_deployment(m, POOLS, {"h100": 3, "l4": 1}, [], DisruptionBudget(10))
    assert kinds(c) == {"Deployment": 2} and not res.limited
    dep = c.objects[("Deployment", "ns1", "llama-h100")]
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"wattplane.io/pool": "h100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    engine = pod["containers"][0]
    assert engine["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert engine["command"][:3] == ["vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct"]
    assert "--tensor-parallel-size" in engine["command"]
    assert engine["command"][engine["command"].index("--tensor-parallel-size") + 1] == "4"
    owner = dep["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ModelDeployment" and owner["uid"] == "uid-ns1-llama" and owner["controller"]
    # the 4-GPU replica fits an L4 node exactly (4 GPUs per node): still a Deployment there
    assert c.objects[("Deployment", "ns1", "llama-l4")]["spec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"] == {"nvidia.com/gpu": "4"}


def test_replica_wider_than_a_node_is_a_pod_group() -> None:
    c = RecordingCluster()
    m = md(parallelism={"tp": 8, "pp": 4, "ep": 32}, engine={"kind": "sglang", "modelPath": "deepseek-ai/DeepSeek-V3"})
    Executor(c).apply_deployment(m, POOLS, {"h100": 2}, [], DisruptionBudget(10))
    assert kinds(c) == {"Pod": 8, "Service": 2}
    pods = [o for (k, _, _), o in c.objects.items() if k == "Pod"]
    groups: dict[str, list[int]] = {}
    for p in pods:
        labels = p["metadata"]["labels"]
        groups.setdefault(labels[r.L_GROUP], []).append(int(labels[r.L_ORDINAL]))
        assert p["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
        term = p["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == {r.L_GROUP: labels[r.L_GROUP]}
        cmd = p["spec"]["containers"][0]["command"]
        assert cmd[cmd.index("--node-rank") + 1] == labels[r.L_ORDINAL]
        assert cmd[cmd.index("--nnodes") + 1] == "4"
        assert p["spec"]["subdomain"] == labels[r.L_GROUP]
    assert {g: sorted(o) for g, o in groups.items()} == {"llama-h100-g0": [0, 1, 2, 3], "llama-h100-g1": [0, 1, 2, 3]}
    svc = c.objects[("Service", "ns1", "llama-h100-g0")]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {r.L_GROUP: "llama-h100-g0"}


def test_second_pass_on_converged_state_writes_nothing() -> None:
    for spec in ({"parallelism": {"tp": 2}}, {"parallelism": {"tp": 8, "pp": 2}}):
        c = RecordingCluster()
        m = md(**spec)
        ex = Executor(c)
        ex.apply_deployment(m, POOLS, {"h100": 2}, [], DisruptionBudget(10))
        calls = len(c.calls)
        res = ex.apply_deployment(m, POOLS, {"h100": 2}, as_observed(c), DisruptionBudget(10))
        assert res.changes == [] and len(c.calls) == calls
        assert {p: (o.replicas, o.ready) for p, o in observe(as_observed(c)).items()} == {"h100": (2, 2)}


def test_group_shrinks_highest_index_first_within_the_budget() -> None:
    c = RecordingCluster()
    m = md(parallelism={"tp": 8, "pp": 2})
    ex = Executor(c)
    ex.apply_deployment(m, POOLS, {"h100": 3}, [], DisruptionBudget(10))
    res = ex.apply_deployment(m, POOLS, {"h100": 1}, as_observed(c), DisruptionBudget(1))
    assert res.limited  # only one group may go this cycle
    assert {o["metadata"]["labels"][r.L_GROUP] for (k, _, _), o in c.objects.items() if k == "Pod"} == {
        "llama-h100-g0", "llama-h100-g1"}
    res = ex.apply_deployment(m, POOLS, {"h100": 1}, as_observed(c), DisruptionBudget(1))
    assert not res.limited
    assert {o["metadata"]["labels"][r.L_GROUP] for (k, _, _), o in c.objects.items() if k == "Pod"} == {
        "llama-h100-g0"}
    assert ("Service", "ns1", "llama-h100-g1") not in c.objects


def test_scale_down_is_clipped_by_the_disruption_budget() -> None:
    c = RecordingCluster()
    m = md()
    ex = Executor(c)
    ex.apply_deployment(m, POOLS, {"h100": 8}, [], DisruptionBudget(10))
    res = ex.apply_deployment(m, POOLS, {"h100": 2}, as_observed(c), DisruptionBudget(3))
    assert res.limited and c.objects[("Deployment", "ns1", "llama-h100")]["spec"]["replicas"] == 5
    # scale-ups are never limited
    res = ex.apply_deployment(m, POOLS, {"h100": 9}, as_observed(c), DisruptionBudget(0))
    assert not res.limited and c.objects[("Deployment", "ns1", "llama-h100")]["spec"]["replicas"] == 9


def with_ready(objects: list[dict[str, Any]], ready: dict[str, int]) -> list[dict[str, Any]]:
    """Override ``readyReplicas`` of the named Deployments (the others keep what as_observed gave)."""
    return [{**o, "status": {"readyReplicas": ready[o["metadata"]["name"]]}}
            if o["kind"] == "Deployment" and o["metadata"]["name"] in ready else o for o in objects]


def test_pool_no_longer_wanted_is_emptied_once_the_new_pool_is_ready() -> None:
    c = RecordingCluster()
    m = md()
    ex = Executor(c)
    ex.apply_deployment(m, POOLS, {"h100": 2}, [], DisruptionBudget(10))
    res = ex.apply_deployment(m, POOLS, {"l4": 2}, as_observed(c), DisruptionBudget(10))
    # make before break: the new pool is requested, the old one keeps serving while l4 is not Ready
    assert [(ch.op, ch.name) for ch in res.changes] == [("apply", "llama-l4")]
    assert res.kept_waiting == 2 and res.limited
    # one replacement Ready: one old replica may go
    res = ex.apply_deployment(m, POOLS, {"l4": 2}, with_ready(as_observed(c), {"llama-l4": 1}), DisruptionBudget(10))
    assert res.kept_waiting == 1 and c.objects[("Deployment", "ns1", "llama-h100")]["spec"]["replicas"] == 1
    res = ex.apply_deployment(m, POOLS, {"l4": 2}, as_observed(c), DisruptionBudget(10))
    assert [(ch.op, ch.name) for ch in res.changes] == [("delete", "llama-h100")] and res.kept_waiting == 0
    assert set(c.objects) == {("Deployment", "ns1", "llama-l4")}


def test_move_keeps_old_replicas_while_replacements_are_pending_but_not_unready_ones() -> None:
    c = RecordingCluster()
    m = md()
    ex = Executor(c)
    ex.apply_deployment(m, POOLS, {"h100": 3}, [], DisruptionBudget(10))
    ex.apply_deployment(m, POOLS, {"h100": 3, "l4": 1}, as_observed(c), DisruptionBudget(10))
    # h100 has 3 replicas of which only 2 are ready; l4's new replica is Pending
    seen = with_ready(as_observed(c), {"llama-h100": 2, "llama-l4": 0})
    res = ex.apply_deployment(m, POOLS, {"h100": 1, "l4": 2}, seen, DisruptionBudget(10))
    # the not-ready h100 replica goes at once; both ready ones stay until l4 has Ready replacements
    assert c.objects[("Deployment", "ns1", "llama-h100")]["spec"]["replicas"] == 2
    assert c.objects[("Deployment", "ns1", "llama-l4")]["spec"]["replicas"] == 2
    assert res.kept_waiting == 1


def test_whole_deployment_shrink_is_not_held_back() -> None:
    c = RecordingCluster()
    m = md()
    ex = Executor(c)
    ex.apply_deployment(m, POOLS, {"h100": 2, "l4": 2}, [], DisruptionBudget(10))
    res = ex.apply_deployment(m, POOLS, {"l4": 2}, as_observed(c), DisruptionBudget(10))
    assert [(ch.op, ch.name) for ch in res.changes] == [("delete", "llama-h100")] and res.kept_waiting == 0


def test_budget_still_clips_what_make_before_break_allows() -> None:
    c = RecordingCluster()
    m = md()
    ex = Executor(c)
    ex.apply_deployment(m, POOLS, {"h100": 4}, [], DisruptionBudget(10))
    ex.apply_deployment(m, POOLS, {"h100": 4, "l4": 4}, as_observed(c), DisruptionBudget(10))
    res = ex.apply_deployment(m, POOLS, {"l4": 4}, as_observed(c), DisruptionBudget(3))
    assert res.limited and res.kept_waiting == 0  # all replacements Ready: only the budget holds back
    assert c.objects[("Deployment", "ns1", "llama-h100")]["spec"]["replicas"] == 4  # deleted whole or not at all
    # a move half-way: the budget clips what make before break allows (2 ready replacements, budget 1)
    c = RecordingCluster()
    ex = Executor(c)
    ex.apply_deployment(m, POOLS, {"h100": 4, "l4": 4}, [], DisruptionBudget(10))
    seen = with_ready(as_observed(c), {"llama-h100": 4, "llama-l4": 2})
    res = ex.apply_deployment(m, POOLS, {"l4": 4}, seen, DisruptionBudget(1))
    assert res.limited and c.objects[("Deployment", "ns1", "llama-h100")]["spec"]["replicas"] == 3


def test_pod_groups_move_only_as_replacement_groups_turn_ready() -> None:
    c = RecordingCluster()
    m = md(parallelism={"tp": 8, "pp": 2})
    ex = Executor(c)
    ex.apply_deployment(m, POOLS, {"h100": 2}, [], DisruptionBudget(10))
    old = as_observed(c)
    pools = {**POOLS, "h100b": api.AcceleratorPool.model_validate(pool_obj("h100b"))}
    res = ex.apply_deployment(m, pools, {"h100b": 2}, old, DisruptionBudget(10))
    assert res.kept_waiting == 2
    groups = {o["metadata"]["labels"][r.L_GROUP] for (k, _, _), o in c.objects.items() if k == "Pod"}
    assert groups == {"llama-h100-g0", "llama-h100-g1", "llama-h100b-g0", "llama-h100b-g1"}
    # one new group Ready (both members): one old group may go
    seen = [o if o["kind"] != "Pod" or o["metadata"]["labels"][r.L_GROUP] != "llama-h100b-g1" else
            {**o, "status": {"phase": "Pending"}} for o in as_observed(c)]
    res = ex.apply_deployment(m, pools, {"h100b": 2}, seen, DisruptionBudget(10))
    assert res.kept_waiting == 1
    groups = {o["metadata"]["labels"][r.L_GROUP] for (k, _, _), o in c.objects.items() if k == "Pod"}
    assert groups == {"llama-h100-g0", "llama-h100b-g0", "llama-h100b-g1"}
    assert ("Service", "ns1", "llama-h100-g1") not in c.objects and ("Service", "ns1", "llama-h100-g0") in c.objects


def test_dry_run_returns_the_diff_and_writes_nothing() -> None:
    c = RecordingCluster()
    res = Executor(c).apply_deployment(md(), POOLS, {"h100": 2}, [], DisruptionBudget(10), dry_run=True)
    assert res.dry_run
    assert [str(ch) for ch in res.changes] == ["apply Deployment ns1/llama-h100: create with 2 replicas"]
    assert c.calls == []


def test_spec_change_updates_the_deployment_template() -> None:
    c = RecordingCluster()
    ex = Executor(c)
    ex.apply_deployment(md(), POOLS, {"h100": 2}, [], DisruptionBudget(10))
    changed = md(engine={"modelPath": "meta-llama/Llama-3.1-70B-Instruct", "image": "vllm/vllm-openai:v0.12.0"})
    res = ex.apply_deployment(changed, POOLS, {"h100": 2}, as_observed(c), DisruptionBudget(10))
    assert [ch.detail for ch in res.changes] == ["template changed"]
    image = c.objects[("Deployment", "ns1", "llama-h100")]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "vllm/vllm-openai:v0.12.0"


def test_apply_plan_takes_replicas_and_expert_placement_from_the_plans() -> None:
    c = RecordingCluster()
    m = md()
    plans = [
        Plan(policy=PolicyName.PLACEMENT, explanation=Explanation(reason=Reason.BOUNDS_CHANGED, summary="x"),
             actions=(SetReplicas(deployment="ns1/llama", pool="h100", replicas=2, previous=0),
                      SetReplicas(deployment="ns1/other", pool="h100", replicas=5, previous=0))),
        Plan(policy=PolicyName.MOE, explanation=Explanation(reason=Reason.LOAD_DRIFT, summary="y"),
             actions=(SetExpertPlacement(deployment="ns1/llama", version=3, devices=2, slots_per_device=1,
                                         phy2log=((0, 1),)),)),
    ]
    Executor(c).apply_plan(plans, m, "ns1/llama", POOLS, [], DisruptionBudget(10))
    assert c.objects[("Deployment", "ns1", "llama-h100")]["spec"]["replicas"] == 2
    cm = c.objects[("ConfigMap", "ns1", "llama-expert-placement")]
    assert '"physical_to_logical_map": [[0, 1]]' in cm["data"]["physical_to_logical_map.json"]
    assert ("Deployment", "ns1", "other-h100") not in c.objects


def test_long_names_stay_valid_dns_labels() -> None:
    name = "a-very-long-model-deployment-name-that-goes-on-and-on-and-on-forever"
    m = api.ModelDeployment.model_validate(md_obj(name=name, parallelism={"tp": 8, "pp": 2}))
    c = RecordingCluster()
    Executor(c).apply_deployment(m, POOLS, {"h100": 1}, [], DisruptionBudget(10))
    for (kind, _, obj_name), obj in c.objects.items():
        assert len(obj_name) <= 63, obj_name
        assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values())
        if kind == "Pod":
            assert len(obj["spec"]["hostname"]) <= 63
