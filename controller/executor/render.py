"""Render the Kubernetes objects that run a ModelDeployment in a pool.

Two workload shapes (design §3): a replica that fits one node is a pod of a ``Deployment`` per
(ModelDeployment, pool); a replica wider than a node is a *pod group* -- one pod per node with a
group label, a stable ordinal and a headless Service -- that the controller manages directly, so
an expert-parallel group can later gain or lose a node without restarting the others. Rendering is
pure: same spec, same objects, same ``spec-hash`` annotation (which is how the executor tells an
up-to-date pod from one that must be replaced).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from controller.api import models as api

GPU_RESOURCE = "nvidia.com/gpu"
FIELD_MANAGER = "wattplane-controller"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "wattplane"
L_DEPLOYMENT = "wattplane.io/deployment"
L_POOL = "wattplane.io/pool"
L_SHAPE = "wattplane.io/shape"
L_GROUP = "wattplane.io/group"
L_GROUP_INDEX = "wattplane.io/group-index"
L_ORDINAL = "wattplane.io/ordinal"
L_SERVING = "wattplane.io/serving"  # "true" while a pod takes requests; a drain before eviction sets "false"
A_SPEC_HASH = "wattplane.io/spec-hash"
SHAPE_DEPLOYMENT = "Deployment"
SHAPE_GROUP = "PodGroup"


def short(name: str, limit: int = 63) -> str:
    """A DNS label no longer than ``limit``: long names keep a readable prefix plus a stable hash."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-.')}-{digest}"


@dataclass(frozen=True)
class Shape:
    """How one replica of a deployment maps onto nodes of a pool."""

    kind: str  # SHAPE_DEPLOYMENT or SHAPE_GROUP
    devices: int  # devices per replica (TP x PP)
    nodes: int  # nodes per replica (1 for a Deployment)
    gpus_per_pod: int


def shape_for(md: api.ModelDeployment, pool: api.AcceleratorPool) -> Shape:
    devices = md.spec.parallelism.tp * md.spec.parallelism.pp
    per_node = pool.spec.gpus_per_node
    if devices <= per_node:
        return Shape(SHAPE_DEPLOYMENT, devices, 1, devices)
    nodes = math.ceil(devices / per_node)
    return Shape(SHAPE_GROUP, devices, nodes, math.ceil(devices / nodes))


def base_name(md: api.ModelDeployment, pool_name: str) -> str:
    return short(f"{md.metadata['name']}-{pool_name}")


def group_name(md: api.ModelDeployment, pool_name: str, index: int) -> str:
    return short(f"{md.metadata['name']}-{pool_name}-g{index}", 56)  # leaves room for "-<ordinal>"


def selector_labels(md: api.ModelDeployment, pool_name: str) -> dict[str, str]:
    return {L_DEPLOYMENT: short(md.metadata["name"]), L_POOL: short(pool_name)}


def owner_reference(md: api.ModelDeployment) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": "ModelDeployment",
        "name": md.metadata["name"],
        "uid": md.metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def engine_command(
    md: api.ModelDeployment, *, nnodes: int = 1, node_rank: int = 0, leader: str | None = None
) -> list[str]:
    """The serving engine's command line, rendered from the spec (vLLM or SGLang flags)."""
    e = md.spec.engine
    p = md.spec.parallelism
    if e.kind is api.EngineKind.SGLANG:
        cmd = [
            "python3", "-m", "sglang.launch_server",
            "--model-path", e.model_path,
            "--served-model-name", md.spec.model.name,
            "--host", "0.0.0.0", "--port", str(e.port),
            "--tp-size", str(p.tp), "--pp-size", str(p.pp),
        ]  # fmt: skip
        if p.ep > 1:
            cmd += ["--ep-size", str(p.ep), "--enable-eplb"]
        if nnodes > 1:
            cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--dist-init-addr", f"{leader}:5000"]
    else:
        cmd = [
            "vllm", "serve", e.model_path,
            "--served-model-name", md.spec.model.name,
            "--host", "0.0.0.0", "--port", str(e.port),
            "--tensor-parallel-size", str(p.tp), "--pipeline-parallel-size", str(p.pp),
        ]  # fmt: skip
        if p.ep > 1:
            cmd += ["--enable-expert-parallel", "--enable-eplb"]
        if nnodes > 1:
            cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", str(leader)]
    return cmd + list(e.extra_args)


