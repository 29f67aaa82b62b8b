"""Rescheduling end to end: the real controller process on the real test cluster makes room for a Pending
8-GPU replica.

The fleet: three 8-GPU kwok nodes, each half full, so no node has the 8 free GPUs a replica needs.
Node 0 holds two 2-GPU pods under a PodDisruptionBudget that allows no disruption; node 1 holds a
serving 4-GPU replica of a ModelDeployment (a Service selects it; its PDB allows one disruption);
node 2 holds a 4-GPU pod labelled ``wattplane.io/do-not-move``. The only way to place the 8-GPU
replica is to move the serving replica next to one of the others, and that is what must happen:
drained out of its Service's EndpointSlice first, then one eviction, no budget broken, the
protected pods untouched, the plan and its explanation in the FleetPolicy status. In dry-run the
plan is only written to status.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from controller.executor.render import L_DEPLOYMENT, L_SERVING
from controller.kube import Kube, KubeError
from controller.reconciler.reschedule_input import DO_NOT_MOVE
from tests.controller.cluster_helpers import ControllerProcess, md_body, pool_body, wait_for
from wattplane.testcluster import GPU_RESOURCE, POOL_LABEL, TestCluster

pytestmark = pytest.mark.cluster
MNL = 2


@pytest.fixture(autouse=True)
def _namespaces_go_with_their_test(test_cluster: TestCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A namespace a test makes is deleted after it: a pending 8-GPU replica left behind would be work for
    every later controller on the session's cluster (its rescheduling stage would keep evicting for it)."""
    made: list[str] = []
    create = test_cluster.create_namespace

    def tracked(name: str, timeout_s: float = 30.0) -> str:
        made.append(create(name, timeout_s))
        return made[-1]

    monkeypatch.setattr(test_cluster, "create_namespace", tracked)
    yield
    core = client.CoreV1Api(test_cluster.api_client())
    for ns in made:
        try:
            core.delete_namespace(ns)
        except client.ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def fleet_policy(kube: Kube) -> Iterator[Callable[[bool], None]]:
    """Turn rescheduling on (MNL 2, one move at a time) for the test; put the FleetPolicy back afterwards."""
    try:
        before: dict[str, Any] | None = kube.get("FleetPolicy", "default")
    except KubeError:
        before = None

    def enable(dry_run: bool = False) -> None:
        spec = {"policies": {"placement": True, "rescheduling": True}, "dryRun": dry_run,
                "disruption": {"maxMigrationsPerCycle": MNL, "maxConcurrent": 1, "maxReplicaRemovalsPerCycle": 10}}
        if kube.list("FleetPolicy")["items"]:
            kube.patch("FleetPolicy", "default", {"spec": spec})
        else:
            kube.create("FleetPolicy", {"apiVersion": "wattplane.io/v1alpha1", "kind": "FleetPolicy",
                                        "metadata": {"name": "default"}, "spec": spec})

    yield enable
    if before is None:
        kube.delete("FleetPolicy", "default")
    else:
        kube.patch("FleetPolicy", "default", {"spec": {**before["spec"], "policies": {
            **before["spec"].get("policies", {}), "rescheduling": False}}})


@pytest.fixture
def controller(test_cluster: TestCluster, tmp_path: Path) -> Iterator[Callable[..., ControllerProcess]]:
    procs: list[ControllerProcess] = []

    def start(*extra: str) -> ControllerProcess:
        p = ControllerProcess(test_cluster.kubeconfig, tmp_path, f"resched-{uuid.uuid4().hex[:6]}", "resched",
                              extra_args=("--drain-seconds", "1", *extra))
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.terminate()


def _deployment(name: str, pool: str, gpus: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
    req = {GPU_RESOURCE: str(gpus)}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name, **(labels or {})}}, "spec": {
            "containers": [{"name": "work", "image": "registry.invalid/work:1",
                            "resources": {"requests": req, "limits": req}}],
            "nodeSelector": {POOL_LABEL: pool}, "terminationGracePeriodSeconds": 0}}}}


class Recorder:
    """Watches the namespace while the controller works: pod deletions (evictions), the Service's
    EndpointSlices and the PDBs' health, each observation time-stamped, so the test can check order."""

    def __init__(self, api: client.ApiClient, ns: str) -> None:
        self.api, self.ns = api, ns
        self.deleted: dict[str, float] = {}  # pod name -> when its deletion was first seen
        self.labels_at_deletion: dict[str, dict[str, str]] = {}
        self.endpoints: list[tuple[float, set[str]]] = []  # (when, pods listed in the Service's slices)
        self.budgets: list[tuple[str, int, int]] = []  # (pdb, currentHealthy, desiredHealthy)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._pods, self._poll)]
        for t in self.threads:
            t.start()

    def _pods(self) -> None:
        core = client.CoreV1Api(self.api)
        while not self.stop.is_set():
            for ev in watch.Watch().stream(core.list_namespaced_pod, self.ns, timeout_seconds=2):
                pod = ev["object"]
                if (pod.metadata.deletion_timestamp is not None or ev["type"] == "DELETED") and \
                        pod.metadata.name not in self.deleted:
                    self.deleted[pod.metadata.name] = time.monotonic()
                    self.labels_at_deletion[pod.metadata.name] = dict(pod.metadata.labels or {})

    def _poll(self) -> None:
        disc, policy = client.DiscoveryV1Api(self.api), client.PolicyV1Api(self.api)
        while not self.stop.is_set():
            listed = {e.target_ref.name for s in disc.list_namespaced_endpoint_slice(self.ns).items
                      for e in s.endpoints or [] if e.target_ref is not None}
            self.endpoints.append((time.monotonic(), listed))
            for b in policy.list_namespaced_pod_disruption_budget(self.ns).items:
                if b.status is not None and b.status.observed_generation:
                    self.budgets.append((b.metadata.name, b.status.current_healthy, b.status.desired_healthy))
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)


