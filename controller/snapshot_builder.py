"""API objects (+ telemetry when available) -> Snapshot, the pure picture every policy reads.

Pods of other workloads (``cluster_pods`` not owned by a ModelDeployment the snapshot plans) enter
the snapshot as foreign pods when they hold GPUs on a pool node, so placement and routing count
only the devices they leave free (:func:`policies.placement_instance.foreign_devices`).

The builder never fails on one bad object: an object that does not parse is reported in
``Built.invalid`` (so the reconciler can mark it Degraded with the reason) and left out, and the
rest of the fleet is still planned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from controller.api import convert
from controller.api import models as api
from controller.executor import render as r
from controller.executor.executor import observe
from controller.reconciler.reschedule_input import gpus_of
from policies import snapshot as dom


@dataclass
class Built:
    snapshot: dom.Snapshot
    pools: dict[str, api.AcceleratorPool] = field(default_factory=dict)
    deployments: dict[str, api.ModelDeployment] = field(default_factory=dict)  # key "ns/name"
    invalid: dict[str, str] = field(default_factory=dict)  # key -> why it was left out


def owner_key(obj: Mapping[str, Any]) -> str | None:
    """``ns/name`` of the ModelDeployment that owns a workload object, if one does."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "ModelDeployment":
            return convert.deployment_key(obj["metadata"]["namespace"], ref["name"])
    return None


def group_by_owner(objects: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The ``owned`` argument of :func:`build_snapshot`: workload objects keyed by their owner."""
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        owner = owner_key(obj)
        if owner is not None:
            out.setdefault(owner, []).append(obj)
    return out


def _err(exc: ValidationError) -> str:
    return dom.format_validation_error(exc)


def build_snapshot(
    *,
    pools: Iterable[Mapping[str, Any]],
    power_domains: Iterable[Mapping[str, Any]] = (),
    deployments: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
    owned: Mapping[str, Sequence[Mapping[str, Any]]],
    now: float = 0.0,
    gpu_telemetry: Sequence[dom.GPUTelemetry] = (),
    serving: Sequence[dom.ServingTelemetry] = (),
    cluster_pods: Iterable[Mapping[str, Any]] = (),
) -> Built:
    """``owned`` maps a deployment key ``ns/name`` to the Deployments/Pods it owns; ``cluster_pods`` is
    every pod the cluster has (the controller's cluster-wide pod cache), for :func:`foreign_pods`."""
    invalid: dict[str, str] = {}
    parsed_pools: dict[str, api.AcceleratorPool] = {}
    for obj in pools:
        try:
            parsed_pools[obj["metadata"]["name"]] = api.AcceleratorPool.model_validate(obj)
        except ValidationError as exc:
            invalid[f"AcceleratorPool/{obj['metadata']['name']}"] = _err(exc)
    parsed_pds: list[api.PowerDomain] = []
    for obj in power_domains:
        try:
            parsed_pds.append(api.PowerDomain.model_validate(obj))
        except ValidationError as exc:
            invalid[f"PowerDomain/{obj['metadata']['name']}"] = _err(exc)

    node_list = sorted(nodes, key=lambda n: n["metadata"]["name"])
    pool_of: dict[str, str] = {}
    for node in node_list:
        labels = node["metadata"].get("labels") or {}
        for name in sorted(parsed_pools):
            if convert.selector_matches(parsed_pools[name].spec.node_selector, labels):
                pool_of[node["metadata"]["name"]] = name
                break
    pd_nodes: dict[str, list[str]] = {}
    pd_of: dict[str, str] = {}
    for pd in parsed_pds:
        members = [
            n["metadata"]["name"]
            for n in node_list
            if convert.selector_matches(pd.spec.node_selector, n["metadata"].get("labels") or {})
        ]
        pd_nodes[pd.metadata["name"]] = members
        for m in members:
            pd_of.setdefault(m, pd.metadata["name"])
    dom_nodes = [
        convert.to_node(n, pool_of.get(n["metadata"]["name"]), pd_of.get(n["metadata"]["name"]))
        for n in node_list
        if n["metadata"]["name"] in pool_of
    ]

    parsed_mds: dict[str, api.ModelDeployment] = {}
    dom_mds: list[dom.ModelDeployment] = []
    for obj in sorted(deployments, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])):
        key = convert.deployment_key(obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])
        try:
            md = api.ModelDeployment.model_validate(obj)
            dom_md = convert.to_deployment(md)
        except (ValidationError, ValueError) as exc:
            invalid[key] = _err(exc) if isinstance(exc, ValidationError) else str(exc)
            continue
        if obj["metadata"].get("deletionTimestamp"):
            continue  # being deleted: the finalizer path cleans up; plan nothing for it
        parsed_mds[key] = md
        dom_mds.append(dom_md)

    replicas: list[dom.ReplicaSet] = []
    pods: list[dom.Pod] = []
    label_to_pool = {r.short(name): name for name in parsed_pools}
    for key in parsed_mds:
        objs = owned.get(key, ())
        for label, seen in sorted(observe(objs).items()):
            pool = label_to_pool.get(label)
            if pool is not None and seen.replicas:
                replicas.append(dom.ReplicaSet(deployment=key, pool=pool, replicas=seen.replicas, ready=seen.ready))
        for o in objs:
            if o["kind"] != "Pod":
                continue
            meta, spec = o["metadata"], o.get("spec") or {}
            gpus = sum(
                int((c.get("resources") or {}).get("limits", {}).get(convert.GPU_RESOURCE, 0) or 0)
                for c in spec.get("containers") or []
            )
            pods.append(dom.Pod(name=f"{meta['namespace']}/{meta['name']}", node=spec.get("nodeName"),
                                num_gpu=gpus, gpu_milli=1000 if gpus else 0, deployment=key))

    pods.extend(foreign_pods(cluster_pods, set(pool_of), parsed_mds))

    snap = dom.Snapshot(
        now=now,
        pools=tuple(convert.to_pool(p) for _, p in sorted(parsed_pools.items())),
        nodes=tuple(dom_nodes),
        power_domains=tuple(convert.to_power_domain(pd, tuple(pd_nodes[pd.metadata["name"]])) for pd in parsed_pds),
        deployments=tuple(dom_mds),
        replicas=tuple(replicas),
        pods=tuple(pods),
        gpu_telemetry=tuple(gpu_telemetry),
        serving=tuple(serving),
    )
    return Built(snapshot=snap, pools=parsed_pools, deployments=parsed_mds, invalid=invalid)


