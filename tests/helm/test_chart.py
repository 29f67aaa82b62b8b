"""The Helm chart with real helm against the real API server: lint, dry-run, install, upgrade, uninstall."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from tests.controller.cluster_helpers import wait_for as _wait
from wattplane.testcluster import POOL_LABEL, TestCluster

pytestmark = pytest.mark.cluster
CHART = Path(__file__).resolve().parents[2] / "helm" / "wattplane"


def helm(cluster: TestCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([cluster.binary("helm"), f"--kubeconfig={cluster.kubeconfig}", *args],
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr}")
    return proc



def test_lint(test_cluster: TestCluster) -> None:
    out = helm(test_cluster, "lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in out.stdout


def test_rendered_manifests_pass_server_side_validation(test_cluster: TestCluster, tmp_path: Path) -> None:
    ns = test_cluster.create_namespace(f"helm-dry-{uuid.uuid4().hex[:6]}")
    rendered = helm(test_cluster, "template", "wp", str(CHART), "-n", ns, "--include-crds",
                    "--set", "serviceMonitor.enabled=false").stdout
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(rendered)
    out = test_cluster.kubectl("apply", "--dry-run=server", "-n", ns, "-f", str(manifest))
    kinds = {line.split("/")[0].split(".")[0] for line in out.stdout.splitlines() if line.strip()}
    assert {"deployment", "daemonset", "clusterrole", "role", "service", "networkpolicy",
            "poddisruptionbudget", "customresourcedefinition"} <= kinds
    assert all("(server dry run)" in line for line in out.stdout.splitlines() if line.strip())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "controller.replicas=-1"], "minimum: got -1, want 1"),
        (["--set", "controller.replikas=2"], "additional properties 'replikas' not allowed"),
        (["--set", "agent.source=gpu-please"], "value must be one of"),
        (["--set", "controller.grpcPort=70000"], "maximum: got 70,000, want 65,535"),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(
    test_cluster: TestCluster, values: list[str], message: str
) -> None:
    out = helm(test_cluster, "template", "wp", str(CHART), *values, check=False)
    assert out.returncode != 0
    assert message in out.stderr


def test_install_upgrade_uninstall(test_cluster: TestCluster) -> None:
    suffix = uuid.uuid4().hex[:6]
    pool = f"helm-{suffix}"
    nodes = test_cluster.add_gpu_nodes(pool, 3, gpus=8)
    ns = test_cluster.create_namespace(f"wattplane-{suffix}")
    api = test_cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    common = ["-n", ns, "--set", "agent.source=simulated", "--set-json",
              f'agent.nodeSelector={json.dumps({POOL_LABEL: pool})}', "--wait=false"]
    helm(test_cluster, "install", "wp", str(CHART), *common)

    def running(component: str, want: int) -> list[client.V1Pod]:
        pods = core.list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/component={component}").items
        ok = [p for p in pods if p.status.phase == "Running" and p.metadata.deletion_timestamp is None]
        return ok if len(ok) == want else []

    controllers = _wait(lambda: running("controller", 2))
    agents = _wait(lambda: running("agent", 3))
    assert sorted(p.spec.node_name for p in agents) == sorted(nodes)  # one agent per GPU node of the pool
    for pod in controllers + agents:
        sc = pod.spec.containers[0].security_context
        assert sc.run_as_non_root and sc.read_only_root_filesystem and not sc.allow_privilege_escalation
    assert all(p.spec.automount_service_account_token is False for p in agents)

    # CRs survive an upgrade; the upgrade applies changed values.
    crd_names = {c.metadata.name for c in client.ApiextensionsV1Api(api).list_custom_resource_definition().items}
    assert {"acceleratorpools.wattplane.io", "modeldeployments.wattplane.io"} <= crd_names
    custom = client.CustomObjectsApi(api)
    pool_cr = {
        "apiVersion": "wattplane.io/v1alpha1", "kind": "AcceleratorPool", "metadata": {"name": f"keep-{suffix}"},
        "spec": _pool_spec(pool),
    }
    custom.create_cluster_custom_object("wattplane.io", "v1alpha1", "acceleratorpools", pool_cr)
    helm(test_cluster, "upgrade", "wp", str(CHART), *common, "--set", "controller.replicas=1")
    _wait(lambda: apps.read_namespaced_deployment("wp-wattplane-controller", ns).spec.replicas == 1)
    _wait(lambda: running("controller", 1))
    assert custom.get_cluster_custom_object("wattplane.io", "v1alpha1", "acceleratorpools", f"keep-{suffix}")

    helm(test_cluster, "uninstall", "wp", "-n", ns, "--wait=false")
    _wait(lambda: not apps.list_namespaced_deployment(ns).items and not apps.list_namespaced_daemon_set(ns).items)
    # Helm convention: CRDs (and so the user's CRs) stay after uninstall.
    assert custom.get_cluster_custom_object("wattplane.io", "v1alpha1", "acceleratorpools", f"keep-{suffix}")
    custom.delete_cluster_custom_object("wattplane.io", "v1alpha1", "acceleratorpools", f"keep-{suffix}")


def _pool_spec(pool: str) -> dict[str, object]:
    """A minimal valid AcceleratorPool spec, read from the bundled example so it tracks the CRD."""
    import yaml

    examples = Path(__file__).resolve().parents[2] / "examples"
    for path in sorted(examples.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "AcceleratorPool":
                spec = dict(doc["spec"])
                spec["nodeSelector"] = {POOL_LABEL: pool}
                return spec
    raise AssertionError("no AcceleratorPool example in examples/")
