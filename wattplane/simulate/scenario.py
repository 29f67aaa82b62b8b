"""The scenario file: a fleet, its load and which policies run, as validated pydantic models.

A scenario is YAML. Errors name the file, the line and the field (``quickstart.yaml:12:
pools[0].gpus_per_node: Input should be greater than 0``) because the YAML nodes keep their
marks and pydantic's error locations are walked back through them.

Deployments take every field of :class:`policies.snapshot.ModelDeployment` plus the simulation's
own: ``initial_replicas`` per pool and the ``load`` share of the generated traffic. ``model`` may be
a catalogue name (``llama-3.1-70b``) instead of a full shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from policies.pipeline import (
    BASELINES,
    OFF,
    OURS,
    STAGE_ORDER,
    PipelineConfig,
    Stage,
    StageSetting,
    available_methods,
)
from policies.profiles import REFERENCE_GPUS, canonical_gpu
from policies.snapshot import (
    AcceleratorSpec,
    BadInputError,
    ModelDeployment,
    ModelShape,
    MoEShape,
    PolcaThresholds,
)

# Sizes a simulation can hold on one machine; beyond them a scenario is refused with a clear error
# instead of exhausting memory (sweeps bigger than a machine split into scenarios: --ray).
MAX_NODES_PER_POOL = 100_000
MAX_GPUS = 1_000_000
MAX_DURATION_S = 30 * 86400.0
MAX_STEPS = 10_000_000


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Well-known model shapes so a scenario can say ``model: llama-3.1-70b`` (public model cards).
MODEL_CATALOGUE: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape(name="llama-3.1-8b", params_b=8, active_params_b=8, layers=32),
    "llama-3.1-70b": ModelShape(name="llama-3.1-70b", params_b=70, active_params_b=70, layers=80),
    "qwen3-32b": ModelShape(name="qwen3-32b", params_b=32, active_params_b=32, layers=64),
    "qwen3-30b-a3b": ModelShape(name="qwen3-30b-a3b", params_b=30.5, active_params_b=3.3, layers=48,
                                moe=MoEShape(moe_layers=48, experts=128, top_k=8, bytes_per_expert=9_437_184)),
    "qwen3-235b-a22b": ModelShape(name="qwen3-235b-a22b", params_b=235, active_params_b=22, layers=94,
                                  moe=MoEShape(moe_layers=94, experts=128, top_k=8, bytes_per_expert=18_874_368)),
    "deepseek-v3": ModelShape(name="deepseek-v3.1", params_b=671, active_params_b=37, layers=61,
                              moe=MoEShape(moe_layers=58, experts=256, top_k=8, bytes_per_expert=44_040_192,
                                           expert_groups=8)),
}


class PoolSpec(Strict):
    name: str = Field(min_length=1)
    accelerator: AcceleratorSpec
    nodes: int = Field(ge=0, le=MAX_NODES_PER_POOL)
    gpus_per_node: int = Field(default=8, gt=0, le=64)
    cost_per_device_hour: float = Field(ge=0)
    power_domain: str | None = None

    @field_validator("accelerator", mode="before")
    @classmethod
    def _named_accelerator(cls, v: Any) -> Any:
        if isinstance(v, str):
            spec = REFERENCE_GPUS.get(canonical_gpu(v))
            if spec is None:
                raise ValueError(f"unknown accelerator {v!r}; use one of {sorted(REFERENCE_GPUS)} or a full spec")
            return spec
        return v


class PowerDomainSpec(Strict):
    name: str = Field(min_length=1)
    budget_w: float = Field(gt=0)
    safety_margin: float = Field(default=0.05, ge=0, le=1)
    thresholds: PolcaThresholds | None = None


class DeploymentLoad(Strict):
    """This deployment's part of the scenario's traffic."""

    share: float = Field(default=1.0, ge=0)  # relative weight of the generated request rate
    input_scale: float = Field(default=1.0, gt=0)  # multiplies prompt lengths
    output_scale: float = Field(default=1.0, gt=0)


class DeploymentSpec(ModelDeployment):
    initial_replicas: dict[str, int] = Field(default_factory=dict)  # pool -> replicas at t=0
    load: DeploymentLoad = DeploymentLoad()

    @field_validator("model", mode="before")
    @classmethod
    def _named_model(cls, v: Any) -> Any:
        if isinstance(v, str):
            shape = MODEL_CATALOGUE.get(v.lower())
            if shape is None:
                raise ValueError(f"unknown model {v!r}; use one of {sorted(MODEL_CATALOGUE)} or a full shape")
            return shape
        return v

    def domain(self) -> ModelDeployment:
        return ModelDeployment.model_validate(self.model_dump(exclude={"initial_replicas", "load"}))


class Burst(Strict):
    """Multiply the request rate by ``factor`` between ``at_s`` and ``at_s + duration_s``."""

    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    factor: float = Field(gt=0)
    deployments: tuple[str, ...] = ()  # empty: every deployment
    ramp_s: float = Field(default=0.0, ge=0)


class SyntheticLoad(Strict):
    """Arrivals and token lengths; defaults are the Azure conversation trace's statistics (load.py)."""

    requests_per_s: float = Field(gt=0, le=1_000_000)
    rate_cv: float | None = Field(default=None, ge=0)  # per-minute rate variation
    bursts: tuple[Burst, ...] = ()
    diurnal_amplitude: float = Field(default=0.0, ge=0, lt=1)
    diurnal_period_s: float = Field(default=86400.0, gt=0)


