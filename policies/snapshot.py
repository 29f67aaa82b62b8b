"""The domain model every policy reads: an immutable, serialisable picture of the fleet.

A Snapshot is plain data. The controller builds one from API objects plus agent telemetry, the
simulator builds one from its fake world, and ``wattplane plan`` loads one from a file; policies
cannot tell the difference. Models are frozen pydantic models so a snapshot file is validated on
load (``Snapshot.from_json``) with a clear error, and anyone can re-score a plan independently.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SNAPSHOT_VERSION: Literal[1] = 1

NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Frozen(BaseModel):
    """Base for all domain data: immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PriorityClass(StrEnum):
    """Who is hurt last when capacity or power runs short (caps hit best-effort first)."""

    LATENCY_CRITICAL = "latency-critical"
    STANDARD = "standard"
    BEST_EFFORT = "best-effort"

    @property
    def rank(self) -> int:
        """0 for the most important class; larger numbers are disrupted first."""
        return {"latency-critical": 0, "standard": 1, "best-effort": 2}[self.value]


class AcceleratorSpec(Frozen):
    """Per-device specification of one accelerator model (e.g. ``H100-80GB``)."""

    model: str = Field(min_length=1)
    memory_gib: PosFloat
    bf16_tflops: PosFloat
    hbm_gbps: PosFloat
    tdp_w: PosFloat
    min_power_w: PosFloat
    max_power_w: PosFloat
    idle_fraction: Fraction = 0.2  # idle draw as a fraction of TDP

    @model_validator(mode="after")
    def _power_range(self) -> AcceleratorSpec:
        if not self.min_power_w <= self.max_power_w:
            raise ValueError(
                f"accelerator {self.model}: min_power_w {self.min_power_w} > max_power_w {self.max_power_w}"
            )
        return self


class Pool(Frozen):
    """A node pool of identical GPU servers."""

    name: str = Field(min_length=1)
    accelerator: AcceleratorSpec
    gpus_per_node: PosInt
    cost_per_device_hour: NonNegFloat
    power_domain: str | None = None
    min_nodes: NonNegInt = 0
    max_nodes: NonNegInt | None = None


class Node(Frozen):
    """One server. ``gpus`` counts whole devices; fractional shares live on Pods."""

    name: str = Field(min_length=1)
    pool: str | None = None
    accelerator_model: str | None = None
    gpus: NonNegInt = 0
    cpu_milli: NonNegInt = 0
    memory_mib: NonNegInt = 0
    numa_nodes: PosInt = 1
    ready: bool = True
    schedulable: bool = True
    power_domain: str | None = None
    labels: Mapping[str, str] = Field(default_factory=dict)


class PolcaThresholds(Frozen):
    """Optional POLCA-style overrides, as fractions of the domain budget."""

    lp_cap_at: Fraction = 0.8  # above this, lock clocks of low-priority GPUs
    all_cap_at: Fraction = 0.9  # above this, cap every GPU
    release_below: Fraction = 0.05  # release when power falls this far below the threshold
    brake_at: Fraction = 1.0  # power brake (emergency) at/above this


class PowerDomain(Frozen):
    """A row / rack / PDU budget that its nodes' GPUs must stay under."""

    name: str = Field(min_length=1)
    budget_w: PosFloat
    nodes: tuple[str, ...] = ()
    safety_margin: Fraction = 0.05
    priority_order: tuple[PriorityClass, ...] = (
        PriorityClass.BEST_EFFORT,
        PriorityClass.STANDARD,
        PriorityClass.LATENCY_CRITICAL,
    )
    thresholds: PolcaThresholds | None = None


class MoEShape(Frozen):
    """Mixture-of-experts shape of a model (DeepSeek-V3: 58 layers x 256 experts, top-8)."""

    moe_layers: PosInt
    experts: PosInt
    top_k: PosInt
    bytes_per_expert: PosInt
    expert_groups: PosInt = 1  # DeepSeek-V3 routes within 8 groups

    @model_validator(mode="after")
    def _check(self) -> MoEShape:
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} > experts {self.experts}")
        if self.experts % self.expert_groups:
            raise ValueError(f"experts {self.experts} not divisible by expert_groups {self.expert_groups}")
        return self


