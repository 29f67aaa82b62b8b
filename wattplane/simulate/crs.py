"""A scenario as the controller's custom resources, rendered with the controller's own API models.

``wattplane simulate --cluster`` applies these objects to a real API server, so they go through the
same pydantic models (``controller/api/models.py``) and the same CRD schemas as a user's YAML. What
a FleetPolicy cannot say is refused with the field named rather than silently approximated:
baseline methods (the controller runs Wattplane's policies only) and per-stage configs other than
the rescheduler's migration limit.
"""

from __future__ import annotations

from typing import Any

from controller.api import models as api
from policies.pipeline import OFF, OURS, STAGE_ORDER, Stage
from policies.snapshot import BadInputError
from wattplane.simulate.scenario import DeploymentSpec, PoolSpec, PowerDomainSpec, Scenario

POOL_LABEL = "wattplane.io/pool"
SIM_LABEL = "wattplane.io/simulation"  # on everything a cluster run creates, value = the run's id
ENGINE_IMAGE = "registry.k8s.io/pause:3.10"  # kwok runs no containers; a real cluster would pull a tiny image


def pool_object(p: PoolSpec, run_id: str) -> dict[str, Any]:
    a = p.accelerator
    obj = api.AcceleratorPool(
        metadata={"name": p.name, "labels": {SIM_LABEL: run_id}},
        spec=api.AcceleratorPoolSpec(
            node_selector={POOL_LABEL: p.name},
            accelerator=api.AcceleratorDevice(model=a.model, memory_gib=a.memory_gib, bf16_tflops=a.bf16_tflops,
                                              hbm_gbps=a.hbm_gbps, tdp_w=a.tdp_w, min_power_w=a.min_power_w,
                                              max_power_w=a.max_power_w),
            gpus_per_node=p.gpus_per_node, cost_per_device_hour=p.cost_per_device_hour,
            power_domain=p.power_domain, min_nodes=p.nodes, max_nodes=p.nodes),
    )
    return _wire(obj)


def power_domain_object(d: PowerDomainSpec, run_id: str) -> dict[str, Any]:
    thresholds = None
    if d.thresholds is not None:
        t = d.thresholds
        thresholds = api.PolcaThresholds(lp_cap_at=t.lp_cap_at, all_cap_at=t.all_cap_at,
                                         release_below=t.release_below, brake_at=t.brake_at)
    obj = api.PowerDomain(
        metadata={"name": d.name, "labels": {SIM_LABEL: run_id}},
        # a pool's nodes carry its name; the domain selects the nodes of its pools by a label of its own
        spec=api.PowerDomainSpec(budget_w=d.budget_w, node_selector={domain_label(d.name): "true"},
                                 safety_margin=d.safety_margin, thresholds=thresholds),
    )
    return _wire(obj)


def domain_label(name: str) -> str:
    return f"power.wattplane.io/{name}"


def deployment_object(d: DeploymentSpec, namespace: str, run_id: str) -> dict[str, Any]:
    m = d.model
    moe = None
    if m.moe is not None:
        moe = api.MoESpec(moe_layers=m.moe.moe_layers, experts=m.moe.experts, top_k=m.moe.top_k,
                          bytes_per_expert=m.moe.bytes_per_expert, expert_groups=m.moe.expert_groups)
    elasticity = None
    if d.moe_elasticity is not None:
        e = d.moe_elasticity
        elasticity = api.MoEElasticitySpec(min_ep=e.min_ep, max_ep=e.max_ep, slots_per_device=e.slots_per_device,
                                           rebalance_threshold=e.rebalance_threshold, min_interval_s=e.min_interval_s)
    fallback = None
    if d.fallback is not None:
        fallback = api.FallbackSpec(deployment=d.fallback.deployment, quality_floor=d.fallback.quality_floor)
    obj = api.ModelDeployment(
        metadata={"name": d.name, "namespace": namespace, "labels": {SIM_LABEL: run_id}},
        spec=api.ModelDeploymentSpec(
            model=api.ModelSpec(name=m.name, params_b=m.params_b, active_params_b=m.active_params_b, layers=m.layers,
                                moe=moe),
            # no weights are loaded: a tiny engine so kwok pods pack like GPU-bound ones (GPUs are the limit)
            engine=api.EngineSpec(image=ENGINE_IMAGE, model_path=f"simulated/{m.name}", cpu="1", memory="1Gi",
                                  termination_grace_s=0),
            parallelism=api.ParallelismSpec(tp=d.parallelism.tp, pp=d.parallelism.pp, ep=d.parallelism.ep),
            slo=api.SLOSpec(ttft_p99_ms=d.slo.ttft_p99_ms, tpot_p99_ms=d.slo.tpot_p99_ms,
                            target_attainment=d.slo.target_attainment),
            priority=api.PriorityClass(d.priority.value),
            allowed_pools=list(d.allowed_pools), preferred_pools=list(d.preferred_pools),
            min_replicas=d.min_replicas, max_replicas=d.max_replicas,
            autoscaling=api.AutoscalingSpec(target_utilisation=d.target_utilisation),
            fallback=fallback, moe_elasticity=elasticity),
    )
    return _wire(obj)


def fleet_policy_spec(scenario: Scenario, control_period_s: float) -> dict[str, Any]:
    """The FleetPolicy for the scenario's ``policies`` (Wattplane's stages on or off)."""
    problems = []
    on: dict[Stage, bool] = {}
    for s in STAGE_ORDER:
        stage = getattr(scenario.policies, s.value)
        if stage.method not in (OURS, OFF):
            problems.append(f"policies.{s.value}: {stage.method!r} is a baseline; the controller runs Wattplane's "
                            "policies only (compare baselines with the in-memory simulator)")
        on[s] = stage.method == OURS
    if problems:
        raise BadInputError("; ".join(problems))
    resched = scenario.policies.rescheduling.config
    disruption = api.DisruptionLimits(max_migrations_per_cycle=int(resched.get("mnl", 5)))
    spec = api.FleetPolicySpec(
        policies=api.PoliciesEnabled(placement=on[Stage.PLACEMENT], moe=on[Stage.MOE], power=on[Stage.POWER],
                                     rescheduling=on[Stage.RESCHEDULING], routing=on[Stage.ROUTING]),
        reconcile_period_s=max(1.0, control_period_s), disruption=disruption)
    return dict(spec.model_dump(mode="json", by_alias=True, exclude_none=True))


def _wire(obj: api.ApiModel) -> dict[str, Any]:
    return dict(obj.model_dump(mode="json", by_alias=True, exclude_none=True))


__all__ = ["SIM_LABEL", "deployment_object", "domain_label", "fleet_policy_spec", "pool_object",
           "power_domain_object"]
