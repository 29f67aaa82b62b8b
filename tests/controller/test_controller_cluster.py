"""The controller on the real local API server (etcd, apiserver, scheduler, controller-manager, kwok)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.kube import Kube, KubeError
from tests.controller.cluster_helpers import (
    REPO,
    ControllerProcess,
    condition,
    md_body,
    pool_body,
    ready,
    wait_for,
)
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster


def _uid() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture
def start_controller(
    test_cluster: TestCluster, kube: Kube, tmp_path: Path
) -> Iterator[Callable[..., ControllerProcess]]:
    """Start controllers sharing one Lease (unique to the test); stop them all afterwards."""
    lease = f"wattplane-test-{_uid()}"
    procs: list[ControllerProcess] = []

    def start(identity: str | None = None, **kw: Any) -> ControllerProcess:
        p = ControllerProcess(test_cluster.kubeconfig, tmp_path, lease, identity or f"c{len(procs)}", **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.terminate()


def _pool(test_cluster: TestCluster, kube: Kube, nodes: int, gpus: int = 8) -> str:
    name = f"p-{_uid()}"
    kube.create("AcceleratorPool", pool_body(name, gpus))
    test_cluster.add_gpu_nodes(name, nodes, gpus=gpus)
    return name


def _deployments(kube: Kube, ns: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in kube.list("Deployment", ns)["items"]}


def _pods(kube: Kube, ns: str, selector: str = "app.kubernetes.io/managed-by=wattplane") -> list[dict[str, Any]]:
    return [p for p in kube.list("Pod", ns, labelSelector=selector)["items"]
            if not p["metadata"].get("deletionTimestamp")]


def _delete_mds(kube: Kube, ns: str) -> None:
    for md in kube.list("ModelDeployment", ns)["items"]:
        kube.delete("ModelDeployment", md["metadata"]["name"], ns)


def test_examples_converge_in_the_right_pools(test_cluster: TestCluster, kube: Kube, start_controller: Any) -> None:
    nodes = {
        "h100": test_cluster.add_gpu_nodes("h100", 5, gpus=8, accelerator="H100-80GB"),
        "a100": test_cluster.add_gpu_nodes("a100", 2, gpus=8, accelerator="A100-80GB"),
        "l4": test_cluster.add_gpu_nodes("l4", 2, gpus=4, accelerator="L4"),
    }
    test_cluster.kubectl("apply", "-f", str(REPO / "examples"))
    c = start_controller()
    try:
        for name in ("llama-70b", "deepseek-v3", "llama-8b"):
            wait_for(lambda name=name: ready(kube, "inference", name), 90, what=f"{name} Ready")
        deps = _deployments(kube, "inference")
        # the placement policy picks among allowed pools by cost: llama-70b may run on H100 or A100
        by_pool = {d["metadata"]["labels"]["wattplane.io/pool"]: d for d in deps.values()
                   if d["metadata"]["labels"]["wattplane.io/deployment"] == "llama-70b"}
        assert set(by_pool) <= {"h100", "a100"} and sum(d["spec"]["replicas"] for d in by_pool.values()) == 2
        assert {n for n in deps if n.startswith("llama-8b")} <= {"llama-8b-l4", "llama-8b-a100"}
        running = [p for p in _pods(kube, "inference") if p["status"].get("phase") == "Running"]
        for p in running:  # every pod runs on a node of the pool its labels name
            assert p["spec"]["nodeName"] in nodes[p["metadata"]["labels"]["wattplane.io/pool"]]
        group = [p for p in running if p["metadata"]["labels"].get("wattplane.io/group") == "deepseek-v3-h100-g0"]
        assert len(group) == 4 and len({p["spec"]["nodeName"] for p in group}) == 4  # 4 distinct nodes
        assert {p["spec"]["nodeName"] for p in group} <= set(nodes["h100"])
        svc = kube.get("Service", "deepseek-v3-h100-g0", "inference")
        assert svc["spec"]["clusterIP"] == "None"
        md = kube.get("ModelDeployment", "deepseek-v3", "inference")
        assert md["status"]["pools"] == [{"pool": "h100", "replicas": 1, "ready": 1, "shape": "PodGroup"}]
        assert md["status"]["lastDecision"]["policy"] == "placement"
        h100_gpus = 32 + 4 * by_pool["h100"]["spec"]["replicas"] if "h100" in by_pool else 32
        pool = wait_for(lambda: (p := kube.get("AcceleratorPool", "h100")).get("status", {}).get(
            "devicesAllocated") == h100_gpus and p, 30, what="h100 pool status")
        assert pool["status"]["devicesFree"] == 40 - h100_gpus and pool["status"]["nodesReady"] == 5
        assert c.get("/readyz")[0] == 200
        fleet = wait_for(lambda: (f := kube.get("FleetPolicy", "default")).get("status", {}).get("leader") and f, 30,
                         what="FleetPolicy status")
        assert fleet["status"]["leader"] == c.identity
        assert "placement/wattplane" in fleet["status"]["pipelineState"]["states"]
        assert c.metric("wattplane_reconcile_total", 'result="success"') > 0
        assert sum(c.metric("wattplane_replicas", f'deployment="llama-70b",namespace="inference",pool="{p}"')
                   for p in ("h100", "a100")) == 2
        # deleted deployments leave neither State in the FleetPolicy status nor metric series behind
        _delete_mds(kube, "inference")
        seen: list[dict[str, Any]] = []

        def forgotten() -> bool:
            seen.append(kube.get("FleetPolicy", "default")["status"])
            return "inference/llama-70b" not in json.dumps(seen[-1]["pipelineState"])

        try:
            wait_for(forgotten, 90, what="State forgets deleted")
        except AssertionError:
            raise AssertionError(json.dumps({k: v for k, v in seen[-1].items() if k != "conditions"})[:6000]) from None
        assert 'deployment="llama-70b"' not in c.get("/metrics")[1]
    finally:
        _delete_mds(kube, "inference")
        wait_for(lambda: not kube.list("ModelDeployment", "inference")["items"], 60, what="examples deleted")


def test_scaling_follows_bounds_and_delete_cleans_up(test_cluster: TestCluster, kube: Kube,
                                                     start_controller: Any) -> None:
    pool = _pool(test_cluster, kube, nodes=2)
    ns = test_cluster.create_namespace(f"scale-{_uid()}")
    kube.create("ModelDeployment", md_body("m", ns, pool, tp=2, min_replicas=1), ns)
    start_controller()
    dep_name = f"m-{pool}"
    wait_for(lambda: ready(kube, ns, "m"), 60, what="m Ready")
    assert _deployments(kube, ns)[dep_name]["spec"]["replicas"] == 1

    kube.patch("ModelDeployment", "m", {"spec": {"minReplicas": 5}}, ns)
    wait_for(lambda: (m := ready(kube, ns, "m")) and m["status"]["readyReplicas"] == 5, 60, what="5 ready")
    assert _deployments(kube, ns)[dep_name]["spec"]["replicas"] == 5
    assert len([p for p in _pods(kube, ns) if p["status"].get("phase") == "Running"]) == 5

    kube.patch("ModelDeployment", "m", {"spec": {"minReplicas": 2, "maxReplicas": 2}}, ns)
    wait_for(lambda: _deployments(kube, ns)[dep_name]["spec"]["replicas"] == 2, 60, what="scaled to 2")
    wait_for(lambda: (m := ready(kube, ns, "m")) and m["status"]["replicas"] == 2, 60, what="status 2")
    events = [e for e in kube.list("Event", ns)["items"] if e["involvedObject"]["name"] == "m"]
    assert any(e["reason"] == "Scaled" and "5->2" in e["message"] for e in events)

    kube.delete("ModelDeployment", "m", ns)
    wait_for(lambda: not kube.list("ModelDeployment", ns)["items"], 60, what="finalizer released")
    wait_for(lambda: not _deployments(kube, ns), 30, what="Deployment gone")
    wait_for(lambda: not _pods(kube, ns), 60, what="pods gone")


def test_pod_group_grows_and_shrinks_by_whole_groups(test_cluster: TestCluster, kube: Kube,
                                                     start_controller: Any) -> None:
    pool = _pool(test_cluster, kube, nodes=4, gpus=4)
    ns = test_cluster.create_namespace(f"group-{_uid()}")
    kube.create("ModelDeployment", md_body("wide", ns, pool, tp=4, pp=2, min_replicas=1), ns)
    start_controller()
    wait_for(lambda: ready(kube, ns, "wide"), 60, what="one group Ready")
    kube.patch("ModelDeployment", "wide", {"spec": {"minReplicas": 2}}, ns)
    wait_for(lambda: (m := ready(kube, ns, "wide")) and m["status"]["readyReplicas"] == 2, 60, what="2 groups")
    first = {p["metadata"]["name"]: p["metadata"]["uid"] for p in _pods(kube, ns)}
    assert len(first) == 4 and len({p["spec"]["nodeName"] for p in _pods(kube, ns)}) == 4
    # lowering only the minimum leaves scale-down to demand and the stabilisation window: cap it instead
    kube.patch("ModelDeployment", "wide", {"spec": {"minReplicas": 1, "maxReplicas": 1}}, ns)
    wait_for(lambda: len(_pods(kube, ns)) == 2, 60, what="group 1 removed")
    left = {p["metadata"]["name"]: p["metadata"]["uid"] for p in _pods(kube, ns)}
    assert set(left) == {f"wide-{pool}-g0-0", f"wide-{pool}-g0-1"}
    assert all(first[n] == uid for n, uid in left.items())  # the remaining group was not restarted
    _delete_mds(kube, ns)
    wait_for(lambda: not kube.list("ModelDeployment", ns)["items"], 60, what="deleted")


def test_invalid_resources_are_rejected_with_clear_messages(test_cluster: TestCluster, kube: Kube) -> None:
    ns = test_cluster.create_namespace(f"bad-{_uid()}")
    cases = [
        (md_body("a", ns, "x", min_replicas=5, max_replicas=2), "minReplicas must be <= maxReplicas"),
        (md_body("b", ns, "x", fallback={"deployment": "b"}), "must name another ModelDeployment"),
        (md_body("c", ns, "x", model={"name": "c", "paramsB": 8, "activeParamsB": 8},
                 moeElasticity={"minEp": 2, "maxEp": 4}), "moeElasticity needs an MoE model"),
        (md_body("d", ns, "x", tp=0), "spec.parallelism.tp"),
        (md_body("e", ns, "x", priority="urgent"), "spec.priority"),
    ]
    for body, message in cases:
        with pytest.raises(KubeError) as err:
            kube.create("ModelDeployment", body, ns)
        assert err.value.status == 422 and message in err.value.message, err.value.message
    bad_pool = pool_body(f"bad-{_uid()}")
    bad_pool["spec"]["accelerator"]["minPowerW"] = 900
    with pytest.raises(KubeError, match="minPowerW must be <= maxPowerW"):
        kube.create("AcceleratorPool", bad_pool)
    proc = test_cluster.kubectl("apply", "-f", "-", check=False, input=(
        "apiVersion: wattplane.io/v1alpha1\nkind: FleetPolicy\nmetadata: {name: other}\nspec: {}\n"))
    assert proc.returncode != 0 and "FleetPolicy is a singleton" in proc.stderr


def test_unsatisfiable_is_degraded_with_event_and_others_are_fine(test_cluster: TestCluster, kube: Kube,
                                                                 start_controller: Any) -> None:
    pool = _pool(test_cluster, kube, nodes=1)
    ns = test_cluster.create_namespace(f"deg-{_uid()}")
    kube.create("ModelDeployment", md_body("fine", ns, pool, tp=2, min_replicas=1, priority="latency-critical"), ns)
    kube.create("ModelDeployment", md_body("toobig", ns, pool, tp=4, min_replicas=3), ns)
    kube.create("ModelDeployment", md_body("nofallback", ns, pool, min_replicas=1, fallback={"deployment": "ghost"}),
                ns)
    kube.create("ModelDeployment", md_body("nopool", ns, "no-such-pool", min_replicas=1), ns)
    start_controller()
    wait_for(lambda: ready(kube, ns, "fine"), 60, what="fine Ready")
    expected = {"toobig": "InsufficientCapacity", "nofallback": "UnknownFallback", "nopool": "NoAllowedPool"}
    for name, reason in expected.items():
        md = wait_for(lambda name=name: condition(kube.get("ModelDeployment", name, ns), "Degraded").get(
            "status") == "True" and kube.get("ModelDeployment", name, ns), 60, what=f"{name} Degraded")
        deg = condition(md, "Degraded")
        assert deg["reason"] == reason and deg["message"], deg
        assert condition(md, "Ready")["status"] == "False"
        wait_for(lambda name=name, reason=reason: any(
            e["reason"] == reason and e["type"] == "Warning" and e["involvedObject"]["name"] == name
            for e in kube.list("Event", ns)["items"]), 30, what=f"{reason} event")
    toobig = kube.get("ModelDeployment", "toobig", ns)
    assert toobig["status"]["desiredReplicas"] == 1  # what fits (8 - 2 GPUs of `fine` -> one 4-GPU replica) runs
    assert condition(kube.get("ModelDeployment", "fine", ns), "Degraded")["status"] == "False"
    _delete_mds(kube, ns)
    wait_for(lambda: not kube.list("ModelDeployment", ns)["items"], 60, what="deleted")


def test_kill_mid_reconcile_then_restart_converges_without_duplicates(test_cluster: TestCluster, kube: Kube,
                                                                      start_controller: Any) -> None:
    pool = _pool(test_cluster, kube, nodes=6)
    ns = test_cluster.create_namespace(f"kill-{_uid()}")
    names = [f"m{i}" for i in range(12)]
    for i, name in enumerate(names):
        kube.create("ModelDeployment", md_body(name, ns, pool, tp=1 + i % 2, min_replicas=1 + i % 3), ns)
    first = start_controller("first")
    wait_for(lambda: 0 < len(_deployments(kube, ns)) < len(names) or len(_deployments(kube, ns)) == len(names), 60,
             0.02, what="first writes")
    first.kill()
    some = len(_deployments(kube, ns))
    start_controller("second")
    for name in names:
        wait_for(lambda name=name: ready(kube, ns, name), 90, what=f"{name} Ready")
    deps = _deployments(kube, ns)
    assert sorted(deps) == sorted(f"{n}-{pool}" for n in names), f"after kill with {some} written"
    want = {f"m{i}-{pool}": 1 + i % 3 for i in range(len(names))}
    assert {n: d["spec"]["replicas"] for n, d in deps.items()} == want
    pods = [p for p in _pods(kube, ns) if p["status"].get("phase") == "Running"]
    assert len(pods) == sum(want.values())
    _delete_mds(kube, ns)
    wait_for(lambda: not kube.list("ModelDeployment", ns)["items"], 60, what="deleted")


def test_two_controllers_one_leader_then_failover(test_cluster: TestCluster, kube: Kube,
                                                  start_controller: Any) -> None:
    pool = _pool(test_cluster, kube, nodes=1)
    ns = test_cluster.create_namespace(f"lease-{_uid()}")
    a = start_controller("a")
    b = start_controller("b")
    leader = wait_for(lambda: [p for p in (a, b) if p.is_leader()], 30, what="a leader")
    assert len(leader) == 1
    lead, standby = leader[0], (b if leader[0] is a else a)
    assert standby.get("/readyz")[0] == 200 and standby.metric("wattplane_leader") == 0
    kube.create("ModelDeployment", md_body("one", ns, pool, min_replicas=1), ns)
    wait_for(lambda: ready(kube, ns, "one"), 60, what="one Ready")
    assert lead.metric("wattplane_executor_writes_total") > 0
    assert standby.metric("wattplane_executor_writes_total") == 0
    assert standby.metric("wattplane_reconcile_total") == 0

    lead.kill()
    wait_for(standby.is_leader, 30, what="standby takes over")
    lease = kube.get("Lease", lead.proc.args[lead.proc.args.index("--lease-name") + 1], "default")
    assert lease["spec"]["holderIdentity"] == standby.identity
    kube.create("ModelDeployment", md_body("two", ns, pool, min_replicas=1), ns)
    wait_for(lambda: ready(kube, ns, "two"), 60, what="two Ready after failover")
    assert standby.metric("wattplane_executor_writes_total") > 0
    _delete_mds(kube, ns)
    wait_for(lambda: not kube.list("ModelDeployment", ns)["items"], 60, what="deleted")
    assert standby.terminate() == 0  # graceful shutdown exits 0 and releases the lease
    lease = kube.get("Lease", lease["metadata"]["name"], "default")
    assert lease["spec"]["holderIdentity"] == ""


def test_dry_run_reports_the_diff_and_writes_no_workloads(test_cluster: TestCluster, kube: Kube,
                                                          start_controller: Any) -> None:
    pool = _pool(test_cluster, kube, nodes=1)
    ns = test_cluster.create_namespace(f"dry-{_uid()}")
    kube.create("ModelDeployment", md_body("m", ns, pool, tp=2, min_replicas=2), ns)
    start_controller(extra_args=("--dry-run",))
    event = wait_for(lambda: next((e for e in kube.list("Event", ns)["items"] if e["reason"] == "DryRun"), None), 60,
                     what="DryRun event")
    assert f"would: apply Deployment {ns}/m-{pool}: create with 2 replicas" in event["message"]
    md = kube.get("ModelDeployment", "m", ns)
    assert md["status"]["desiredReplicas"] == 2 and md["status"]["replicas"] == 0
    assert condition(md, "Progressing")["status"] == "True"
    assert not _deployments(kube, ns) and not _pods(kube, ns)
    _delete_mds(kube, ns)
    wait_for(lambda: not kube.list("ModelDeployment", ns)["items"], 60, what="deleted")
