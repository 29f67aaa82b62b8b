"""Wattplane's custom resources (``wattplane.io/v1alpha1``): the single source of truth.

The CRD YAML under ``helm/wattplane/crds/`` is generated from these models (``wattplane crds``),
and the controller parses the objects it reads from the API server with them, so the schema the
API server enforces and the types the controller uses cannot drift apart. Field names are
snake_case in Python and camelCase on the wire (Kubernetes convention). Cross-field rules the
API server must enforce are written once, as CEL, in each model's ``json_schema_extra``; the
same rules are also checked by pydantic validators so a bad object fails in Python too.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "wattplane.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Name = Annotated[str, Field(min_length=1, max_length=253)]


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules: ``(rule, message)`` pairs for the API server."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


class ApiModel(BaseModel):
    """Base of every API type: camelCase on the wire, immutable, tolerant of unknown fields on read."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True, extra="ignore")


# --------------------------------------------------------------------------------------------
# shared pieces


class Toleration(ApiModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Condition(ApiModel):
    """A Kubernetes-style condition (``metav1.Condition`` shape)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = "Unknown"
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class ConditionType(StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    POWER_CAPPED = "PowerCapped"
    ROUTED_TO_FALLBACK = "RoutedToFallback"
    OVER_BUDGET = "OverBudget"  # PowerDomain: the latest draw exceeds the budget
    CAPPING = "Capping"  # PowerDomain: caps in force or on their way to the agents
    REPORTING = "Reporting"  # PowerDomain: every node of the domain reports fresh telemetry


# --------------------------------------------------------------------------------------------
# AcceleratorPool (cluster-scoped)


class AcceleratorDevice(ApiModel):
    """Per-device specification of the pool's accelerator model."""

    model_config = ConfigDict(
        json_schema_extra=cel(("self.minPowerW <= self.maxPowerW", "minPowerW must be <= maxPowerW"))
    )

    model: Annotated[str, Field(min_length=1, max_length=63)]
    memory_gib: PosFloat = Field(alias="memoryGiB")
    bf16_tflops: PosFloat
    hbm_gbps: PosFloat = Field(alias="hbmGBps")
    tdp_w: PosFloat = Field(alias="tdpW")
    min_power_w: PosFloat = Field(alias="minPowerW")
    max_power_w: PosFloat = Field(alias="maxPowerW")

    @model_validator(mode="after")
    def _power(self) -> AcceleratorDevice:
        if self.min_power_w > self.max_power_w:
            raise ValueError("minPowerW must be <= maxPowerW")
        return self


class AcceleratorPoolSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.maxNodes) || self.minNodes <= self.maxNodes", "minNodes must be <= maxNodes"),
            ("size(self.nodeSelector) > 0", "nodeSelector must select at least one label"),
        )
    )

    node_selector: dict[str, str]
    tolerations: Annotated[list[Toleration], Field(max_length=16)] = []
    accelerator: AcceleratorDevice
    gpus_per_node: PosInt
    cost_per_device_hour: NonNegFloat = 0.0
    power_domain: str | None = None
    min_nodes: NonNegInt = 0
    max_nodes: NonNegInt | None = None


class AcceleratorPoolStatus(ApiModel):
    nodes: NonNegInt = 0
    nodes_ready: NonNegInt = 0
    devices: NonNegInt = 0
    devices_ready: NonNegInt = 0
    devices_allocated: NonNegInt = 0  # held by any bound, unfinished pod: Wattplane's replicas and other workloads'
    devices_free: NonNegInt = 0
    devices_foreign: NonNegInt = 0  # of devices_allocated, held by other workloads (not a ModelDeployment's replica)
    fragmentation: Fraction = 0.0  # share of free devices on nodes that cannot host a whole-node replica
    power_drawn_w: NonNegFloat = 0.0
    caps_in_force: NonNegInt = 0
    observed_generation: int | None = None
    conditions: Annotated[list[Condition], Field(max_length=16)] = []


