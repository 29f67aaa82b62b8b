"""What the controller's rescheduling stage sees: every GPU pod of the pools with waiting demand, its PDB
and whether it may move — built from API objects as the informers hold them."""

from __future__ import annotations

from typing import Any

from controller.reconciler.reschedule_input import DO_NOT_MOVE, selector_matches, with_cluster_pods
from policies.rescheduling import RescheduleConfig, plan_reschedule
from policies.snapshot import AcceleratorSpec, Node, Pool, Snapshot

RS = {"kind": "ReplicaSet", "name": "rs", "uid": "u-rs", "controller": True}


def _pod(name: str, node: str | None, gpus: int, *, labels: dict[str, str] | None = None,
         owner: dict[str, Any] | None = RS, selector: dict[str, str] | None = None,
         unschedulable: bool = False, ns: str = "ns", phase: str = "Running") -> dict[str, Any]:
    res = {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"cpu": "2", "memory": "4Gi"}} if gpus else {}
    status: dict[str, Any] = {"phase": "Pending" if node is None else phase}
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
    return {"metadata": {"name": name, "namespace": ns, "labels": labels or {},
                         "ownerReferences": [owner] if owner else []},
            "spec": {"nodeName": node, "nodeSelector": selector or {}, "containers": [{"name": "c", "resources": res}]},
            "status": status}


def _pdb(name: str, allowed: int, selector: dict[str, Any], ns: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"selector": selector},
            "status": {"disruptionsAllowed": allowed}}


def _snapshot() -> Snapshot:
    spec = AcceleratorSpec(model="H100-80GB", memory_gib=80, bf16_tflops=989, hbm_gbps=3350, tdp_w=700,
                           min_power_w=200, max_power_w=700)
    pools = (Pool(name="h100", accelerator=spec, gpus_per_node=8, cost_per_device_hour=2.5),
             Pool(name="l4", accelerator=spec, gpus_per_node=8, cost_per_device_hour=0.6))
    nodes = tuple(Node(name=f"h{k}", pool="h100", gpus=8, cpu_milli=96000, memory_mib=10**6,
                       labels={"pool": "h100"}) for k in range(3))
    nodes += (Node(name="l0", pool="l4", gpus=8, cpu_milli=96000, memory_mib=10**6, labels={"pool": "l4"}),)
    return Snapshot(pools=pools, nodes=nodes)


def _fleet() -> list[dict[str, Any]]:
    return [
        _pod("a", "h0", 2, labels={"app": "a"}), _pod("c", "h0", 2, labels={"app": "c"}),
        _pod("b", "h1", 4, labels={"app": "b"}),
        _pod("d", "h2", 4, labels={DO_NOT_MOVE: "true"}),
        _pod("cpu-only", "h2", 0),
        _pod("elsewhere", "l0", 4),  # a pool without waiting demand
        _pod("outside", "not-a-pool-node", 4),
        _pod("big", None, 8, selector={"pool": "h100"}, unschedulable=True),
        _pod("queued", None, 8, selector={"pool": "h100"}),  # the scheduler has not refused it yet
        _pod("wrong-pool", None, 8, selector={"pool": "nowhere"}, unschedulable=True),
    ]


def test_every_gpu_pod_of_a_pool_with_waiting_demand_and_nothing_else() -> None:
    snap = with_cluster_pods(_snapshot(), _fleet(), [])
    assert {p.name: p.node for p in snap.pods} == {"ns/a": "h0", "ns/c": "h0", "ns/b": "h1", "ns/d": "h2",
                                                   "ns/big": None}
    assert {n.name for n in snap.nodes} == {"h0", "h1", "h2"}
    b = next(p for p in snap.pods if p.name == "ns/b")
    assert (b.num_gpu, b.gpu_milli, b.cpu_milli, b.memory_mib) == (4, 1000, 2000, 4096)


def test_no_waiting_demand_means_nothing_to_plan_for() -> None:
    fleet = [p for p in _fleet() if p["metadata"]["name"] not in ("big", "wrong-pool")]
    snap = with_cluster_pods(_snapshot(), fleet, [])
    assert snap.pods == () and snap.nodes == ()