def _running(core: client.CoreV1Api, ns: str, selector: str) -> list[client.V1Pod]:
    return [p for p in core.list_namespaced_pod(ns, label_selector=selector).items
            if p.status.phase == "Running" and p.metadata.deletion_timestamp is None]


def _place(test_cluster: TestCluster, nodes: list[str], on: str, create: Callable[[], None],
           wait: Callable[[], object]) -> None:
    """Create a workload while only node ``on`` is schedulable, so the fleet fragments as the test wants."""
    core = client.CoreV1Api(test_cluster.api_client())
    for n in nodes:
        core.patch_node(n, {"spec": {"unschedulable": n != on}})
    create()
    wait_for(wait, 60, what=f"workload on {on}")


def _fragmented_fleet(test_cluster: TestCluster, kube: Kube, serving_md: bool) -> tuple[str, str, list[str]]:
    """(pool, namespace, nodes) with a, c (2 GPUs each, PDB allowing 0) on node 0, b (4 GPUs, PDB allowing 1)
    on node 1 and d (4 GPUs, do-not-move) on node 2. ``b`` is a ModelDeployment's serving replica behind a
    Service when ``serving_md``, else a plain Deployment."""
    uid = uuid.uuid4().hex[:6]
    pool = f"rs-{uid}"
    kube.create("AcceleratorPool", pool_body(pool))
    nodes = test_cluster.add_gpu_nodes(pool, 3, gpus=8)
    ns = test_cluster.create_namespace(f"rs-{uid}")
    api = test_cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)

    def plain(name: str, gpus: int, labels: dict[str, str] | None = None) -> Callable[[], None]:
        return lambda: apps.create_namespaced_deployment(ns, _deployment(name, pool, gpus, labels))

    _place(test_cluster, nodes, nodes[0], lambda: (plain("a", 2)(), plain("c", 2)()),
           lambda: len(_running(core, ns, "app in (a,c)")) == 2)
    _place(test_cluster, nodes, nodes[2], plain("d", 4, {DO_NOT_MOVE: "true"}),
           lambda: _running(core, ns, "app=d"))
    b_selector = f"{L_DEPLOYMENT}=b" if serving_md else "app=b"
    if serving_md:
        _place(test_cluster, nodes, nodes[1],
               lambda: kube.create("ModelDeployment", md_body("b", ns, pool, tp=4, min_replicas=1, max_replicas=1), ns),
               lambda: _running(core, ns, b_selector))
        core.create_namespaced_service(ns, {"metadata": {"name": "b"}, "spec": {
            "selector": {L_DEPLOYMENT: "b", L_SERVING: "true"}, "ports": [{"port": 8000}]}})
    else:
        _place(test_cluster, nodes, nodes[1], plain("b", 4), lambda: _running(core, ns, b_selector))
    for n in nodes:
        core.patch_node(n, {"spec": {"unschedulable": False}})
    policy = client.PolicyV1Api(api)
    policy.create_namespaced_pod_disruption_budget(ns, {"metadata": {"name": "strict"}, "spec": {
        "maxUnavailable": 0, "selector": {"matchExpressions": [{"key": "app", "operator": "In",
                                                                "values": ["a", "c"]}]}}})
    policy.create_namespaced_pod_disruption_budget(ns, {"metadata": {"name": "b"}, "spec": {
        "maxUnavailable": 1, "selector": {"matchLabels": dict([b_selector.split("=")])}}})
    wait_for(lambda: policy.read_namespaced_pod_disruption_budget("b", ns).status.disruptions_allowed == 1, 30,
             what="PDB b allows one disruption")
    placed = {p.metadata.labels.get("app") or "b": p.spec.node_name for p in core.list_namespaced_pod(ns).items}
    assert placed == {"a": nodes[0], "c": nodes[0], "b": nodes[1], "d": nodes[2]}, placed
    return pool, ns, nodes


def _uids(core: client.CoreV1Api, ns: str, selector: str) -> dict[str, str]:
    return {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(ns, label_selector=selector).items}