class AcceleratorPool(ApiModel):
    KIND: ClassVar[str] = "AcceleratorPool"
    PLURAL: ClassVar[str] = "acceleratorpools"
    SCOPE: ClassVar[str] = "Cluster"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("apool", "apools")
    PRINTER_COLUMNS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Accelerator", "string", ".spec.accelerator.model"),
        ("GPUs/Node", "integer", ".spec.gpusPerNode"),
        ("Nodes", "integer", ".status.nodesReady"),
        ("Free", "integer", ".status.devicesFree"),
        ("Allocated", "integer", ".status.devicesAllocated"),
        ("Foreign", "integer", ".status.devicesForeign"),
    )

    api_version: Literal["wattplane.io/v1alpha1"] = "wattplane.io/v1alpha1"
    kind: Literal["AcceleratorPool"] = "AcceleratorPool"
    metadata: dict[str, Any] = {}
    spec: AcceleratorPoolSpec
    status: AcceleratorPoolStatus | None = None


# --------------------------------------------------------------------------------------------
# PowerDomain (cluster-scoped)


class PriorityClass(StrEnum):
    LATENCY_CRITICAL = "latency-critical"
    STANDARD = "standard"
    BEST_EFFORT = "best-effort"


class PolcaThresholds(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            ("self.lpCapAt <= self.allCapAt", "lpCapAt must be <= allCapAt"),
            ("self.allCapAt <= self.brakeAt", "allCapAt must be <= brakeAt"),
        )
    )

    lp_cap_at: Fraction = 0.8
    all_cap_at: Fraction = 0.9
    release_below: Fraction = 0.05
    brake_at: Fraction = 1.0


class PowerDomainSpec(ApiModel):
    budget_w: PosFloat = Field(alias="budgetW")
    node_selector: dict[str, str] = {}
    safety_margin: Fraction = 0.05
    priority_order: Annotated[list[PriorityClass], Field(max_length=3)] = [
        PriorityClass.BEST_EFFORT,
        PriorityClass.STANDARD,
        PriorityClass.LATENCY_CRITICAL,
    ]
    thresholds: PolcaThresholds | None = None


class PowerPlanSummary(ApiModel):
    """The last power plan that covered this domain, as the policy explained it."""

    plan_id: str = ""
    reason: str = ""
    summary: str = ""
    objective: float | None = None
    bound: float | None = None
    solver_status: str = ""
    solve_ms: NonNegFloat = 0.0
    fallback: str | None = None
    cap_changes: NonNegInt = 0  # SetPowerCap actions for this domain's GPUs in that plan
    time: str | None = None  # when this controller first saw the plan


class PowerDomainStatus(ApiModel):
    """Observed facts (the telemetry hub's reports and the agents' command results), rewritten each pass.

    Draw percentiles cover the last ``drawWindowS`` seconds of per-second domain draw; headroom is
    the budget minus the latest draw. ``overBudgetSeconds`` is cumulative: each pass adds the
    seconds after ``overBudgetThrough`` (unix seconds) that drew more than the budget, so a
    restarted controller continues the count instead of losing or repeating it.
    """

    draw_p50_w: NonNegFloat = Field(0.0, alias="drawP50W")
    draw_p99_w: NonNegFloat = Field(0.0, alias="drawP99W")
    headroom_w: float = Field(0.0, alias="headroomW")
    caps_applied: NonNegInt = 0
    over_budget_seconds: NonNegFloat = 0.0
    nodes: NonNegInt = 0
    observed_generation: int | None = None
    conditions: Annotated[list[Condition], Field(max_length=16)] = []
    budget_w: NonNegFloat = Field(0.0, alias="budgetW")
    measured_w: NonNegFloat = Field(0.0, alias="measuredW")  # latest complete second's domain draw
    draw_window_s: NonNegFloat = Field(0.0, alias="drawWindowS")
    nodes_reporting: NonNegInt = 0
    capped_gpus: Annotated[list[str], Field(max_length=1024)] = []  # "node/index" with a cap in force (reports)
    caps_acknowledged: NonNegInt = 0  # latest cap command per GPU answered APPLIED by its agent
    caps_pending: NonNegInt = 0  # latest cap command per GPU not answered yet
    caps_failed: NonNegInt = 0  # latest cap command per GPU refused or failed on the agent
    over_budget_through: NonNegFloat | None = None
    last_plan: PowerPlanSummary | None = None