class ModelShape(Frozen):
    """What is served: size drives memory, active parameters drive compute per token."""

    name: str = Field(min_length=1)  # e.g. "llama-3.1-70b"
    params_b: PosFloat
    active_params_b: PosFloat
    layers: PosInt = 1
    moe: MoEShape | None = None

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


class Parallelism(Frozen):
    tp: PosInt = 1
    pp: PosInt = 1
    ep: PosInt = 1

    @property
    def devices(self) -> int:
        """Devices per replica: TP x PP (EP shards experts across those same devices)."""
        return self.tp * self.pp


class SLO(Frozen):
    ttft_p99_ms: PosFloat = 2000.0
    tpot_p99_ms: PosFloat = 100.0
    target_attainment: Fraction = 0.99


class Fallback(Frozen):
    """A smaller deployment this one may route to, never below ``quality_floor``."""

    deployment: str = Field(min_length=1)
    quality_floor: Fraction = 0.9  # expected quality relative to the large model


class MoEElasticity(Frozen):
    min_ep: PosInt = 1
    max_ep: PosInt = 1
    slots_per_device: PosInt = 1
    rebalance_threshold: Fraction = 0.05  # minimum balancedness gain worth a rebalance
    min_interval_s: NonNegFloat = 300.0


class ModelDeployment(Frozen):
    """A model the fleet serves, with its bounds and preferences (namespaced ``ns/name``)."""

    name: str = Field(min_length=1)
    model: ModelShape
    parallelism: Parallelism = Parallelism()
    slo: SLO = SLO()
    priority: PriorityClass = PriorityClass.STANDARD
    allowed_pools: tuple[str, ...] = ()  # empty: any pool
    preferred_pools: tuple[str, ...] = ()
    min_replicas: NonNegInt = 0
    max_replicas: NonNegInt = 100
    target_utilisation: Fraction = 0.8  # headroom: plan capacity = demand / target
    fallback: Fallback | None = None
    moe_elasticity: MoEElasticity | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelDeployment:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"{self.name}: min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.fallback is not None and self.fallback.deployment == self.name:
            raise ValueError(f"{self.name}: fallback must name another deployment")
        return self


class ReplicaSet(Frozen):
    """Current replicas of a deployment in one pool (what the cluster runs now)."""

    deployment: str
    pool: str
    replicas: NonNegInt
    ready: NonNegInt = 0


class Pod(Frozen):
    """A running or pending workload unit, for rescheduling (pods or VMs).

    ``gpu_milli`` is the share of each of ``num_gpu`` devices (1000 = a whole GPU); a
    fractional pod has ``num_gpu == 1`` and ``gpu_milli < 1000``. ``gpu_indices`` pins the
    devices it uses on its node when known.
    """

    name: str = Field(min_length=1)
    node: str | None = None  # None while pending
    cpu_milli: NonNegInt = 0
    memory_mib: NonNegInt = 0
    num_gpu: NonNegInt = 0
    gpu_milli: Annotated[int, Field(ge=0, le=1000)] = 0
    gpu_indices: tuple[int, ...] = ()
    gpu_model: str | None = None  # required accelerator model, if any
    priority: PriorityClass = PriorityClass.STANDARD
    deployment: str | None = None  # owning ModelDeployment; None (or one not planned): foreign, its GPUs not ours
    pdb: str | None = None  # PodDisruptionBudget name covering this pod
    movable: bool = True  # False for do-not-move labels
    numa: int | None = None  # NUMA node for the VMR2L CPU form


class PodDisruptionBudget(Frozen):
    name: str
    max_unavailable: NonNegInt


class GPUTelemetry(Frozen):
    """Latest per-device reading reported by the node agent."""

    node: str
    index: NonNegInt
    power_w: NonNegFloat
    utilisation: Fraction = 0.0
    memory_used_gib: NonNegFloat = 0.0
    sm_clock_mhz: NonNegFloat = 0.0
    temperature_c: float = 0.0
    power_limit_w: NonNegFloat | None = None
    energy_j: NonNegFloat = 0.0
    deployment: str | None = None  # what runs on it, if anything
    priority: PriorityClass | None = None
    prefill_fraction: Fraction | None = None  # share of the interval in prompt passes (engine metrics); None: unknown