def foreign_pods(pods: Iterable[Mapping[str, Any]], pool_nodes: set[str],
                 ours: Mapping[str, api.ModelDeployment]) -> list[dom.Pod]:
    """GPU pods bound to a pool node that are no replica of a ModelDeployment in ``ours``.

    Another team's pods, batch jobs, and the pods of a ModelDeployment the snapshot does not plan
    (being deleted, or invalid) all hold devices Wattplane cannot place on. A pending pod holds
    nothing on a node yet and is left out; a finished one (Succeeded/Failed) has released its
    devices; a terminating one still holds them until it is gone (the scheduler counts it too).
    They enter with ``deployment=None`` and whole devices (the device plugin allocates whole GPUs).
    """
    claimed = OurReplicas.of(ours)
    held = [(pod, *held_devices(pod)) for pod in pods]  # filter first: most cluster pods hold no GPU
    out: list[dom.Pod] = []
    for pod, node, gpus in sorted(((p, n, g) for p, n, g in held if n in pool_nodes and not claimed.claims(p)),
                                  key=lambda x: (x[0]["metadata"].get("namespace", ""), x[0]["metadata"]["name"])):
        meta = pod["metadata"]
        out.append(dom.Pod(name=f"{meta.get('namespace', 'default')}/{meta['name']}", node=node, num_gpu=gpus,
                           gpu_milli=1000))
    return out


def held_devices(pod: Mapping[str, Any]) -> tuple[str | None, int]:
    """``(node, whole GPUs)`` a pod holds: bound and not finished (a terminating pod still holds its
    devices, as the scheduler counts it); ``(None, 0)`` for a pending or finished pod."""
    node = (pod.get("spec") or {}).get("nodeName")
    if not node or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return None, 0
    gpus = gpus_of(pod)
    return (str(node), gpus) if gpus else (None, 0)


@dataclass(frozen=True)
class OurReplicas:
    """Which pods are replicas of a set of ModelDeployments (keys ``ns/name``): owned by one, or
    labelled for one as :func:`controller.reconciler.reschedule_input.deployment_of` matches them.
    Built once per pass, so telling every cluster pod apart is a set lookup, not a scan of the keys."""

    keys: frozenset[str]
    labels: frozenset[tuple[str, str]]  # (namespace, short name) as in the deployment label

    @classmethod
    def of(cls, keys: Iterable[str]) -> OurReplicas:
        ks = frozenset(keys)
        return cls(ks, frozenset((ns, r.short(name)) for ns, _, name in (k.partition("/") for k in ks)))

    def claims(self, pod: Mapping[str, Any]) -> bool:
        if owner_key(pod) in self.keys:
            return True
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        if labels.get(r.MANAGED_BY) != r.MANAGED_BY_VALUE or not labels.get(r.L_DEPLOYMENT):
            return False
        return (meta.get("namespace", "default"), labels[r.L_DEPLOYMENT]) in self.labels
