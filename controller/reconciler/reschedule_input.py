"""What the rescheduler must see that the placement snapshot leaves out: every GPU pod and its budget.

Fragmentation is made by *all* pods on the pools' nodes (batch jobs, other teams' services, VMs),
not only by the replicas Wattplane manages, and a move is only safe if the pod's
PodDisruptionBudget allows it. So for the rescheduling stage the controller replaces the
snapshot's pods with every GPU pod on a pool node, plus the GPU pods the scheduler could not place
(``PodScheduled=False``, reason ``Unschedulable``: the demand a plan makes room for), each tagged
with the PDB that covers it, and adds each PDB's current allowance (``status.disruptionsAllowed``).

A pod is *movable* only when moving it cannot lose it: it has a controller owner that recreates it
(ReplicaSet, StatefulSet, Job, or a KubeVirt ``VirtualMachineInstance`` that live-migrates), is not a
DaemonSet's (it would come back on the same node), is not a member of a multi-node pod group
(moving one member restarts the whole replica), and does not carry ``wattplane.io/do-not-move: "true"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from controller.api import convert
from controller.executor import render as r
from policies import snapshot as dom

DO_NOT_MOVE = "wattplane.io/do-not-move"
# Kinds whose controller recreates an evicted pod elsewhere (or, for a VMI, migrates it).
RECREATING_OWNERS = frozenset({"ReplicaSet", "StatefulSet", "Job", "VirtualMachineInstance"})


def gpus_of(pod: Mapping[str, Any]) -> int:
    """Whole GPUs a pod asks for (limits, as the device plugin counts them; requests when no limit)."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(r.GPU_RESOURCE) or (res.get("requests") or {}).get(r.GPU_RESOURCE)
        total += int(value or 0)
    return total


def _requests(pod: Mapping[str, Any]) -> tuple[int, int]:
    cpu = mem = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        req = (c.get("resources") or {}).get("requests") or {}
        cpu += convert.parse_cpu_milli(req.get("cpu")) if req.get("cpu") else 0
        mem += convert.parse_memory_mib(req.get("memory")) if req.get("memory") else 0
    return cpu, mem


def unschedulable(pod: Mapping[str, Any]) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return True
    return False


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A ``metav1.LabelSelector`` (matchLabels + matchExpressions); an empty selector matches everything,
    as it does for a PodDisruptionBudget in policy/v1."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pdb_key(pdb: Mapping[str, Any]) -> str:
    return f"{pdb['metadata']['namespace']}/{pdb['metadata']['name']}"


def movable(pod: Mapping[str, Any]) -> bool:
    meta = pod["metadata"]
    if (meta.get("labels") or {}).get(DO_NOT_MOVE) == "true":
        return False
    if (meta.get("labels") or {}).get(r.L_SHAPE) == r.SHAPE_GROUP:
        return False
    owners = [o for o in meta.get("ownerReferences") or [] if o.get("controller")]
    return bool(owners) and all(o.get("kind") in RECREATING_OWNERS for o in owners)


def deployment_of(pod: Mapping[str, Any], deployments: Iterable[str]) -> str | None:
    """The ModelDeployment (``ns/name``) a managed pod serves, if any."""
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    if labels.get(r.MANAGED_BY) != r.MANAGED_BY_VALUE or not labels.get(r.L_DEPLOYMENT):
        return None
    ns = meta.get("namespace", "default")
    for key in deployments:
        kns, _, name = key.partition("/")
        if kns == ns and r.short(name) == labels[r.L_DEPLOYMENT]:
            return key
    return None


def with_cluster_pods(snapshot: dom.Snapshot, pods: Iterable[Mapping[str, Any]],
                      pdbs: Iterable[Mapping[str, Any]]) -> dom.Snapshot:
    """``snapshot`` with its pods replaced by every GPU pod that matters to rescheduling, and the PDBs."""
    pods = list(pods)
    wanted = _pools_with_demand(snapshot, pods)
    nodes = {n.name: n for n in snapshot.nodes if n.pool in wanted}
    budgets = sorted(pdbs, key=pdb_key)
    deployments = [d.name for d in snapshot.deployments]
    out: list[dom.Pod] = []
    for pod in sorted(pods, key=lambda p: (p["metadata"].get("namespace", ""), p["metadata"]["name"])):
        meta, spec = pod["metadata"], pod.get("spec") or {}
        gpus = gpus_of(pod)
        if not gpus or meta.get("deletionTimestamp"):
            continue
        phase = (pod.get("status") or {}).get("phase")
        node = spec.get("nodeName")
        if phase in ("Succeeded", "Failed"):
            continue
        if node:
            if node not in nodes:
                continue  # not in any pool: nothing the rescheduler plans for
        elif not unschedulable(pod) or not _pools_admitting(spec, snapshot) & wanted:
            continue  # pending but not (yet) refused by the scheduler, or for a node we do not plan
        labels = meta.get("labels") or {}
        ns = meta.get("namespace", "default")
        cover = next((pdb_key(b) for b in budgets if b["metadata"]["namespace"] == ns
                      and selector_matches((b.get("spec") or {}).get("selector"), labels)), None)
        cpu, mem = _requests(pod)
        out.append(dom.Pod(name=f"{ns}/{meta['name']}", node=node or None, cpu_milli=cpu, memory_mib=mem,
                           num_gpu=gpus, gpu_milli=1000, deployment=deployment_of(pod, deployments), pdb=cover,
                           movable=movable(pod)))
    allowances = tuple(
        dom.PodDisruptionBudget(name=pdb_key(b), max_unavailable=max(int((b.get("status") or {}).get(
            "disruptionsAllowed", 0) or 0), 0))
        for b in budgets
    )
    return snapshot.model_copy(update={"pods": tuple(out), "pdbs": allowances,
                                       "nodes": tuple(n for n in snapshot.nodes if n.name in nodes)})


def _pools_admitting(spec: Mapping[str, Any], snapshot: dom.Snapshot) -> set[str]:
    """Pools with a node the pod's node selector admits."""
    selector = spec.get("nodeSelector") or {}
    return {n.pool for n in snapshot.nodes
            if n.pool is not None and all(n.labels.get(k) == v for k, v in selector.items())}


def _pools_with_demand(snapshot: dom.Snapshot, pods: Iterable[Mapping[str, Any]]) -> set[str]:
    """The pools some unschedulable GPU pod could run in. Only they are planned: the packing model
    does not know node selectors, so a pod waiting for an H100 node must not look placeable on a free
    node of another pool (and pools without waiting demand need no moves)."""
    out: set[str] = set()
    for pod in pods:
        spec = pod.get("spec") or {}
        if not spec.get("nodeName") and gpus_of(pod) and unschedulable(pod) and \
                not pod["metadata"].get("deletionTimestamp"):
            out |= _pools_admitting(spec, snapshot)
    return out