class PowerDomain(ApiModel):
    KIND: ClassVar[str] = "PowerDomain"
    PLURAL: ClassVar[str] = "powerdomains"
    SCOPE: ClassVar[str] = "Cluster"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("pdom", "pdoms")
    PRINTER_COLUMNS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Budget W", "number", ".spec.budgetW"),
        ("Draw p99 W", "number", ".status.drawP99W"),
        ("Headroom W", "number", ".status.headroomW"),
        ("Caps", "integer", ".status.capsApplied"),
        ("Over s", "number", ".status.overBudgetSeconds"),
    )

    api_version: Literal["wattplane.io/v1alpha1"] = "wattplane.io/v1alpha1"
    kind: Literal["PowerDomain"] = "PowerDomain"
    metadata: dict[str, Any] = {}
    spec: PowerDomainSpec
    status: PowerDomainStatus | None = None


# --------------------------------------------------------------------------------------------
# ModelDeployment (namespaced)


class MoESpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            ("self.topK <= self.experts", "topK must be <= experts"),
            ("self.experts % self.expertGroups == 0", "experts must be divisible by expertGroups"),
        )
    )

    moe_layers: PosInt
    experts: PosInt
    top_k: PosInt = Field(alias="topK")
    bytes_per_expert: PosInt
    expert_groups: PosInt = 1


class ModelSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(("self.activeParamsB <= self.paramsB", "activeParamsB must be <= paramsB"))
    )

    name: Annotated[str, Field(min_length=1, max_length=253)]
    params_b: PosFloat = Field(alias="paramsB")
    active_params_b: PosFloat = Field(alias="activeParamsB")
    layers: PosInt = 1
    moe: MoESpec | None = None


class EngineKind(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"


class EngineSpec(ApiModel):
    """How to run the serving engine; the command line is rendered from this plus the parallelism."""

    kind: EngineKind = EngineKind.VLLM
    image: Annotated[str, Field(min_length=1, max_length=512)] = "vllm/vllm-openai:v0.11.0"
    model_path: Annotated[str, Field(min_length=1, max_length=1024)]
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    extra_args: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=64)] = []
    cpu: str = "8"
    memory: str = "64Gi"
    # time an engine gets to drain in-flight requests before it is killed
    termination_grace_s: Annotated[int, Field(ge=0, le=3600)] = Field(30, alias="terminationGraceS")


class ParallelismSpec(ApiModel):
    tp: Annotated[int, Field(ge=1, le=64)] = 1
    pp: Annotated[int, Field(ge=1, le=64)] = 1
    ep: Annotated[int, Field(ge=1, le=1024)] = 1


class SLOSpec(ApiModel):
    ttft_p99_ms: PosFloat = Field(2000.0, alias="ttftP99Ms")
    tpot_p99_ms: PosFloat = Field(100.0, alias="tpotP99Ms")
    target_attainment: Fraction = 0.99


class AutoscalingSpec(ApiModel):
    target_utilisation: Annotated[float, Field(gt=0, le=1)] = 0.8
    scale_down_stabilisation_s: NonNegFloat = 300.0


class FallbackSpec(ApiModel):
    deployment: Annotated[str, Field(min_length=1, max_length=253)]
    quality_floor: Fraction = 0.9


class MoEElasticitySpec(ApiModel):
    model_config = ConfigDict(json_schema_extra=cel(("self.minEp <= self.maxEp", "minEp must be <= maxEp")))

    min_ep: PosInt = Field(1, alias="minEp")
    max_ep: PosInt = Field(1, alias="maxEp")
    slots_per_device: PosInt = 1
    rebalance_threshold: Fraction = 0.05
    min_interval_s: NonNegFloat = 300.0