def _pod_spec(
    md: api.ModelDeployment, pool: api.AcceleratorPool, gpus: int, command: list[str]
) -> dict[str, Any]:
    e = md.spec.engine
    resources = {"cpu": e.cpu, "memory": e.memory, GPU_RESOURCE: str(gpus)}
    spec: dict[str, Any] = {
        "nodeSelector": dict(pool.spec.node_selector),
        "containers": [
            {
                "name": "engine",
                "image": e.image,
                "command": command,
                "ports": [{"name": "http", "containerPort": e.port}],
                "resources": {"requests": resources, "limits": {GPU_RESOURCE: str(gpus)}},
                "readinessProbe": {"httpGet": {"path": "/health", "port": e.port}, "periodSeconds": 10},
            }
        ],
        "terminationGracePeriodSeconds": e.termination_grace_s,
    }
    if pool.spec.tolerations:
        spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in pool.spec.tolerations]
    return spec


def spec_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def render_deployment(
    md: api.ModelDeployment, pool_name: str, pool: api.AcceleratorPool, replicas: int
) -> dict[str, Any]:
    shape = shape_for(md, pool)
    labels = {MANAGED_BY: MANAGED_BY_VALUE, **selector_labels(md, pool_name), L_SHAPE: SHAPE_DEPLOYMENT}
    template_spec = _pod_spec(md, pool, shape.gpus_per_pod, engine_command(md))
    # pack single-node replicas onto nodes that already run some, keeping whole nodes free for pod
    # groups (the default scheduler spreads, which strands GPUs a wide replica needs)
    template_spec["affinity"] = {
        "podAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": {MANAGED_BY: MANAGED_BY_VALUE, L_SHAPE: SHAPE_DEPLOYMENT}},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        }
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": base_name(md, pool_name),
            "namespace": md.metadata["namespace"],
            "labels": labels,
            "annotations": {A_SPEC_HASH: spec_hash(template_spec)},
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(md, pool_name)},
            "template": {"metadata": {"labels": {**labels, L_SERVING: "true"}}, "spec": template_spec},
        },
    }


def render_group_service(md: api.ModelDeployment, pool_name: str, index: int) -> dict[str, Any]:
    group = group_name(md, pool_name, index)
    labels = {MANAGED_BY: MANAGED_BY_VALUE, **selector_labels(md, pool_name), L_SHAPE: SHAPE_GROUP,
              L_GROUP: group, L_GROUP_INDEX: str(index)}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": group,
            "namespace": md.metadata["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # members must find each other before they serve
            "selector": {L_GROUP: group},
            "ports": [{"name": "http", "port": md.spec.engine.port}, {"name": "dist", "port": 5000}],
        },
    }


def render_group_pod(
    md: api.ModelDeployment, pool_name: str, pool: api.AcceleratorPool, index: int, ordinal: int
) -> dict[str, Any]:
    """Member ``ordinal`` of pod group ``index``: one per node, found by DNS at ``<pod>.<group>``."""
    shape = shape_for(md, pool)
    group = group_name(md, pool_name, index)
    ns = md.metadata["namespace"]
    leader = f"{group}-0.{group}.{ns}.svc"
    labels = {MANAGED_BY: MANAGED_BY_VALUE, **selector_labels(md, pool_name), L_SHAPE: SHAPE_GROUP,
              L_GROUP: group, L_GROUP_INDEX: str(index), L_ORDINAL: str(ordinal)}
    spec = _pod_spec(
        md, pool, shape.gpus_per_pod, engine_command(md, nnodes=shape.nodes, node_rank=ordinal, leader=leader)
    )
    spec["hostname"] = f"{group}-{ordinal}"
    spec["subdomain"] = group
    # one member per node: the group's pods repel each other on the hostname topology
    spec["affinity"] = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {L_GROUP: group}}, "topologyKey": "kubernetes.io/hostname"}
            ]
        }
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{group}-{ordinal}",
            "namespace": ns,
            "labels": labels,
            "annotations": {A_SPEC_HASH: spec_hash(spec)},
            "ownerReferences": [owner_reference(md)],
        },
        "spec": spec,
    }


def render_expert_placement(md: api.ModelDeployment, version: int, phy2log: Any) -> dict[str, Any]:
    """The versioned expert map in the form SGLang's expert-location input takes."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": short(f"{md.metadata['name']}-expert-placement", 253),
            "namespace": md.metadata["namespace"],
            "labels": {MANAGED_BY: MANAGED_BY_VALUE, L_DEPLOYMENT: short(md.metadata["name"])},
            "annotations": {"wattplane.io/expert-placement-version": str(version)},
            "ownerReferences": [owner_reference(md)],
        },
        "data": {"physical_to_logical_map.json": json.dumps({"physical_to_logical_map": phy2log})},
    }