class TraceLoad(Strict):
    """Replay a real arrival trace (Azure LLM trace columns), read from disk, never bundled."""

    path: str  # absolute, relative to the scenario file, or ``data:azure-llm-2023/...`` under --data-dir
    rate_scale: float = Field(default=1.0, gt=0)  # multiply the trace's arrival rate (replay n copies offset)
    bursts: tuple[Burst, ...] = ()


class LoadSpec(Strict):
    synthetic: SyntheticLoad | None = None
    trace: TraceLoad | None = None

    @model_validator(mode="after")
    def _one(self) -> LoadSpec:
        if (self.synthetic is None) == (self.trace is None):
            raise ValueError("give exactly one of load.synthetic or load.trace")
        return self


class MoELoadSpec(Strict):
    """Synthetic per-expert load (no real traces are public; design data README): Zipf skew with drift."""

    zipf_s: float = Field(default=1.0, ge=0)
    drift: float = Field(default=0.05, ge=0)  # lognormal sigma per control cycle
    shift_at_s: tuple[float, ...] = ()  # times when the hot experts change (a new topic mix)


class BackgroundPods(Strict):
    """Non-serving GPU pods (batch, notebooks) sharing the nodes: the fragmentation source."""

    count: int = Field(default=0, ge=0)
    fractional_share: float = Field(default=0.4, ge=0, le=1)  # share of pods using part of one GPU
    pods_csv: str | None = None  # Alibaba ``openb_pod_list_*.csv``: its GPU pods (first ``count``, 0 = all)
    churn_per_hour: float = Field(default=0.0, ge=0)  # fraction of pods that finish (and free GPUs) per hour
    pools: tuple[str, ...] = ()  # empty: every pool


class StageSpec(Strict):
    method: str = OURS
    period_s: float = Field(default=0.0, ge=0)
    config: dict[str, Any] = Field(default_factory=dict)


class PoliciesSpec(Strict):
    """Per stage: a method name (``wattplane``, a baseline, ``off``) or ``{method, period_s, config}``."""

    forecast: StageSpec = StageSpec()
    routing: StageSpec = StageSpec()
    placement: StageSpec = StageSpec()
    moe: StageSpec = StageSpec()
    power: StageSpec = StageSpec()
    rescheduling: StageSpec = StageSpec()

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # YAML 1.1 reads a bare ``off`` as false (and ``on`` as true)
            named = {k: (OFF if v is False else OURS if v is True else v) for k, v in data.items()}
            return {k: ({"method": v} if isinstance(v, str) else v) for k, v in named.items()}
        return data

    def pipeline(self) -> PipelineConfig:
        return PipelineConfig(stages={
            s: StageSetting(method=getattr(self, s.value).method, period_s=getattr(self, s.value).period_s,
                            config=getattr(self, s.value).config)
            for s in STAGE_ORDER
        })


