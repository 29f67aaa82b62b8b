"""The chart's RBAC is sufficient and minimal: the controller runs its flows with the chart's
ServiceAccount token (not admin); without one granted verb the same flow fails with a clear Forbidden."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from controller.kube import Kube, KubeError
from tests.controller.cluster_helpers import ControllerProcess, install_crds, md_body, pool_body, ready, wait_for
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster
CHART = Path(__file__).resolve().parents[2] / "helm" / "wattplane"


def _sa_kubeconfig(cluster: TestCluster, ns: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (TokenRequest API)."""
    core = client.CoreV1Api(cluster.api_client())
    token = core.create_namespaced_service_account_token(
        sa, ns, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[],
                                                                                    expiration_seconds=3600))
    ).status.token
    ca = base64.b64encode(cluster.ca_file.read_bytes()).decode()
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server, "certificate-authority-data": ca}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa}}],
    }))
    return path


def test_controller_flows_pass_with_the_chart_service_account_and_fail_without_a_verb(
    test_cluster: TestCluster, tmp_path: Path
) -> None:
    admin = Kube(test_cluster.api_client())
    install_crds(admin, test_cluster.kubectl)
    suffix = uuid.uuid4().hex[:6]
    release_ns = test_cluster.create_namespace(f"wp-rbac-{suffix}")
    workload_ns = test_cluster.create_namespace(f"models-{suffix}")
    subprocess.run([test_cluster.binary("helm"), f"--kubeconfig={test_cluster.kubeconfig}", "install", "wp",
                    str(CHART), "-n", release_ns, "--set", "agent.enabled=false", "--wait=false"],
                   check=True, capture_output=True, text=True, timeout=120)
    pool = f"rbac-{suffix}"
    admin.create("AcceleratorPool", pool_body(pool, 8))
    test_cluster.add_gpu_nodes(pool, 2, gpus=8)
    kubeconfig = _sa_kubeconfig(test_cluster, release_ns, "wp-wattplane-controller", tmp_path / "sa.kubeconfig")
    # The token really is not admin: it cannot read Secrets.
    denied = test_cluster.kubectl(f"--kubeconfig={kubeconfig}", "get", "secrets", "-n", release_ns, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    def served() -> bool:  # a freshly installed CRD's namespaced path lags its Established condition
        try:
            admin.list("ModelDeployment", workload_ns)
        except KubeError:
            return False
        return True

    wait_for(served, 30, what="ModelDeployment API served")
    ctrl = ControllerProcess(kubeconfig, tmp_path, f"wattplane-rbac-{suffix}", "rbac",
                             extra_args=("--lease-namespace", release_ns))
    try:
        admin.create("ModelDeployment", md_body("allowed", workload_ns, pool), workload_ns)
        wait_for(lambda: ready(admin, workload_ns, "allowed"), 90,
                 what=f"ModelDeployment Ready under the chart's RBAC; controller log:\n{ctrl.log_tail()}")
        # Take one verb away: the controller may no longer create Deployments.
        rbac = client.RbacAuthorizationV1Api(test_cluster.api_client())
        role = rbac.read_cluster_role("wp-wattplane-controller")
        for rule in role.rules:
            if "deployments" in (rule.resources or []):
                rule.verbs = [v for v in rule.verbs if v != "create"]
        rbac.replace_cluster_role("wp-wattplane-controller", role)
        admin.create("ModelDeployment", md_body("denied", workload_ns, pool), workload_ns)

        def forbidden_reported() -> str:
            md = admin.get("ModelDeployment", "denied", workload_ns)
            text = json.dumps(md.get("status", {})) + ctrl.log_tail(200)
            return "forbidden" in text.lower() and text

        text = wait_for(forbidden_reported, 60, what="a Forbidden error surfaced")
        assert "deployments" in text.lower()
        assert not ready(admin, workload_ns, "denied")
    finally:
        ctrl.terminate()
        subprocess.run([test_cluster.binary("helm"), f"--kubeconfig={test_cluster.kubeconfig}", "uninstall", "wp",
                        "-n", release_ns], capture_output=True, timeout=120)
