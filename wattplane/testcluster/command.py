"""``wattplane testcluster build|up|down|env|status`` — the local test Kubernetes from the shell.

``up`` starts the processes detached (their own sessions) and records them in a state directory
(default ``~/.cache/wattplane/testcluster``), so ``down`` from another shell stops exactly those.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from wattplane.testcluster.cluster import TestCluster, TestClusterError, find_binaries


def _default_state() -> Path:
    return Path(os.environ.get("WATTPLANE_CACHE", Path.home() / ".cache" / "wattplane")) / "testcluster"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["build", "up", "down", "env", "status"])
    parser.add_argument("--state-dir", type=Path, default=None, help="where the running cluster's state lives")
    parser.add_argument("--nodes", type=int, default=4, help="fake GPU nodes to create on `up`")
    parser.add_argument("--pool", default="h100", help="pool label of the fake nodes")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per fake node")
    parser.add_argument("--accelerator", default="H100-80GB")


def run(args: argparse.Namespace) -> int:
    state = args.state_dir or _default_state()
    try:
        if args.action == "build":
            print(find_binaries())
            return 0
        if args.action == "up":
            if (state / "cluster.json").exists():
                sys.stderr.write(f"a test cluster is already recorded in {state}; run `wattplane testcluster down`\n")
                return 1
            cluster = TestCluster.start(state_dir=state)
            if args.nodes:
                cluster.add_gpu_nodes(args.pool, args.nodes, gpus=args.gpus, accelerator=args.accelerator)
            print(cluster.kubeconfig)
            return 0
        if not (state / "cluster.json").exists():
            sys.stderr.write(f"no test cluster recorded in {state}\n")
            return 1 if args.action != "down" else 0
        cluster = TestCluster.attach(state)
        if args.action == "down":
            cluster.stop()
            shutil.rmtree(state, ignore_errors=True)
            return 0
        if args.action == "env":
            print(f"export KUBECONFIG={cluster.kubeconfig}")
            return 0
        alive = {name: cluster._alive(name) for name in cluster.pids}
        for name, ok in alive.items():
            print(f"{name:26} {'running' if ok else 'DEAD'} (pid {cluster.pids[name]})")
        return 0 if all(alive.values()) else 1
    except TestClusterError as exc:
        sys.stderr.write(f"wattplane testcluster {args.action}: {exc}\n")
        return 1
