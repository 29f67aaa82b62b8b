"""KubeVirt VMs are live-migrated, not evicted: a ``VirtualMachineInstanceMigration`` per move, at most K at
once, finished by its ``status.phase``, cancelled on timeout.

KubeVirt cannot run in the test cluster (no nested virtualisation, no virt-handler), so the test
installs minimal CRDs for VirtualMachineInstance and VirtualMachineInstanceMigration
(``manifests/kubevirt-crds.yaml``, group kubevirt.io, version v1) and plays virt-controller itself:
it watches for the migrations Wattplane creates and sets their ``status.phase`` to Running, then
Succeeded or Failed. The virt-launcher pods are real pods on kwok GPU nodes, owned by real VMI
objects, as KubeVirt makes them.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from controller.executor.evictions import MigrationLimits, MigrationOutcome, MigrationReport, apply_migrations
from controller.executor.vm_migrations import GROUP, PLURAL, VERSION
from policies.plan import MigratePod
from tests.controller.cluster_helpers import wait_for
from wattplane.testcluster import GPU_RESOURCE, POOL_LABEL, TestCluster

pytestmark = pytest.mark.cluster
CRDS = Path(__file__).parent / "manifests" / "kubevirt-crds.yaml"


@pytest.fixture(scope="module")
def vm_namespace(test_cluster: TestCluster) -> tuple[str, str, list[str]]:
    test_cluster.kubectl("apply", "-f", str(CRDS))
    ext = client.ApiextensionsV1Api(test_cluster.api_client())
    for name in ("virtualmachineinstances.kubevirt.io", "virtualmachineinstancemigrations.kubevirt.io"):
        wait_for(lambda name=name: any(c.type == "Established" and c.status == "True"
                                       for c in ext.read_custom_resource_definition(name).status.conditions or []),
                 30, what=f"CRD {name}")
    custom = client.CustomObjectsApi(test_cluster.api_client())
    uid = uuid.uuid4().hex[:6]
    ns = test_cluster.create_namespace(f"vms-{uid}")
    wait_for(lambda: custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL) is not None, 30,
             what="CRD discovery")
    pool = f"vm-{uid}"
    nodes = test_cluster.add_gpu_nodes(pool, 2, gpus=8)
    return ns, pool, nodes


def _vm(api: client.ApiClient, ns: str, pool: str, name: str) -> tuple[str, str]:
    """A VMI and its virt-launcher pod (owned by the VMI, as KubeVirt makes it); returns (pod, node)."""
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    vmi = custom.create_namespaced_custom_object("kubevirt.io", "v1", ns, "virtualmachineinstances", {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": {"name": name},
        "spec": {"domain": {"devices": {"gpus": [{"name": "gpu0", "deviceName": GPU_RESOURCE}]}},
                 "evictionStrategy": "LiveMigrate"}})
    req = {GPU_RESOURCE: "2"}
    pod = f"virt-launcher-{name}"
    core.create_namespaced_pod(ns, {"metadata": {
        "name": pod, "labels": {"kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": name},
        "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "name": name,
                             "uid": vmi["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"containers": [{"name": "compute", "image": "registry.invalid/virt-launcher:1",
                                 "resources": {"requests": req, "limits": req}}],
                 "nodeSelector": {POOL_LABEL: pool}, "terminationGracePeriodSeconds": 0}})
    running = wait_for(lambda: (p := core.read_namespaced_pod(pod, ns)).status.phase == "Running" and p, 60,
                       what=f"{pod} Running")
    return pod, running.spec.node_name


def _migrations(custom: client.CustomObjectsApi, ns: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
    return sorted(items, key=lambda m: m["metadata"]["creationTimestamp"])


def _set_phase(custom: client.CustomObjectsApi, ns: str, name: str, phase: str) -> None:
    """What virt-controller would write as the migration progresses."""
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, {"status": {"phase": phase}})


def _in_thread(core: client.CoreV1Api, moves: list[MigratePod], limits: MigrationLimits,
               custom: client.CustomObjectsApi) -> tuple[threading.Thread, list[MigrationReport]]:
    out: list[MigrationReport] = []
    t = threading.Thread(target=lambda: out.append(apply_migrations(core, moves, limits, custom=custom)), daemon=True)
    t.start()
    return t, out


def test_vms_are_live_migrated_one_at_a_time_and_followed_to_their_phase(
        test_cluster: TestCluster, vm_namespace: tuple[str, str, list[str]]) -> None:
    ns, pool, nodes = vm_namespace
    api = test_cluster.api_client()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    first, second = (_vm(api, ns, pool, f"vm-{k}-{uuid.uuid4().hex[:4]}") for k in "ab")
    moves = [MigratePod(pod=f"{ns}/{pod}", from_node=node, to_node=next(n for n in nodes if n != node))
             for pod, node in (first, second)]
    before = {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(ns).items}
    thread, report = _in_thread(core, moves, MigrationLimits(max_migrations=5, max_concurrent=1), custom)

    one = wait_for(lambda: _migrations(custom, ns), 30, what="the first VirtualMachineInstanceMigration")
    owner = core.read_namespaced_pod(first[0], ns).metadata.owner_references[0].name
    assert [m["spec"]["vmiName"] for m in one] == [owner]
    _set_phase(custom, ns, one[0]["metadata"]["name"], "Running")
    time.sleep(2)
    assert len(_migrations(custom, ns)) == 1  # K = 1: the second VM waits while the first migrates
    _set_phase(custom, ns, one[0]["metadata"]["name"], "Succeeded")
    two = wait_for(lambda: len(m := _migrations(custom, ns)) == 2 and m, 30, what="the second migration")
    assert two[1]["spec"]["vmiName"] == core.read_namespaced_pod(second[0], ns).metadata.owner_references[0].name
    _set_phase(custom, ns, two[1]["metadata"]["name"], "Failed")
    thread.join(30)
    assert report, "apply_migrations did not return"
    assert report[0].outcomes == {moves[0].pod: MigrationOutcome.MIGRATED, moves[1].pod: MigrationOutcome.FAILED}
    assert "Failed" in report[0].messages[moves[1].pod]
    # nothing was evicted: the VMs' pods are the same objects (live migration is virt-controller's job)
    assert {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(ns).items} == before


def test_a_migration_that_does_not_finish_is_cancelled_and_reported_failed(
        test_cluster: TestCluster, vm_namespace: tuple[str, str, list[str]]) -> None:
    ns, pool, nodes = vm_namespace
    api = test_cluster.api_client()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    pod, node = _vm(api, ns, pool, f"vm-slow-{uuid.uuid4().hex[:4]}")
    existing = {m["metadata"]["name"] for m in _migrations(custom, ns)}
    move = MigratePod(pod=f"{ns}/{pod}", from_node=node, to_node=next(n for n in nodes if n != node))
    report = apply_migrations(core, [move], MigrationLimits(vm_migration_timeout_s=2.0), custom=custom)
    assert report.outcomes == {move.pod: MigrationOutcome.FAILED}
    assert "timed out" in report.messages[move.pod]
    wait_for(lambda: {m["metadata"]["name"] for m in _migrations(custom, ns)} == existing, 30,
             what="the timed-out migration deleted (cancelled)")
    assert core.read_namespaced_pod(pod, ns).metadata.deletion_timestamp is None