class ServingTelemetry(Frozen):
    """Per-deployment serving load, aggregated over its replicas."""

    deployment: str
    requests_per_s: NonNegFloat = 0.0
    input_tokens_per_s: NonNegFloat = 0.0
    output_tokens_per_s: NonNegFloat = 0.0
    queue_depth: NonNegFloat = 0.0
    ttft_p99_ms: NonNegFloat = 0.0
    tpot_p99_ms: NonNegFloat = 0.0
    kv_cache_use: Fraction = 0.0


class ExpertLoad(Frozen):
    """Tokens routed to each logical expert, per MoE layer: ``loads[layer][expert]``."""

    deployment: str
    loads: tuple[tuple[NonNegFloat, ...], ...]


class ExpertPlacement(Frozen):
    """Current physical slot -> logical expert map per layer (EPLB's ``phy2log``).

    ``phy2log[layer][slot]`` with ``slot = device * slots_per_device + k``; -1 is an empty slot.
    """

    deployment: str
    version: NonNegInt = 0
    devices: PosInt
    slots_per_device: PosInt
    phy2log: tuple[tuple[int, ...], ...]
    failed_devices: tuple[NonNegInt, ...] = ()  # devices reported dead; their experts must be restored


class Demand(Frozen):
    """Forecast load of one deployment, in the units capacity is measured in."""

    deployment: str
    input_tokens_per_s: NonNegFloat = 0.0
    output_tokens_per_s: NonNegFloat = 0.0
    requests_per_s: NonNegFloat = 0.0


class Snapshot(Frozen):
    """Everything a policy may read about the fleet at one instant."""

    version: Literal[1] = SNAPSHOT_VERSION
    now: float = 0.0  # seconds; the only clock policies see
    pools: tuple[Pool, ...] = ()
    nodes: tuple[Node, ...] = ()
    power_domains: tuple[PowerDomain, ...] = ()
    deployments: tuple[ModelDeployment, ...] = ()
    replicas: tuple[ReplicaSet, ...] = ()
    pods: tuple[Pod, ...] = ()
    pdbs: tuple[PodDisruptionBudget, ...] = ()
    gpu_telemetry: tuple[GPUTelemetry, ...] = ()
    serving: tuple[ServingTelemetry, ...] = ()
    demand: tuple[Demand, ...] = ()
    expert_loads: tuple[ExpertLoad, ...] = ()
    expert_placements: tuple[ExpertPlacement, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> Snapshot:
        """Cross-references must resolve, so policies can index without defensive checks."""
        pools = {p.name for p in self.pools}
        errors: list[str] = []
        _unique("pool", [p.name for p in self.pools], errors)
        _unique("node", [n.name for n in self.nodes], errors)
        _unique("deployment", [d.name for d in self.deployments], errors)
        _unique("power domain", [d.name for d in self.power_domains], errors)
        for n in self.nodes:
            if n.pool is not None and n.pool not in pools:
                errors.append(f"node {n.name}: unknown pool {n.pool!r}")
        deployments = {d.name for d in self.deployments}
        for r in self.replicas:
            if r.pool not in pools:
                errors.append(f"replicas of {r.deployment}: unknown pool {r.pool!r}")
            if r.deployment not in deployments:
                errors.append(f"replicas: unknown deployment {r.deployment!r}")
        if errors:
            raise ValueError("; ".join(errors[:20]))
        return self

    # -- lookups (cheap, derived; no hidden state) ---------------------------------------
    def pool(self, name: str) -> Pool:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"unknown pool {name!r}")

    def deployment(self, name: str) -> ModelDeployment:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(f"unknown deployment {name!r}")

    def nodes_in_pool(self, pool: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.pool == pool)

    def current_replicas(self, deployment: str, pool: str) -> int:
        return sum(r.replicas for r in self.replicas if r.deployment == deployment and r.pool == pool)

    def to_json(self) -> str:
        return self.model_dump_json(indent=None)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "snapshot") -> Snapshot:
        """Load and validate a snapshot file; raise :class:`BadInputError` with a readable message."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise BadInputError(f"{source}: {format_validation_error(exc)}") from exc


class BadInputError(ValueError):
    """A snapshot, plan or scenario file that does not validate; the message says where and why."""


def format_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """One line per problem: ``field.path: message``, at most ``limit`` lines."""
    lines = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        lines.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - limit
    if more > 0:
        lines.append(f"... and {more} more")
    return "; ".join(lines)


def _unique(kind: str, names: list[str], errors: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            errors.append(f"duplicate {kind} {n!r}")
        seen.add(n)
