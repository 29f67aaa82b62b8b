"""The typed decision every policy returns: actions plus an explanation of why.

A Plan is a value. Its id is derived from its contents, so the same snapshot gives the same plan;
it carries the policy's next ``state`` (persisted by the caller, e.g. in a resource's status, so
hysteresis survives restarts) and the preconditions it assumed, which the executor re-checks
before acting.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from policies.snapshot import BadInputError, Frozen, NonNegFloat, NonNegInt, PriorityClass, format_validation_error

PLAN_VERSION: Literal[1] = 1


class PolicyName(StrEnum):
    PLACEMENT = "placement"
    MOE = "moe"
    POWER = "power"
    RESCHEDULE = "reschedule"
    ROUTING = "routing"


class SolverStatus(StrEnum):
    """CP-SAT's statuses, plus the cases where no solver ran."""

    OPTIMAL = "OPTIMAL"
    FEASIBLE = "FEASIBLE"
    INFEASIBLE = "INFEASIBLE"
    UNKNOWN = "UNKNOWN"  # time limit hit before a solution
    MODEL_INVALID = "MODEL_INVALID"
    HEURISTIC = "HEURISTIC"  # a heuristic produced the plan by design
    NOT_RUN = "NOT_RUN"  # nothing to decide


class Reason(StrEnum):
    """Why a plan looks the way it does; stable values, used as metric labels."""

    NO_CHANGE = "NoChange"
    DEMAND_CHANGED = "DemandChanged"
    BOUNDS_CHANGED = "BoundsChanged"
    INSUFFICIENT_CAPACITY = "InsufficientCapacity"
    LOAD_DRIFT = "LoadDrift"
    SCALE_EVENT = "ScaleEvent"
    DEVICE_FAILED = "DeviceFailed"
    OVER_BUDGET = "OverBudget"
    UNDER_BUDGET = "UnderBudget"
    FRAGMENTATION = "Fragmentation"
    CAPACITY_PRESSURE = "CapacityPressure"
    QUALITY_FLOOR = "QualityFloor"
    SOLVER_FALLBACK = "SolverFallback"
    BAD_INPUT = "BadInput"
    STABILISING = "Stabilising"


class Explanation(Frozen):
    """What changed, why, and how the decision was reached."""

    reason: Reason
    summary: str  # one human sentence: what changed and why
    objective: float | None = None
    bound: float | None = None  # best proven bound (same sense as objective)
    solver_status: SolverStatus = SolverStatus.NOT_RUN
    solve_ms: NonNegFloat = 0.0
    fallback: str | None = None  # name of the fallback/baseline used instead of the solver, if any
    metrics: dict[str, float] = Field(default_factory=dict)  # policy-specific figures

    @property
    def gap(self) -> float | None:
        """Relative gap |objective - bound| / max(|objective|, 1e-9), when both are known."""
        if self.objective is None or self.bound is None:
            return None
        return abs(self.objective - self.bound) / max(abs(self.objective), 1e-9)


class SetReplicas(Frozen):
    """Run ``replicas`` replicas of ``deployment`` in ``pool`` (was ``previous``)."""

    kind: Literal["SetReplicas"] = "SetReplicas"
    deployment: str
    pool: str
    replicas: NonNegInt
    previous: NonNegInt


class ExpertMove(Frozen):
    """One expert copy or free on one device's slot of one layer."""

    layer: NonNegInt
    device: NonNegInt
    slot: NonNegInt  # physical slot index (device * slots_per_device + k)
    expert: int  # logical expert; -1 frees the slot


class MigrationStage(StrEnum):
    COPY = "copy"  # load new expert weights into spare memory; serving continues on the old map
    SWITCH = "switch"  # atomically publish the new phy2log
    FREE = "free"  # release memory of experts no longer mapped


class ExpertMigrationStep(Frozen):
    stage: MigrationStage
    moves: tuple[ExpertMove, ...] = ()


class SetExpertPlacement(Frozen):
    """Publish a new expert placement for an MoE deployment, reached by staged steps."""

    kind: Literal["SetExpertPlacement"] = "SetExpertPlacement"
    deployment: str
    version: NonNegInt
    devices: NonNegInt
    slots_per_device: NonNegInt
    phy2log: tuple[tuple[int, ...], ...]
    steps: tuple[ExpertMigrationStep, ...] = ()
    copies: NonNegInt = 0
    bytes_moved: NonNegInt = 0
    device_origin: tuple[int, ...] = ()  # old device index of each new device (-1 = fresh); () = same devices


class SetPowerCap(Frozen):
    """Limit one GPU's power (W) and/or lock its SM clock (MHz); both None clears the cap."""

    kind: Literal["SetPowerCap"] = "SetPowerCap"
    node: str
    gpu: NonNegInt
    power_limit_w: NonNegFloat | None = None
    clock_limit_mhz: NonNegFloat | None = None
    priority: PriorityClass | None = None


class MigratePod(Frozen):
    """Move a pod/VM to another node (evict and re-create, or live-migrate a VM)."""

    kind: Literal["MigratePod"] = "MigratePod"
    pod: str
    from_node: str
    to_node: str
    deployment: str | None = None  # drained through the router first when set
    to_numa: NonNegInt | None = None  # target NUMA node (VM rescheduling); None: the node decides


class SetRoutingShare(Frozen):
    """Route requests of ``deployment`` whose difficulty is below ``threshold`` to ``fallback``."""

    kind: Literal["SetRoutingShare"] = "SetRoutingShare"
    deployment: str
    fallback: str
    threshold: float
    fallback_share: Annotated[float, Field(ge=0, le=1)]
    expected_quality: Annotated[float, Field(ge=0, le=1)] = 1.0
    version: NonNegInt = 0


Action = Annotated[
    SetReplicas | SetExpertPlacement | SetPowerCap | MigratePod | SetRoutingShare,
    Field(discriminator="kind"),
]


class Plan(Frozen):
    """A policy's decision for one cycle."""

    version: Literal[1] = PLAN_VERSION
    policy: PolicyName
    actions: tuple[Action, ...] = ()
    explanation: Explanation
    state: dict[str, Any] = Field(default_factory=dict)  # the policy's next State, as JSON
    preconditions: dict[str, str] = Field(default_factory=dict)  # object key -> resourceVersion
    dry_run: bool = False

    @property
    def id(self) -> str:
        """Content-derived id: identical decisions have identical ids."""
        body = self.model_dump_json(include={"policy", "actions"})
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    @property
    def is_noop(self) -> bool:
        return not self.actions

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "plan") -> Plan:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise BadInputError(f"{source}: {format_validation_error(exc)}") from exc


def noop_plan(policy: PolicyName, summary: str, state: dict[str, Any] | None = None) -> Plan:
    """The always-safe plan: change nothing, and say why."""
    return Plan(
        policy=policy,
        explanation=Explanation(reason=Reason.NO_CHANGE, summary=summary),
        state=state or {},
    )
