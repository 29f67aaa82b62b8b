"""The chart's agent RBAC: its ServiceAccount may read PowerDomains (the budget watch works with its token)
and nothing else: no writes, no status, no other resource."""

from __future__ import annotations

import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from agents.budget import BudgetWatch, api_client
from controller.kube import Kube
from tests.controller.cluster_helpers import install_crds, wait_for
from tests.helm.test_rbac import CHART, _sa_kubeconfig
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster


def test_agent_service_account_reads_power_domains_only(test_cluster: TestCluster, tmp_path: Path) -> None:
    admin = Kube(test_cluster.api_client())
    install_crds(admin, test_cluster.kubectl)
    suffix = uuid.uuid4().hex[:6]
    ns = test_cluster.create_namespace(f"wp-agent-rbac-{suffix}")
    release = f"ar{suffix}"
    helm = [test_cluster.binary("helm"), f"--kubeconfig={test_cluster.kubeconfig}"]
    subprocess.run([*helm, "install", release, str(CHART), "-n", ns, "--set", "agent.source=simulated",
                    "--set-json", 'agent.nodeSelector={"wattplane.io/no-such-node": "x"}',
                    "--wait=false"], check=True, capture_output=True, text=True, timeout=120)
    domain = f"ar-{suffix}"
    try:
        sa = f"system:serviceaccount:{ns}:{release}-wattplane-agent"

        def can(verb: str, resource: str, *extra: str) -> bool:
            out = test_cluster.kubectl("auth", "can-i", verb, resource, *extra, f"--as={sa}", check=False)
            return out.stdout.strip() == "yes"

        for verb in ("get", "list", "watch"):
            assert can(verb, "powerdomains.wattplane.io"), verb
        for verb, resource in [("patch", "powerdomains.wattplane.io"), ("update", "powerdomains.wattplane.io"),
                               ("delete", "powerdomains.wattplane.io"), ("create", "powerdomains.wattplane.io"),
                               ("list", "acceleratorpools.wattplane.io"), ("list", "pods"), ("get", "secrets"),
                               ("get", "nodes")]:
            assert not can(verb, resource), f"the agent may {verb} {resource}"
        assert not can("get", "powerdomains.wattplane.io", "--subresource=status")
        assert not can("patch", "powerdomains.wattplane.io", "--subresource=status")

        # the watch itself, with the agent ServiceAccount's token
        admin.create("PowerDomain", {"apiVersion": "wattplane.io/v1alpha1", "kind": "PowerDomain",
                                     "metadata": {"name": domain}, "spec": {"budgetW": 9000}})
        kubeconfig = _sa_kubeconfig(test_cluster, ns, f"{release}-wattplane-agent", tmp_path / "agent.kubeconfig")
        seen: list[float | None] = []
        got = threading.Event()

        def on_budget(name: str, watts: float | None) -> None:
            seen.append(watts)
            got.set()

        watch = BudgetWatch(lambda: api_client(str(kubeconfig)), on_budget)
        watch.follow(domain)
        try:
            wait_for(lambda: 9000.0 in seen, 20, 0.05, what="the budget listed with the agent's token")
            admin.patch("PowerDomain", domain, {"spec": {"budgetW": 7000}})
            wait_for(lambda: 7000.0 in seen, 20, 0.05, what="the cut seen by the agent's watch")
            assert watch.errors == 0
        finally:
            watch.stop()
    finally:
        admin.delete("PowerDomain", domain)
        subprocess.run([*helm, "uninstall", release, "-n", ns], capture_output=True, timeout=120)
