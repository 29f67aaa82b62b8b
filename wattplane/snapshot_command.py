"""``wattplane snapshot --kubeconfig K > FILE`` — the fleet as the controller sees it, as a file.

Lists the Wattplane resources, nodes, the workloads they own and every pod (other workloads' GPU
pods are the snapshot's foreign pods) from a live cluster and builds the
Snapshot with the controller's own builder (the same function the reconciler calls), so
``wattplane plan NAME --snapshot FILE`` answers "what would you do?" for that cluster. Objects the
builder had to leave out (invalid specs) are named on stderr. A simulated fleet's snapshots come
from ``wattplane simulate ... --dump-snapshots DIR``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", type=Path, default=None, help="cluster kubeconfig (default: $KUBECONFIG)")
    parser.add_argument("--context", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write here instead of stdout")


def live_snapshot(kube: Any, now: float) -> Any:
    from controller.snapshot_builder import build_snapshot, group_by_owner

    workloads = []
    for kind in ("Deployment", "Pod"):
        for obj in kube.list(kind, labelSelector="app.kubernetes.io/managed-by=wattplane")["items"]:
            obj.setdefault("kind", kind)  # list responses omit each item's kind; the builder reads it
            workloads.append(obj)
    owned = group_by_owner(workloads)
    # every pod, as the controller's cluster-wide cache has them: other workloads' GPUs are not Wattplane's
    cluster_pods = kube.list("Pod")["items"]
    return build_snapshot(
        cluster_pods=cluster_pods,
        pools=kube.list("AcceleratorPool")["items"],
        power_domains=kube.list("PowerDomain")["items"],
        deployments=kube.list("ModelDeployment")["items"],
        nodes=kube.list("Node")["items"],
        owned=owned,
        now=now,
    )


def run(args: argparse.Namespace) -> int:
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError

    from controller.kube import Kube, KubeError

    try:
        kube = Kube.from_config(args.kubeconfig, args.context)
        built = live_snapshot(kube, time.time())
    except (KubeError, ConfigException, HTTPError, OSError, ValueError) as exc:
        sys.stderr.write(f"wattplane snapshot: {exc}\n")
        return 1
    for key, why in sorted(built.invalid.items()):
        sys.stderr.write(f"wattplane snapshot: left out {key}: {why}\n")
    text = built.snapshot.to_json()
    if args.out:
        args.out.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0
