"""API objects -> ``policies.snapshot`` domain models.

The API types speak Kubernetes (camelCase, namespaced names, label selectors); the domain model
speaks fleet (pools, deployments keyed ``namespace/name``). Conversion is pure and lives here so
the snapshot builder, the simulator and tests share one mapping.
"""

from __future__ import annotations

from collections.abc import Mapping

from controller.api import models as api
from policies import snapshot as dom

GPU_RESOURCE = "nvidia.com/gpu"


def deployment_key(namespace: str, name: str) -> str:
    """The domain name of a ModelDeployment: ``namespace/name`` (unique across the cluster)."""
    return f"{namespace}/{name}"


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def to_pool(pool: api.AcceleratorPool) -> dom.Pool:
    s = pool.spec
    a = s.accelerator
    return dom.Pool(
        name=pool.metadata["name"],
        accelerator=dom.AcceleratorSpec(
            model=a.model,
            memory_gib=a.memory_gib,
            bf16_tflops=a.bf16_tflops,
            hbm_gbps=a.hbm_gbps,
            tdp_w=a.tdp_w,
            min_power_w=a.min_power_w,
            max_power_w=a.max_power_w,
        ),
        gpus_per_node=s.gpus_per_node,
        cost_per_device_hour=s.cost_per_device_hour,
        power_domain=s.power_domain,
        min_nodes=s.min_nodes,
        max_nodes=s.max_nodes,
    )


def to_power_domain(pd: api.PowerDomain, node_names: tuple[str, ...]) -> dom.PowerDomain:
    s = pd.spec
    thresholds = None
    if s.thresholds is not None:
        t = s.thresholds
        thresholds = dom.PolcaThresholds(
            lp_cap_at=t.lp_cap_at, all_cap_at=t.all_cap_at, release_below=t.release_below, brake_at=t.brake_at
        )
    return dom.PowerDomain(
        name=pd.metadata["name"],
        budget_w=s.budget_w,
        nodes=node_names,
        safety_margin=s.safety_margin,
        priority_order=tuple(dom.PriorityClass(p.value) for p in s.priority_order),
        thresholds=thresholds,
    )


def to_deployment(md: api.ModelDeployment) -> dom.ModelDeployment:
    s = md.spec
    ns = md.metadata.get("namespace", "default")
    moe = None
    if s.model.moe is not None:
        m = s.model.moe
        moe = dom.MoEShape(
            moe_layers=m.moe_layers,
            experts=m.experts,
            top_k=m.top_k,
            bytes_per_expert=m.bytes_per_expert,
            expert_groups=m.expert_groups,
        )
    elasticity = None
    if s.moe_elasticity is not None:
        e = s.moe_elasticity
        elasticity = dom.MoEElasticity(
            min_ep=e.min_ep,
            max_ep=e.max_ep,
            slots_per_device=e.slots_per_device,
            rebalance_threshold=e.rebalance_threshold,
            min_interval_s=e.min_interval_s,
        )
    fallback = None
    if s.fallback is not None:
        fallback = dom.Fallback(
            deployment=deployment_key(ns, s.fallback.deployment), quality_floor=s.fallback.quality_floor
        )
    return dom.ModelDeployment(
        name=deployment_key(ns, md.metadata["name"]),
        model=dom.ModelShape(
            name=s.model.name,
            params_b=s.model.params_b,
            active_params_b=s.model.active_params_b,
            layers=s.model.layers,
            moe=moe,
        ),
        parallelism=dom.Parallelism(tp=s.parallelism.tp, pp=s.parallelism.pp, ep=s.parallelism.ep),
        slo=dom.SLO(
            ttft_p99_ms=s.slo.ttft_p99_ms, tpot_p99_ms=s.slo.tpot_p99_ms, target_attainment=s.slo.target_attainment
        ),
        priority=dom.PriorityClass(s.priority.value),
        allowed_pools=tuple(s.allowed_pools),
        preferred_pools=tuple(s.preferred_pools),
        min_replicas=s.min_replicas,
        max_replicas=s.max_replicas,
        target_utilisation=s.autoscaling.target_utilisation,
        fallback=fallback,
        moe_elasticity=elasticity,
    )


def parse_cpu_milli(q: str | int | float | None) -> int:
    if q is None:
        return 0
    text = str(q)
    if text.endswith("m"):
        return int(float(text[:-1]))
    return int(float(text) * 1000)


_MEM_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "k": 10**3, "M": 10**6, "G": 10**9,
              "T": 10**12, "P": 10**15}


def parse_memory_mib(q: str | int | float | None) -> int:
    if q is None:
        return 0
    text = str(q)
    for suffix in sorted(_MEM_UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * _MEM_UNITS[suffix] / 2**20)
    return int(float(text) / 2**20)


# set on a node the migration executor cordoned so an evicted pod's replacement cannot land back there
# (controller/executor/evictions.py); placement still counts such a node: the cordon lasts seconds and the
# node is exactly where the pending replica the move makes room for will run
FENCE_ANNOTATION = "wattplane.io/fenced-for-migration"


def to_node(node: Mapping[str, object], pool: str | None, power_domain: str | None) -> dom.Node:
    meta = node.get("metadata") or {}
    status = node.get("status") or {}
    spec = node.get("spec") or {}
    assert isinstance(meta, dict) and isinstance(status, dict) and isinstance(spec, dict)
    labels: dict[str, str] = dict(meta.get("labels") or {})
    alloc = status.get("allocatable") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return dom.Node(
        name=str(meta["name"]),
        pool=pool,
        accelerator_model=labels.get("nvidia.com/gpu.product"),
        gpus=int(alloc.get(GPU_RESOURCE, 0) or 0),
        cpu_milli=parse_cpu_milli(alloc.get("cpu")),
        memory_mib=parse_memory_mib(alloc.get("memory")),
        ready=conditions.get("Ready") == "True",
        schedulable=not spec.get("unschedulable", False) or bool((meta.get("annotations") or {}).get(FENCE_ANNOTATION)),
        power_domain=power_domain,
        labels=labels,
    )
