"""`wattplane snapshot --kubeconfig K` on the real cluster, fed to `wattplane plan`."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from controller.kube import Kube
from policies.plan import Plan
from policies.snapshot import Snapshot
from tests.controller.cluster_helpers import install_crds, md_body, pool_body
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster


def test_live_snapshot_round_trips_into_a_plan(test_cluster: TestCluster, tmp_path: Path) -> None:
    kube = Kube(test_cluster.api_client())
    install_crds(kube, test_cluster.kubectl)
    suffix = uuid.uuid4().hex[:6]
    pool = f"snap-{suffix}"
    kube.create("AcceleratorPool", pool_body(pool, 8))
    test_cluster.add_gpu_nodes(pool, 2, gpus=8)
    ns = test_cluster.create_namespace(f"snap-{suffix}")
    md = kube.create("ModelDeployment", md_body("m", ns, pool, min_replicas=2), ns)
    # a workload the controller would own, so the snapshot carries current replicas
    labels = {"app.kubernetes.io/managed-by": "wattplane", "app": "m"}
    kube.create("Deployment", {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"m-{pool}", "namespace": ns, "labels": labels, "ownerReferences": [{
            "apiVersion": "wattplane.io/v1alpha1", "kind": "ModelDeployment", "name": "m",
            "uid": md["metadata"]["uid"]}]},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "m"}},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "e", "image": "registry.invalid/e:1"}]}}},
    }, ns)
    out = tmp_path / "snap.json"
    proc = subprocess.run([sys.executable, "-m", "wattplane", "snapshot", "--kubeconfig", str(test_cluster.kubeconfig),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    snap = Snapshot.from_json(out.read_text())
    assert pool in {p.name for p in snap.pools}
    assert {n.name for n in snap.nodes if n.pool == pool} == {f"{pool}-node-000", f"{pool}-node-001"}
    assert f"{ns}/m" in {d.name for d in snap.deployments}
    plan = subprocess.run([sys.executable, "-m", "wattplane", "plan", "placement", "--snapshot", str(out), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    replicas = {(a.deployment, a.pool): a.replicas for a in Plan.from_json(plan.stdout).actions}
    assert replicas.get((f"{ns}/m", pool), 0) >= 2  # at least min replicas, in the only allowed pool
    bad = subprocess.run([sys.executable, "-m", "wattplane", "snapshot", "--kubeconfig", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("wattplane snapshot: ")
