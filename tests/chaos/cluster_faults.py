"""Helpers of the cluster chaos tests: controllers that can be armed with fault points, and the
checks that say a namespace has converged with nothing duplicated or orphaned."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.kube import Kube
from tests.controller.cluster_helpers import REPO, ControllerProcess, condition, free_port

MANAGED = "app.kubernetes.io/managed-by=wattplane"
L_GROUP = "wattplane.io/group"
L_DEPLOYMENT = "wattplane.io/deployment"


class Controller(ControllerProcess):
    """``wattplane controller`` as a process, optionally armed with ``WATTPLANE_FAULT_POINTS``.

    Unlike the controller tests' helper it does not block on /healthz: an armed process may be
    dead before a poll would see it. Its HTTP reads (``get``, ``metric``, ``is_leader``) are that helper's.
    """

    def __init__(self, kubeconfig: Path, log_dir: Path, lease: str, identity: str, *, faults: str = "",
                 seed: int = 0, lease_duration_s: float = 3.0, renew_deadline_s: float | None = None,
                 resync_s: float = 5.0, extra_args: tuple[str, ...] = ()) -> None:
        self.identity = identity
        self.port = free_port()
        self.log_path = log_dir / f"controller-{identity}.log"
        self.fault_log = log_dir / f"faults-{identity}.log"
        renew = renew_deadline_s if renew_deadline_s is not None else lease_duration_s * 0.66
        args = [sys.executable, "-m", "wattplane", "controller", "--kubeconfig", str(kubeconfig),
                "--metrics-port", str(self.port), "--lease-name", lease, "--identity", identity,
                "--lease-duration", str(lease_duration_s), "--renew-deadline", str(renew),
                "--retry-period", "0.3", "--resync", str(resync_s), "--log-level", "INFO", *extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WATTPLANE_FAULT_POINTS": faults,
               "WATTPLANE_FAULT_SEED": str(seed), "WATTPLANE_FAULT_LOG": str(self.fault_log)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fired(self) -> list[str]:
        """Fault points that killed this process (``<point> <hit>`` lines)."""
        return self.fault_log.read_text().splitlines() if self.fault_log.exists() else []

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int | None:
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_count(self, needle: str) -> int:
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines() if needle in line)


def managed(kube: Kube, kind: str, ns: str) -> list[dict[str, Any]]:
    return list(kube.list(kind, ns, labelSelector=MANAGED)["items"])


def live(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if not o["metadata"].get("deletionTimestamp")]


@dataclass(frozen=True)
class Want:
    """The desired state of one ModelDeployment: ``replicas`` in ``pool``; ``group_nodes`` > 0 means
    each replica is a pod group of that many pods with a headless Service."""

    pool: str
    replicas: int
    group_nodes: int = 0


def convergence_problems(kube: Kube, ns: str, want: dict[str, Want]) -> list[str]:
    """Everything that differs from the desired state; empty when converged.

    Checked: every ModelDeployment Ready with its replicas; exactly the expected Deployments (with
    their replica counts), group pods and group Services, nothing else managed in the namespace
    (no duplicates); every managed object owned by a live ModelDeployment (same uid) whose name its
    deployment label carries (no orphans); and each replica's pods Running.
    """
    problems: list[str] = []
    mds = {m["metadata"]["name"]: m for m in kube.list("ModelDeployment", ns)["items"]}
    uids = {m["metadata"]["uid"]: n for n, m in mds.items()}
    for name, w in want.items():
        md = mds.get(name)
        if md is None:
            problems.append(f"ModelDeployment {name} missing")
            continue
        status = md.get("status") or {}
        if condition(md, "Ready").get("status") != "True":
            problems.append(f"{name} not Ready")
        elif status.get("readyReplicas") != w.replicas or status.get("replicas") != w.replicas:
            problems.append(f"{name} status {status.get('replicas')}/{status.get('readyReplicas')} != {w.replicas}")
    deployments = live(managed(kube, "Deployment", ns))
    pods = live(managed(kube, "Pod", ns))
    services = live(managed(kube, "Service", ns))
    want_deps = {f"{n}-{w.pool}": w.replicas for n, w in want.items() if not w.group_nodes and w.replicas}
    have_deps = {d["metadata"]["name"]: int(d["spec"].get("replicas") or 0) for d in deployments}
    if have_deps != want_deps:
        problems.append(f"Deployments {have_deps} != {want_deps}")
    want_groups = {f"{n}-{w.pool}-g{i}": w.group_nodes for n, w in want.items() if w.group_nodes
                   for i in range(w.replicas)}
    have_groups = Counter(p["metadata"]["labels"][L_GROUP] for p in pods if L_GROUP in p["metadata"]["labels"])
    if dict(have_groups) != want_groups:
        problems.append(f"group pods {dict(have_groups)} != {want_groups}")
    if {s["metadata"]["name"] for s in services} != set(want_groups):
        problems.append(f"group Services {sorted(s['metadata']['name'] for s in services)} != {sorted(want_groups)}")
    for obj in [*deployments, *[p for p in pods if L_GROUP in p["metadata"]["labels"]], *services]:
        refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("kind") == "ModelDeployment"]
        what = f"{obj.get('kind', '?')} {obj['metadata']['name']}"
        if len(refs) != 1 or refs[0]["uid"] not in uids:
            problems.append(f"orphan: {what} has no live ModelDeployment owner")
        elif obj["metadata"]["labels"].get(L_DEPLOYMENT) != uids[refs[0]["uid"]]:
            problems.append(f"{what} labelled for another ModelDeployment")
    per_md = Counter(p["metadata"]["labels"].get(L_DEPLOYMENT, "?") for p in pods
                     if L_GROUP not in p["metadata"]["labels"])
    for name, w in want.items():
        if not w.group_nodes and per_md.get(name, 0) != w.replicas:
            problems.append(f"{name}: {per_md.get(name, 0)} pods, want {w.replicas}")
    not_running = [p["metadata"]["name"] for p in pods if (p.get("status") or {}).get("phase") != "Running"]
    if not_running:
        problems.append(f"pods not Running: {not_running[:5]}")
    return problems


def wait_converged(kube: Kube, ns: str, want: dict[str, Want], timeout_s: float = 120.0,
                   controllers: tuple[Controller, ...] = ()) -> float:
    """Seconds until ``convergence_problems`` is empty; AssertionError with the last problems otherwise."""
    start = time.monotonic()
    last: list[str] = []
    while time.monotonic() - start < timeout_s:
        try:
            last = convergence_problems(kube, ns, want)
        except Exception as exc:  # the API server may still be coming back (any transport error)
            last = [f"API: {exc}"]
        if not last:
            return time.monotonic() - start
        time.sleep(0.25)
    tails = "\n".join(f"--- {c.identity}:\n{c.log_tail(15)}" for c in controllers)
    raise AssertionError(f"not converged after {timeout_s:.0f}s: {last[:8]}\n{tails}")
