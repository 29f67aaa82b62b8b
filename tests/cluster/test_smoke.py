"""The test cluster behaves like Kubernetes: scheduling on GPU pools, Pending with a reason, kubectl apply."""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client

from tests.controller.cluster_helpers import wait_for as _wait
from wattplane.testcluster import GPU_RESOURCE, POOL_LABEL, TestCluster

pytestmark = pytest.mark.cluster


def _gpu_deployment(name: str, pool: str, gpus: int, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    container = client.V1Container(
        name="engine",
        image="registry.invalid/fake-engine:1",
        resources=client.V1ResourceRequirements(requests={GPU_RESOURCE: str(gpus)}, limits={GPU_RESOURCE: str(gpus)}),
    )
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[container], node_selector={POOL_LABEL: pool}),
            ),
        ),
    )



@pytest.fixture(scope="module")
def pools(test_cluster: TestCluster) -> dict[str, list[str]]:
    suffix = uuid.uuid4().hex[:5]
    return {
        f"smoke-a-{suffix}": test_cluster.add_gpu_nodes(f"smoke-a-{suffix}", 2, gpus=8, accelerator="H100-80GB"),
        f"smoke-b-{suffix}": test_cluster.add_gpu_nodes(f"smoke-b-{suffix}", 2, gpus=4, accelerator="L4"),
    }


def test_fake_gpu_nodes_are_ready_with_gpu_capacity(test_cluster: TestCluster, pools: dict[str, list[str]]) -> None:
    core = client.CoreV1Api(test_cluster.api_client())
    for pool, names in pools.items():
        nodes = core.list_node(label_selector=f"{POOL_LABEL}={pool}").items
        assert sorted(n.metadata.name for n in nodes) == sorted(names)
        for n in nodes:
            assert n.status.allocatable[GPU_RESOURCE] in ("8", "4")
            assert {c.type: c.status for c in n.status.conditions}["Ready"] == "True"


def test_gpu_deployment_runs_only_on_its_pool(test_cluster: TestCluster, pools: dict[str, list[str]]) -> None:
    ns = test_cluster.create_namespace(f"smoke-{uuid.uuid4().hex[:6]}")
    api = test_cluster.api_client()
    pool_a, pool_b = sorted(pools)
    client.AppsV1Api(api).create_namespaced_deployment(ns, _gpu_deployment("two-gpu", pool_b, gpus=2, replicas=3))
    core = client.CoreV1Api(api)

    def running() -> list[client.V1Pod]:
        pods = core.list_namespaced_pod(ns, label_selector="app=two-gpu").items
        ok = [p for p in pods if p.status.phase == "Running"]
        return ok if len(ok) == 3 else []

    pods = _wait(running)
    assert {p.spec.node_name for p in pods} <= set(pools[pool_b])
    assert not {p.spec.node_name for p in pods} & set(pools[pool_a])


def test_oversized_request_stays_pending_with_reason(test_cluster: TestCluster, pools: dict[str, list[str]]) -> None:
    ns = test_cluster.create_namespace(f"smoke-{uuid.uuid4().hex[:6]}")
    api = test_cluster.api_client()
    pool_b = sorted(pools)[1]  # 4 GPUs per node: 16 can never fit
    client.AppsV1Api(api).create_namespaced_deployment(ns, _gpu_deployment("too-big", pool_b, gpus=16, replicas=1))
    core = client.CoreV1Api(api)

    def unschedulable() -> str:
        for p in core.list_namespaced_pod(ns, label_selector="app=too-big").items:
            for c in p.status.conditions or []:
                if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                    return str(c.message)
        return ""

    message = _wait(unschedulable)
    assert "Insufficient nvidia.com/gpu" in message
    pods = core.list_namespaced_pod(ns, label_selector="app=too-big").items
    assert all(p.status.phase == "Pending" for p in pods)


def test_kubectl_apply_manifest(test_cluster: TestCluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ns = f"smoke-{uuid.uuid4().hex[:6]}"
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n"
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hello\n  namespace: {ns}\ndata:\n  greeting: hi\n"
    )
    out = test_cluster.kubectl("apply", "-f", str(manifest))
    assert "configmap/hello created" in out.stdout
    got = test_cluster.kubectl("get", "configmap", "hello", "-n", ns, "-o", "jsonpath={.data.greeting}")
    assert got.stdout == "hi"
    again = test_cluster.kubectl("apply", "-f", str(manifest))
    assert "configmap/hello unchanged" in again.stdout