class NodeListSpec(Strict):
    """A real node list as the fleet: an Alibaba ``openb_node_list_*.csv`` (read in place, never copied).

    Its GPU nodes become pools, one per GPU model, named after the model in lower case (``g3``,
    ``t4``); a model whose nodes come in several sizes gets one pool per size (``v100m16-4gpu``), since
    a pool's nodes have one shape. CPU-only nodes are left out. Resolved by
    :func:`wattplane.simulate.nodelist.with_node_list` before a run.
    """

    path: str  # absolute, beside the scenario file, or ``data:alibaba-gpu-2023/...`` under --data-dir
    models: tuple[str, ...] = ()  # keep only these GPU models (empty: all)
    max_nodes_per_pool: int | None = Field(default=None, gt=0)  # first N nodes of each pool, in file order
    cost_per_device_hour: dict[str, float] = Field(default_factory=dict)  # by model; key "default" for the rest
    power_domain: str | None = None  # every generated pool in this domain

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data


class FaultSpec(Strict):
    at_s: float = Field(ge=0)
    node: str
    kind: Literal["fail", "recover"] = "fail"


class Scenario(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    duration_s: float = Field(gt=0, le=MAX_DURATION_S)
    step_s: float = Field(default=1.0, ge=0.01)
    control_period_s: float = Field(default=30.0, gt=0)
    replica_startup_s: float = Field(default=60.0, ge=0)
    seed: int = 0
    pools: tuple[PoolSpec, ...] = ()
    nodes: NodeListSpec | None = None  # a real node list whose GPU models become pools (with or instead of pools)
    power_domains: tuple[PowerDomainSpec, ...] = ()
    deployments: tuple[DeploymentSpec, ...] = Field(min_length=1)
    load: LoadSpec
    moe_load: MoELoadSpec = MoELoadSpec()
    background: BackgroundPods = BackgroundPods()
    policies: PoliciesSpec = PoliciesSpec()
    compare: dict[str, PoliciesSpec] = Field(default_factory=dict)  # extra named policy sets
    faults: tuple[FaultSpec, ...] = ()
    agent_guard: bool = True  # emulate the node agents' local power guard when a power stage runs

    @model_validator(mode="before")
    @classmethod
    def _pods_shorthand(cls, data: Any) -> Any:
        """``pods: FILE`` is short for ``background: {pods_csv: FILE}`` (the Alibaba pod list)."""
        if not isinstance(data, dict) or "pods" not in data:
            return data
        data = dict(data)
        pods = data.pop("pods")
        background = dict(data.get("background") or {})
        if background.get("pods_csv") not in (None, pods):
            raise ValueError("give the pod list once: pods or background.pods_csv")
        background["pods_csv"] = pods
        data["background"] = background
        return data

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        pools = {p.name for p in self.pools}
        domains = {d.name for d in self.power_domains}
        deployments = {d.name for d in self.deployments}
        errors = []
        if not self.pools and self.nodes is None:
            errors.append("give pools, nodes (a node list file) or both")
        if self.nodes is not None and self.nodes.power_domain is not None and self.nodes.power_domain not in domains:
            errors.append(f"nodes: unknown power_domain {self.nodes.power_domain!r}")
        if self.nodes is not None:
            pools = _AnyPool(pools)  # pool names come from the file: checked once it is read
        if len(pools) != len(self.pools):
            errors.append("duplicate pool names")
        if len(deployments) != len(self.deployments):
            errors.append("duplicate deployment names")
        for p in self.pools:
            if p.power_domain is not None and p.power_domain not in domains:
                errors.append(f"pool {p.name}: unknown power_domain {p.power_domain!r}")
        for d in self.deployments:
            for pool in (*d.initial_replicas, *d.allowed_pools, *d.preferred_pools):
                if pool not in pools:
                    errors.append(f"deployment {d.name}: unknown pool {pool!r}")
            if d.fallback is not None and d.fallback.deployment not in deployments:
                errors.append(f"deployment {d.name}: unknown fallback {d.fallback.deployment!r}")
        for b in (self.load.synthetic or self.load.trace).bursts:  # type: ignore[union-attr]
            for name in b.deployments:
                if name not in deployments:
                    errors.append(f"burst at {b.at_s}s: unknown deployment {name!r}")
        for sp in (self.policies, *self.compare.values()):
            for s in STAGE_ORDER:
                method = getattr(sp, s.value).method
                if method not in available_methods(s):
                    errors.append(f"policies.{s.value}: unknown method {method!r} "
                                  f"(choose from {', '.join(available_methods(s))})")
        gpus = sum(p.nodes * p.gpus_per_node for p in self.pools)
        if gpus > MAX_GPUS:
            errors.append(f"pools: {gpus:,} GPUs in all; a scenario simulates at most {MAX_GPUS:,}")
        if self.duration_s / self.step_s > MAX_STEPS:
            errors.append(f"duration_s / step_s = {self.duration_s / self.step_s:,.0f} steps; at most {MAX_STEPS:,}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def policy_sets(self, compare: str | None) -> dict[str, PipelineConfig]:
        """The policy sets to run: the scenario's own (``wattplane``), plus baselines / static when asked."""
        sets = {"wattplane": self.policies.pipeline()}
        if compare in ("baselines", "all"):
            base = self.policies.pipeline()
            stages = {}
            for s in STAGE_ORDER:
                own = base.setting(s)
                stages[s] = own if own.method == OFF else own.model_copy(update={"method": BASELINES[s],
                                                                                 "config": {}})
            sets["baselines"] = PipelineConfig(stages=stages)
            sets["static"] = PipelineConfig(stages={s: StageSetting(method=OFF) for s in STAGE_ORDER})
        for name, spec in self.compare.items():
            sets[name] = spec.pipeline()
        return sets


class _AnyPool(set[str]):
    """Pool names not known yet (a node list not read): every name passes until it is."""

    def __contains__(self, item: object) -> bool:
        return True


# -- loading with line-and-field errors ----------------------------------------------------------

def load_scenario(path: str | Path) -> Scenario:
    """Parse and validate a scenario file; :class:`BadInputError` says file:line: field: problem."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise BadInputError(f"{p}: cannot read scenario: {exc.strerror}") from exc
    return parse_scenario(text, source=str(p))


def parse_scenario(text: str, source: str = "scenario") -> Scenario:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            line, problem = mark.line + 1, getattr(exc, "problem", exc)
        else:  # a reader error (a character YAML does not allow) carries a position, not a mark
            line = text[: getattr(exc, "position", 0)].count("\n") + 1
            problem = f"character {getattr(exc, 'character', '?')!r} is not allowed ({getattr(exc, 'reason', exc)})"
        raise BadInputError(f"{source}:{line}: not valid YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{source}:1: a scenario must be a mapping of fields (name, pools, deployments, load)")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        lines = []
        errors = [[x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-"))] for e in exc.errors()]
        # an error on a list that only echoes its item's error (pydantic's "too short after validation") is noise
        keep = [e for e, loc in zip(exc.errors(), errors, strict=True)
                if not any(len(o) > len(loc) and o[: len(loc)] == loc for o in errors)]
        for err in keep[:8]:
            loc = [x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-"))]
            field = _field_path(loc)
            line = _line_of(root, loc)
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{source}:{line}: {field}: {msg}" if field else f"{source}:{line}: {msg}")
        more = len(keep) - 8
        if more > 0:
            lines.append(f"... and {more} more")
        raise BadInputError("\n".join(lines)) from exc


def _field_path(loc: list[Any]) -> str:
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        else:
            out += f".{x}" if out else str(x)
    return out


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int:
    """1-based line of the deepest YAML node on ``loc`` that exists (the parent for a missing field)."""
    if node is None:
        return 1
    line = node.start_mark.line + 1
    for key in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    child = v
                    line = k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


__all__ = [
    "MODEL_CATALOGUE", "BackgroundPods", "Burst", "DeploymentSpec", "LoadSpec", "MoELoadSpec", "NodeListSpec",
    "PoliciesSpec",
    "PoolSpec", "PowerDomainSpec", "Scenario", "Stage", "SyntheticLoad", "TraceLoad", "load_scenario",
    "parse_scenario",
]