MODEL_DEPLOYMENT_SPEC_RULES = (
    ("self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas"),
    (
        "!has(self.moeElasticity) || has(self.model.moe)",
        "moeElasticity needs an MoE model (spec.model.moe)",
    ),
    (
        "!has(self.moeElasticity) || (self.parallelism.ep >= self.moeElasticity.minEp"
        " && self.parallelism.ep <= self.moeElasticity.maxEp)",
        "parallelism.ep must lie within moeElasticity [minEp, maxEp]",
    ),
    (
        "!has(self.preferredPools) || self.preferredPools.all(p, size(self.allowedPools) == 0"
        " || p in self.allowedPools)",
        "every preferredPool must be one of allowedPools",
    ),
)


class ModelDeploymentSpec(ApiModel):
    model_config = ConfigDict(json_schema_extra=cel(*MODEL_DEPLOYMENT_SPEC_RULES))

    model: ModelSpec
    engine: EngineSpec
    parallelism: ParallelismSpec = ParallelismSpec()
    slo: SLOSpec = SLOSpec()
    priority: PriorityClass = PriorityClass.STANDARD
    allowed_pools: Annotated[list[Annotated[str, Field(max_length=253)]], Field(max_length=32)] = []
    preferred_pools: Annotated[list[Annotated[str, Field(max_length=253)]], Field(max_length=32)] = []
    min_replicas: Annotated[int, Field(ge=0, le=10000)] = 1
    max_replicas: Annotated[int, Field(ge=0, le=10000)] = 10
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    fallback: FallbackSpec | None = None
    moe_elasticity: MoEElasticitySpec | None = Field(None, alias="moeElasticity")

    @model_validator(mode="after")
    def _cross(self) -> ModelDeploymentSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must be <= maxReplicas")
        if self.moe_elasticity is not None:
            if self.model.moe is None:
                raise ValueError("moeElasticity needs an MoE model (spec.model.moe)")
            if not self.moe_elasticity.min_ep <= self.parallelism.ep <= self.moe_elasticity.max_ep:
                raise ValueError("parallelism.ep must lie within moeElasticity [minEp, maxEp]")
        return self


class PoolReplicas(ApiModel):
    pool: str
    replicas: NonNegInt = 0
    ready: NonNegInt = 0
    shape: Literal["Deployment", "PodGroup"] = "Deployment"


class Decision(ApiModel):
    """The last decision that changed this deployment, as the policies explained it."""

    plan_id: str = ""
    policy: str = ""
    reason: str = ""
    summary: str = ""
    objective: float | None = None
    solver_status: str = ""
    solve_ms: NonNegFloat = 0.0
    fallback: str | None = None
    time: str | None = None


class MigrationRecord(ApiModel):
    """One move of a rescheduling plan and what the executor made of it."""

    pod: str = ""
    from_node: str = ""
    to_node: str = ""
    outcome: str = "Planned"  # Planned, Evicted, Migrated, BlockedByPDB, OverLimit, DryRun, Failed, ...
    message: str = ""


class RescheduleDecision(Decision):
    """The rescheduler's last plan with moves: its explanation, proven bound and each move's outcome."""

    bound: float | None = None
    dry_run: bool = False
    migrations: Annotated[list[MigrationRecord], Field(max_length=128)] = []


class ModelDeploymentStatus(ApiModel):
    replicas: NonNegInt = 0
    ready_replicas: NonNegInt = 0
    desired_replicas: NonNegInt = 0
    pools: Annotated[list[PoolReplicas], Field(max_length=64)] = []
    load_tokens_per_s: NonNegFloat = 0.0
    slo_attainment: Fraction | None = None
    routing_share: Fraction = 0.0
    expert_placement_version: NonNegInt = 0
    conditions: Annotated[list[Condition], Field(max_length=16)] = []
    last_decision: Decision | None = None
    observed_generation: int | None = None
    # the policies' State between cycles (Plan.state), kept here so hysteresis survives restarts
    policy_state: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )


