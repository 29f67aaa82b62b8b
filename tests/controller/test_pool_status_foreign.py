"""AcceleratorPool status counts other workloads' GPUs as allocated: a GPU another team's pod holds is
not free for a replica, whoever placed it. They used to be left out (only Wattplane's pods were counted),
so a pool full of another team's pods read as free."""

from __future__ import annotations

from typing import Any

from controller.api import models as api
from controller.reconciler import controller as ctl
from controller.reconciler.status import pool_status
from tests.controller.helpers import md_obj, node_obj, pool_obj
from tests.controller.test_snapshot_foreign import MANAGED, pod

POOL = api.AcceleratorPool.model_validate(pool_obj("busy"))


def test_foreign_devices_are_allocated_and_reported_apart() -> None:
    nodes = [node_obj("busy-0", "busy"), node_obj("busy-1", "busy"), node_obj("busy-2", "busy", ready=False)]
    s = pool_status(POOL, nodes, {"busy-0": 8, "busy-1": 6, "busy-2": 8}, {"busy-0": 8, "busy-1": 2, "busy-2": 8})
    assert (s.devices, s.devices_ready) == (24, 16)
    assert (s.devices_allocated, s.devices_free, s.devices_foreign) == (22, 2, 18)
    assert pool_status(POOL, nodes, {"busy-0": 4}).devices_foreign == 0  # no foreign map: none foreign


def test_foreign_never_exceeds_what_a_node_has() -> None:
    s = pool_status(POOL, [node_obj("busy-0", "busy", gpus=4)], {"busy-0": 10}, {"busy-0": 10})
    assert (s.devices_allocated, s.devices_free, s.devices_foreign) == (4, 0, 4)


class RecordingKube:
    def __init__(self) -> None:
        self.patches: list[tuple[str, str, dict[str, Any]]] = []

    def patch(self, kind: str, name: str, body: dict[str, Any], namespace: str | None = None, *,
              subresource: str | None = None) -> dict[str, Any]:
        assert subresource == "status"
        self.patches.append((kind, name, body))
        return body


def _controller(cluster_pods: list[dict[str, Any]], mds: list[dict[str, Any]]) -> tuple[ctl.Controller, RecordingKube]:
    kube = RecordingKube()
    c = ctl.Controller(kube, dry_run=True)  # type: ignore[arg-type]
    inf = c.informers
    inf["AcceleratorPool"].store["busy"] = pool_obj("busy")
    for i in range(3):
        inf["Node"].store[f"busy-{i}"] = node_obj(f"busy-{i}", "busy")
    inf["Node"].store["elsewhere"] = node_obj("elsewhere", "other-pool")
    for md in mds:
        inf["ModelDeployment"].store[f"{md['metadata']['namespace']}/{md['metadata']['name']}"] = md
    for p in cluster_pods:
        inf["ClusterPod"].store[f"{p['metadata']['namespace']}/{p['metadata']['name']}"] = p
    return c, kube


def test_reconcile_pool_counts_every_bound_gpu_pod_and_names_the_foreign_ones() -> None:
    terminating = pod("old-job", "busy-2", gpus=2)
    terminating["metadata"]["deletionTimestamp"] = "2026-11-24T00:00:00Z"
    pods = [
        pod("job-0", "busy-0"),  # another team's: foreign, the whole node
        pod("a-busy-x", "busy-1", gpus=4, ns="ns1", labels=MANAGED),  # a replica of ns1/a: ours
        pod("a-group-0", "busy-1", gpus=4, ns="ns1", owner="a", phase="Pending"),  # bound, starting: ours, held
        terminating,  # still holds its devices until it is gone: foreign
        pod("waiting", None),  # pending, unbound: holds nothing
        pod("done", "busy-2", phase="Succeeded"),  # finished: released
        pod("off-pool", "elsewhere"),  # another pool's node
    ]
    c, kube = _controller(pods, [md_obj("a")])
    c.reconcile_pool("busy")
    [(kind, name, body)] = kube.patches
    status = body["status"]
    assert (kind, name) == ("AcceleratorPool", "busy")
    assert (status["devices"], status["devicesAllocated"], status["devicesFree"], status["devicesForeign"]) == (
        24, 18, 6, 10)


def test_the_pods_of_a_model_deployment_that_no_longer_exists_are_foreign() -> None:
    c, kube = _controller([pod("a-busy-x", "busy-1", ns="ns1", labels=MANAGED)], mds=[])
    c.reconcile_pool("busy")
    status = kube.patches[0][2]["status"]
    assert (status["devicesAllocated"], status["devicesForeign"]) == (8, 8)


def test_another_workloads_pod_refreshes_pool_status() -> None:
    c, _ = _controller([], [md_obj("a")])
    c._on_cluster_pod("Pod", pod("job-0", "busy-0"), None)
    assert any(k == ctl.POOL + "busy" for _, _, k in c.queue._delayed)