def test_controller_makes_room_for_a_pending_8_gpu_replica(test_cluster: TestCluster, kube: Kube,
                                                          fleet_policy: Callable[[bool], None],
                                                          controller: Callable[..., ControllerProcess]) -> None:
    proc = controller()
    pool, ns, nodes = _fragmented_fleet(test_cluster, kube, serving_md=True)
    api = test_cluster.api_client()
    core = client.CoreV1Api(api)
    protected = _uids(core, ns, "app in (a,c,d)")
    (serving,) = _running(core, ns, f"{L_DEPLOYMENT}=b")
    wait_for(lambda: any(serving.metadata.name in listed for _, listed in _endpoints(api, ns)), 30,
             what="the serving replica in its Service's EndpointSlice")
    fleet_policy(False)
    recorder = Recorder(api, ns)
    try:
        kube.create("ModelDeployment", md_body("big", ns, pool, tp=8, min_replicas=1, max_replicas=1), ns)
        try:
            big = wait_for(lambda: _running(core, ns, f"{L_DEPLOYMENT}=big"), 120, 0.5, what="the 8-GPU replica")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_describe(core, ns)}\n{proc.log_tail()}") from None
        status = wait_for(lambda: _evicted_status(kube, serving.metadata.name), 30,
                          what="the plan's outcome in the FleetPolicy status")
        time.sleep(3)  # anything else the controller would do now, it would have started
    finally:
        recorder.close()
    # the 8-GPU replica has a node of its own; the serving replica moved next to a protected pod
    assert big[0].spec.node_name == nodes[1]
    (moved,) = _running(core, ns, f"{L_DEPLOYMENT}=b")
    assert moved.spec.node_name in (nodes[0], nodes[2])
    # one eviction (<= MNL), of the serving replica only; PDB-protected and do-not-move pods untouched
    assert set(recorder.deleted) == {serving.metadata.name}, recorder.deleted
    assert _uids(core, ns, "app in (a,c,d)") == protected
    assert recorder.budgets and all(healthy >= desired for _, healthy, desired in recorder.budgets)
    # drained first: out of the EndpointSlice, with its serving label off, before the eviction
    evicted_at = recorder.deleted[serving.metadata.name]
    assert recorder.labels_at_deletion[serving.metadata.name].get(L_SERVING) == "false"
    left = [t for t, listed in recorder.endpoints if serving.metadata.name not in listed]
    assert left and min(left) < evicted_at, "the pod was evicted while its Service still listed it"
    # the plan and its explanation are in status
    decision = status["status"]["lastReschedule"]
    assert decision["policy"] == "reschedule" and decision["reason"] == "Fragmentation" and decision["planId"]
    assert "migration" in decision["summary"] and decision["solverStatus"] and not decision.get("dryRun")
    assert len(decision["migrations"]) <= MNL
    assert {m["pod"]: m["outcome"] for m in decision["migrations"]} == {f"{ns}/{serving.metadata.name}": "Evicted"}


def test_dry_run_writes_the_plan_to_status_and_evicts_nothing(test_cluster: TestCluster, kube: Kube,
                                                              fleet_policy: Callable[[bool], None],
                                                              controller: Callable[..., ControllerProcess]) -> None:
    pool, ns, _ = _fragmented_fleet(test_cluster, kube, serving_md=False)
    api = test_cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    before = _uids(core, ns, "app")
    fleet_policy(True)
    controller("--dry-run")
    apps.create_namespaced_deployment(ns, _deployment("big", pool, 8))
    b = next(n for n in before if n.startswith("b-"))
    status = wait_for(lambda: (f := kube.get("FleetPolicy", "default")).get("status", {}).get(
        "lastReschedule", {}).get("dryRun") and any(m["outcome"] == "DryRun" and m["pod"] == f"{ns}/{b}"
                                                    for m in f["status"]["lastReschedule"]["migrations"]) and f,
        60, 0.5, what="the dry-run plan in the FleetPolicy status")
    decision = status["status"]["lastReschedule"]
    assert decision["reason"] == "Fragmentation" and decision["summary"]
    time.sleep(5)
    assert _uids(core, ns, "app") == {**before, **_uids(core, ns, "app=big")}  # nothing evicted or replaced
    assert all(p.status.phase == "Pending" for p in core.list_namespaced_pod(ns, label_selector="app=big").items)


def _endpoints(api: client.ApiClient, ns: str) -> list[tuple[float, set[str]]]:
    disc = client.DiscoveryV1Api(api)
    return [(time.monotonic(), {e.target_ref.name for s in disc.list_namespaced_endpoint_slice(ns).items
                                for e in s.endpoints or [] if e.target_ref is not None})]


def _evicted_status(kube: Kube, pod: str) -> dict[str, Any] | None:
    f = kube.get("FleetPolicy", "default")
    moves = ((f.get("status") or {}).get("lastReschedule") or {}).get("migrations") or []
    return f if any(m["pod"].endswith("/" + pod) and m["outcome"] == "Evicted" for m in moves) else None


def _describe(core: client.CoreV1Api, ns: str) -> str:
    """Where every pod of the namespace is, for a failure message."""
    return "\n".join(f"{p.metadata.name} {p.spec.node_name} {p.status.phase} {p.metadata.labels} "
                     f"{[(c.type, c.reason, c.message) for c in p.status.conditions or []]}"
                     for p in core.list_namespaced_pod(ns).items)