class ModelDeployment(ApiModel):
    KIND: ClassVar[str] = "ModelDeployment"
    PLURAL: ClassVar[str] = "modeldeployments"
    SCOPE: ClassVar[str] = "Namespaced"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("md", "mds")
    PRINTER_COLUMNS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Model", "string", ".spec.model.name"),
        ("Desired", "integer", ".status.desiredReplicas"),
        ("Ready", "integer", ".status.readyReplicas"),
        ("Status", "string", ".status.conditions[?(@.type==\"Ready\")].status"),
        ("Reason", "string", ".status.lastDecision.reason"),
    )
    ROOT_RULES: ClassVar[tuple[tuple[str, str], ...]] = (
        (
            "!has(self.spec.fallback) || self.spec.fallback.deployment != self.metadata.name",
            "spec.fallback.deployment must name another ModelDeployment, not this one",
        ),
    )

    api_version: Literal["wattplane.io/v1alpha1"] = "wattplane.io/v1alpha1"
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    metadata: dict[str, Any] = {}
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None

    @model_validator(mode="after")
    def _fallback_not_self(self) -> ModelDeployment:
        if self.spec.fallback is not None and self.spec.fallback.deployment == self.metadata.get("name"):
            raise ValueError("spec.fallback.deployment must name another ModelDeployment, not this one")
        return self


# --------------------------------------------------------------------------------------------
# FleetPolicy (cluster-scoped singleton named "default")


class PoliciesEnabled(ApiModel):
    placement: bool = True
    moe: bool = False
    power: bool = False
    rescheduling: bool = False
    routing: bool = False


class SolverLimits(ApiModel):
    placement_s: Annotated[float, Field(gt=0, le=600)] = 2.0
    moe_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    power_s: Annotated[float, Field(gt=0, le=600)] = 0.5
    rescheduling_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    routing_s: Annotated[float, Field(gt=0, le=600)] = 1.0


class DisruptionLimits(ApiModel):
    """Enforced centrally by the executor, whatever a policy asks for."""

    max_migrations_per_cycle: NonNegInt = 5
    max_concurrent: NonNegInt = 2
    max_replica_removals_per_cycle: NonNegInt = 10


class FleetPolicySpec(ApiModel):
    policies: PoliciesEnabled = PoliciesEnabled()
    dry_run: bool = False
    solver_time_limits: SolverLimits = SolverLimits()
    reconcile_period_s: Annotated[float, Field(ge=1, le=3600)] = 30.0
    disruption: DisruptionLimits = DisruptionLimits()
    stabilisation_window_s: NonNegFloat = 300.0


class FleetPolicyStatus(ApiModel):
    leader: str = ""
    last_cycle: str | None = None
    # the policy pipeline's State (policies.pipeline.PipelineState), so hysteresis survives failover
    pipeline_state: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    observed_generation: int | None = None
    conditions: Annotated[list[Condition], Field(max_length=16)] = []
    last_reschedule: RescheduleDecision | None = None


class FleetPolicy(ApiModel):
    KIND: ClassVar[str] = "FleetPolicy"
    PLURAL: ClassVar[str] = "fleetpolicies"
    SCOPE: ClassVar[str] = "Cluster"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("fpol",)
    PRINTER_COLUMNS: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Dry-Run", "boolean", ".spec.dryRun"),
        ("Period", "number", ".spec.reconcilePeriodS"),
        ("Leader", "string", ".status.leader"),
    )
    ROOT_RULES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("self.metadata.name == 'default'", "FleetPolicy is a singleton: its name must be 'default'"),
    )

    api_version: Literal["wattplane.io/v1alpha1"] = "wattplane.io/v1alpha1"
    kind: Literal["FleetPolicy"] = "FleetPolicy"
    metadata: dict[str, Any] = {}
    spec: FleetPolicySpec = FleetPolicySpec()
    status: FleetPolicyStatus | None = None


RESOURCES: tuple[type[AcceleratorPool] | type[PowerDomain] | type[ModelDeployment] | type[FleetPolicy], ...] = (
    AcceleratorPool,
    PowerDomain,
    ModelDeployment,
    FleetPolicy,
)