def test_movable_only_when_an_owner_recreates_it_and_nothing_forbids_it() -> None:
    vmi = {"kind": "VirtualMachineInstance", "apiVersion": "kubevirt.io/v1", "name": "vm", "uid": "u",
           "controller": True}
    pods = [
        _pod("rs", "h0", 1), _pod("labelled", "h0", 1, labels={DO_NOT_MOVE: "true"}),
        _pod("bare", "h0", 1, owner=None), _pod("ds", "h0", 1, owner={**RS, "kind": "DaemonSet"}),
        _pod("group", "h0", 1, labels={"wattplane.io/shape": "PodGroup"}), _pod("vm", "h1", 1, owner=vmi),
        _pod("big", None, 8, unschedulable=True),
    ]
    snap = with_cluster_pods(_snapshot(), pods, [])
    assert {p.name: p.movable for p in snap.pods if p.node} == {
        "ns/rs": True, "ns/labelled": False, "ns/bare": False, "ns/ds": False, "ns/group": False, "ns/vm": True}


def test_pdbs_cover_their_pods_with_the_allowance_the_api_server_reports() -> None:
    pdbs = [_pdb("strict", 0, {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "c"]}]}),
            _pdb("b", 1, {"matchLabels": {"app": "b"}}),
            _pdb("other-ns", 5, {"matchLabels": {"app": "b"}}, ns="elsewhere")]
    snap = with_cluster_pods(_snapshot(), _fleet(), pdbs)
    assert {p.name: p.pdb for p in snap.pods} == {"ns/a": "ns/strict", "ns/c": "ns/strict", "ns/b": "ns/b",
                                                  "ns/d": None, "ns/big": None}
    assert {b.name: b.max_unavailable for b in snap.pdbs} == {"ns/strict": 0, "ns/b": 1, "elsewhere/other-ns": 5}
    # the rescheduler then has one choice: move b (a and c are held by their budget, d may not move)
    plan = plan_reschedule(snap, RescheduleConfig(mnl=2, require_pending=True, time_limit_s=1.0))
    assert [a.pod for a in plan.actions] == ["ns/b"]


def test_label_selectors_follow_the_api_semantics() -> None:
    labels = {"app": "a", "tier": "gpu"}
    assert selector_matches({}, labels)  # policy/v1: an empty selector selects every pod
    assert selector_matches({"matchLabels": {"app": "a"}, "matchExpressions": [
        {"key": "tier", "operator": "Exists"}, {"key": "zone", "operator": "DoesNotExist"},
        {"key": "app", "operator": "NotIn", "values": ["b"]}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "app", "operator": "In", "values": ["b"]}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels)


def test_only_the_rescheduling_stage_sees_the_widened_snapshot() -> None:
    """The widened input (all GPU pods; only pools with waiting demand) must not leak into placement: with
    no nodes, placement could place nothing and would scale running models down."""
    from controller.api.models import PoliciesEnabled
    from controller.pipeline import run_pipeline
    from controller.snapshot_builder import build_snapshot
    from policies.plan import PolicyName, SetReplicas
    from tests.controller.helpers import md_obj, node_obj, pool_obj

    built = build_snapshot(pools=[pool_obj("h100")], deployments=[md_obj("a", minReplicas=2, parallelism={"tp": 2})],
                           nodes=[node_obj("h100-0", "h100")], owned={})
    seen = []

    def widen(s: Snapshot) -> Snapshot:
        seen.append(s)
        return s.model_copy(update={"nodes": (), "pods": ()})

    out = run_pipeline(built.snapshot, PoliciesEnabled(rescheduling=True), reschedule_input=widen)
    placement = next(p for p in out.plans if p.policy is PolicyName.PLACEMENT)
    assert {(a.deployment, a.replicas) for a in placement.actions if isinstance(a, SetReplicas)} == {("ns1/a", 2)}
    assert any(p.policy is PolicyName.RESCHEDULE for p in out.plans)
    assert len(seen) == 1 and seen[0].current_replicas("ns1/a", "h100") == 2  # after placement's projection
    assert "rescheduling/wattplane" in out.state.states and "placement/wattplane" in out.state.states
