"""Power oversubscription: choose a power cap per GPU that keeps each power domain under budget.

Per PowerDomain, from the latest per-GPU telemetry (draw, current limit, priority of what runs on
it), pick one discrete cap level per GPU so that predicted domain power stays at or below ``budget
* (1 - safety_margin)`` minus a volatility allowance, minimising weighted slowdown (best-effort
GPUs are cheap to cap, latency-critical ones very expensive): a cap's throughput loss (the phase
power model's concave speed-vs-cap curve) amplified by queueing on busy GPUs, plus a fixed cost per
capped GPU so that few GPUs carry the caps. The structure is a multiple-choice knapsack: each GPU
picks one option (uncapped or a level); options cost slowdown and save watts. Its LP relaxation is
solved exactly by a greedy over each GPU's convex hull of (watts saved, cost) — that gives both a
feasible integer plan and a lower bound; CP-SAT (hinted with the greedy plan, time-limited)
polishes only when the gap is worth it and the domain is small enough for model building to fit the
cycle (large domains have small rounding gaps: <= 1.5% measured at 1,000 GPUs). Options and the greedy
are computed for a whole domain at once with numpy (:class:`OptionTable`), element by element the
same arithmetic as the scalar :func:`options_for` / :func:`solve_greedy` (tests hold them equal), so
a 10,000-GPU fleet costs a few hundred ms of CPU per cycle instead of ~1 s. Releasing caps uses
hysteresis: caps are raised only while the prediction stays a further ``release_hysteresis`` of the
budget below the target, and only after a cap has been held ``min_hold_s``. The per-GPU demand
estimate and the domain's volatility live in :class:`PowerState`, threaded through ``Plan.state``.

Phases: when the engine reports the prompt-phase share of the interval (``prefill_fraction``), a
GPU's draw splits into prompt passes (~TDP) and a token phase; a cap between the two clips only
the prompt bursts — cheap power, little latency — and the policy can see that. Without the share,
the whole draw is treated as token phase (caps then save only below the average draw).

Hidden demand: a GPU pinned at its cap hides its true demand, so the state keeps
a smoothed unpinned token-phase draw; an unknown pinned GPU is assumed to want its maximum power.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
from ortools.sat.python import cp_model
from pydantic import Field

from policies.plan import Explanation, Plan, PolicyName, Reason, SetPowerCap, SolverStatus
from policies.power_model import (
    CAP_SPEED_EXPONENT,
    PROMPT_POWER_FRACTION,
    clock_for_cap,
    legal_cap_w,
    load_from_power,
    mix_power_w,
    mix_speed,
)
from policies.snapshot import AcceleratorSpec, Fraction, Frozen, NonNegFloat, PowerDomain, PriorityClass, Snapshot

Clock = Callable[[], float]

# Integer scales for CP-SAT (it only takes integers): watts x10, cost x1e5.
_WATT_SCALE = 10
_COST_SCALE = 100_000


class PowerConfig(Frozen):
    """Tunables of the power policy; defaults are what the benchmark measured."""

    cap_fractions: tuple[Fraction, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # levels, x TDP (clamped legal)
    weight_best_effort: NonNegFloat = 1.0  # cost of losing all of a best-effort GPU's throughput
    weight_standard: NonNegFloat = 10.0
    weight_latency_critical: NonNegFloat = 1000.0
    queue_aware: bool = True  # weigh a cap's slowdown by how close the GPU runs to saturation
    max_load: Fraction = 0.9  # loads above this read as this (keeps the queueing factor finite)
    max_penalty: NonNegFloat = 20.0  # cost of a cap that slows a GPU below its load (its queue grows)
    cap_cost: NonNegFloat = 0.2  # per capped GPU: prefer fewer, deeper caps (fewer commands, fewer GPUs hurt)
    change_cost: NonNegFloat = 0.005  # per changed GPU: against churn between cycles
    release_hysteresis: Fraction = 0.01  # x budget: raise caps only this far below the target
    min_hold_s: NonNegFloat = 5.0  # a cap stays at least this long before it is raised
    volatility_k: NonNegFloat = 2.0  # allowance = k x EWMA of the domain's upward swings per cycle
    volatility_alpha: Fraction = 0.1  # EWMA weight of the newest swing
    recent_max_rise: bool = False  # also keep room for the largest rise of the last ``history`` cycles (opt-in)
    burst_room: bool = False  # volatility and room from rises of predicted *demand*, not draw (see allowance)
    history: int = Field(default=60, ge=1)  # draws kept in state for the status percentiles
    demand_alpha: Fraction = 0.3  # EWMA weight of the newest unpinned draw in a GPU's remembered demand
    pinned_tolerance: Fraction = 0.03  # a reading within this share of its limit is "pinned at the cap"
    frequency_lock: bool = False  # also send the SM clock that realises the cap (POLCA's lever)
    time_limit_s: NonNegFloat = 0.02  # CP-SAT deterministic-time limit per domain (its work units, ~s of one core)
    wall_limit_s: NonNegFloat = 0.15  # wall-clock backstop for a starved machine (may then break determinism)
    polish_gap: NonNegFloat = 0.01  # run CP-SAT only when the greedy's relative gap exceeds this
    polish_max_gpus: int = Field(default=256, ge=0)  # and only on domains this small (build + solve fit a cycle)
    use_solver: bool = True


class GPUMemory(Frozen):
    """What the policy remembers about one GPU between cycles."""

    demand_w: NonNegFloat  # EWMA of the token-phase draw seen while not pinned at a cap (its uncapped demand)
    capped_since: float | None = None  # snapshot.now when the current cap was first set


class DomainMemory(Frozen):
    last_draw_w: NonNegFloat | None = None
    swing_w: NonNegFloat = 0.0  # EWMA of upward changes of domain draw per cycle
    last_now: float | None = None
    over_budget_s: NonNegFloat = 0.0  # accumulated seconds with measured draw above budget
    recent_draw_w: tuple[NonNegFloat, ...] = ()  # last draws, newest last (for status p50/p99)
    recent_demand_w: tuple[NonNegFloat, ...] = ()  # last predicted uncapped draws, newest last (burst room)


class PowerState(Frozen):
    """Persisted between cycles (in PowerDomain status); keys are ``node/index``."""

    gpus: dict[str, GPUMemory] = Field(default_factory=dict)
    domains: dict[str, DomainMemory] = Field(default_factory=dict)


@dataclass(frozen=True)
class GPUView:
    """One GPU as the solver sees it."""

    key: str
    node: str
    index: int
    spec: AcceleratorSpec
    priority: PriorityClass
    reading_w: float
    current_cap_w: float | None  # None: uncapped (no limit, or limit at max)
    token_w: float  # predicted token-phase draw if uncapped next cycle (the whole draw when phases are unknown)
    pinned: bool  # the token phase reads at the cap: its demand is hidden
    prefill: float = 0.0  # share of time in prompt passes (0 when unknown)
    prompt_w: float = 0.0  # prompt-phase draw if uncapped

    @property
    def demand_w(self) -> float:
        """Predicted average draw if uncapped."""
        return mix_power_w(self.prefill, self.prompt_w, self.token_w)

    @property
    def peak_w(self) -> float:
        """The highest phase draw: caps at or above it change nothing."""
        return max(self.token_w, self.prompt_w if self.prefill > 0 else 0.0)

    def power_at(self, cap: float | None) -> float:
        return mix_power_w(self.prefill, self.prompt_w, self.token_w, cap)

    def speed_at(self, cap: float | None) -> float:
        return mix_speed(self.prefill, self.prompt_w, self.token_w, cap)

    @property
    def load(self) -> float:
        """Busy-ness 0..1: prompt time plus the token phase's load read off its draw."""
        return self.prefill + (1 - self.prefill) * load_from_power(self.spec, self.token_w)


@dataclass(frozen=True)
class Option:
    cap_w: float | None
    power_w: float
    cost: float


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # option index per GPU
    objective: float
    bound: float
    feasible: bool
    status: SolverStatus
    solve_ms: float


@dataclass(frozen=True)
class DomainResult:
    domain: PowerDomain
    gpus: tuple[GPUView, ...]
    caps: tuple[float | None, ...]
    solution: Solution
    mode: str  # "tighten", "release" or "hold"
    measured_w: float
    fixed_w: float  # draw the policy cannot control (GPUs without telemetry/spec), assumed at max
    predicted_w: float
    target_w: float
    memory: DomainMemory


def plan_power(
    snapshot: Snapshot, config: PowerConfig, state: PowerState, clock: Clock | None = None
) -> Plan:
    """Caps for every power domain; GPUs outside any domain are left alone."""
    start = clock() if clock else None
    results = [_plan_domain(snapshot, d, config, state) for d in snapshot.power_domains]
    new_state = next_state_json(snapshot, state, results, config)
    actions = [a for r in results for a in _actions(r, config)]
    solve_ms = sum(r.solution.solve_ms for r in results)
    if clock and start is not None:
        solve_ms = (clock() - start) * 1000.0
    return Plan(
        policy=PolicyName.POWER,
        actions=tuple(actions),
        explanation=_explain(results, actions, solve_ms),
        state=new_state,
    )


# -- the domain view --------------------------------------------------------------------------


def domain_gpus(
    snapshot: Snapshot, domain: PowerDomain, state: PowerState, pinned_tolerance: float = 0.03
) -> tuple[tuple[GPUView, ...], float]:
    """The controllable GPUs of a domain, and the draw of its GPUs the policy cannot control."""
    members = set(domain.nodes) | {n.name for n in snapshot.nodes if n.power_domain == domain.name}
    pools = {p.name: p for p in snapshot.pools}
    specs = {n.name: pools[n.pool].accelerator for n in snapshot.nodes if n.pool in pools}
    deployments = {d.name: d for d in snapshot.deployments}
    placed = workload_priorities(snapshot, members)
    seen: set[tuple[str, int]] = set()
    views: list[GPUView] = []
    fixed = 0.0
    mine = [t for t in snapshot.gpu_telemetry if t.node in members]  # filter first: sort only this domain's
    for t in sorted(mine, key=lambda t: (t.node, t.index)):
        seen.add((t.node, t.index))
        spec = specs.get(t.node)
        if spec is None:
            fixed += t.power_w
            continue
        key = f"{t.node}/{t.index}"
        cap = legal_cap_w(spec, t.power_limit_w)
        current = cap if cap is not None and cap < spec.max_power_w - 1e-6 else None
        memory = state.gpus.get(key)
        prefill = t.prefill_fraction or 0.0
        prompt_w = min(PROMPT_POWER_FRACTION * spec.tdp_w, spec.max_power_w)
        # Split the reading: prompt passes drew min(prompt_w, cap); the rest is the token phase.
        clipped_prompt = prompt_w if current is None else min(prompt_w, current)
        if prefill >= 1.0:
            token = memory.demand_w if memory else spec.idle_fraction * spec.tdp_w
        else:
            token = max(0.0, (t.power_w - prefill * clipped_prompt) / (1.0 - prefill))
        pinned = current is not None and token >= current * (1 - pinned_tolerance)
        # A token phase pinned at its cap hides its demand: trust the remembered draw, else assume the worst.
        if pinned:
            token = max(token, memory.demand_w if memory else spec.max_power_w)
        priority = t.priority
        if priority is None and t.deployment in deployments:
            priority = deployments[t.deployment].priority
        if priority is None:  # what the snapshot's pods say runs on this GPU (or, unambiguously, this node)
            priority = placed.get((t.node, t.index), placed.get((t.node, -1)))
        views.append(
            GPUView(key, t.node, t.index, spec, priority or PriorityClass.STANDARD, t.power_w, current,
                    min(token, spec.max_power_w), pinned, prefill, prompt_w)
        )
    for n in snapshot.nodes:  # GPUs that report nothing: assume their worst case
        if n.name in members:
            spec = specs.get(n.name)
            missing = sum(1 for i in range(n.gpus) if (n.name, i) not in seen)
            fixed += missing * (spec.max_power_w if spec else 0.0)
    return tuple(views), fixed


def workload_priorities(snapshot: Snapshot, nodes: set[str]) -> dict[tuple[str, int], PriorityClass]:
    """Priority of the work on each GPU from the snapshot's pods: ``(node, index)`` for pods that know
    their devices, ``(node, -1)`` for a node whose pods are all of one class.

    Telemetry from a live cluster does not say which workload a GPU serves (the kubelet assigns
    device indices), but the pods on a node do; a node mixing classes gets no node-wide priority.
    """
    deployments = {d.name: d for d in snapshot.deployments}
    per_gpu: dict[tuple[str, int], PriorityClass] = {}
    per_node: dict[str, set[PriorityClass]] = {}
    for pod in snapshot.pods:
        if pod.node is None or pod.node not in nodes or not pod.num_gpu:
            continue
        d = deployments.get(pod.deployment) if pod.deployment else None
        priority = d.priority if d is not None else pod.priority
        for i in pod.gpu_indices:
            per_gpu[(pod.node, i)] = priority
        per_node.setdefault(pod.node, set()).add(priority)
    for node, classes in per_node.items():
        if len(classes) == 1:
            per_gpu[(node, -1)] = next(iter(classes))
    return per_gpu


def _weight(config: PowerConfig, priority: PriorityClass) -> float:
    return {
        PriorityClass.BEST_EFFORT: config.weight_best_effort,
        PriorityClass.STANDARD: config.weight_standard,
        PriorityClass.LATENCY_CRITICAL: config.weight_latency_critical,
    }[priority]


def cap_levels(spec: AcceleratorSpec, config: PowerConfig) -> tuple[float, ...]:
    """The distinct legal cap values (W) for a device, highest first; none at or above max power."""
    levels = {round(legal_cap_w(spec, f * spec.tdp_w) or spec.max_power_w, 1) for f in config.cap_fractions}
    return tuple(sorted((c for c in levels if c < spec.max_power_w - 1e-6), reverse=True))


def options_for(
    g: GPUView, config: PowerConfig, allow_lower: bool, now: float, memory: GPUMemory | None,
    levels: tuple[float, ...] | None = None,
) -> list[Option]:
    """A GPU's choices: uncapped, each level below its demand, and its current cap.

    ``allow_lower=False`` (release mode) keeps only caps at or above the current one; a cap
    younger than ``min_hold_s`` may only go deeper, never up (hysteresis in time).
    """
    w = _weight(config, g.priority)
    rho = min(g.load, config.max_load) if config.queue_aware else 0.0

    def cost(cap: float | None) -> float:
        loss = w * slowdown_cost(g.speed_at(cap), rho, config.max_penalty, config.queue_aware)
        return loss + (config.cap_cost if cap is not None else 0.0) + (
            config.change_cost if cap != g.current_cap_w else 0.0
        )

    def power(cap: float | None) -> float:
        return g.power_at(cap)

    held = (
        g.current_cap_w is not None
        and memory is not None
        and memory.capped_since is not None
        and now - memory.capped_since < config.min_hold_s
    )
    caps: list[float | None] = [None]
    caps += [c for c in (levels if levels is not None else cap_levels(g.spec, config)) if c < g.peak_w]
    if g.current_cap_w is not None and g.current_cap_w not in caps:
        caps.append(g.current_cap_w)
    if not allow_lower:
        floor = g.current_cap_w
        caps = [c for c in caps if c is None or (floor is not None and c >= floor)]
    if held and g.current_cap_w is not None:
        caps = [c for c in caps if c is not None and c <= g.current_cap_w]
    return [Option(c, power(c), cost(c)) for c in caps]


def slowdown_cost(speed: float, load: float, max_penalty: float, queue_aware: bool) -> float:
    """Cost of running at ``speed`` (1 = uncapped) with ``load`` (0..1 of the GPU's capacity).

    Without queueing: the lost throughput, ``1 - speed``. With queueing (the default): the
    inflation of mean response time of a single queue, ``(1 - load) / (speed - load) - 1`` — the
    same slowdown hurts a busy GPU far more than a light one — capped at ``max_penalty`` when the
    capped GPU would fall behind its load.
    """
    if speed >= 1.0:
        return 0.0
    if not queue_aware:
        return 1.0 - speed
    if speed <= load:
        return max_penalty
    return min(max_penalty, (1.0 - load) / (speed - load) - 1.0)


# -- the same options as arrays (large domains) ------------------------------------------------


@dataclass(frozen=True)
class OptionTable:
    """Every GPU's options at once: row i = GPU i (domain order), column k = a candidate option.

    Columns follow :func:`options_for`'s order (uncapped, the levels highest first, the current cap)
    and ``valid`` marks the ones :func:`options_for` would offer, so a GPU's valid columns in order
    are exactly its option list and ties break the same way. Built with numpy because a 10,000-GPU
    fleet has ~90,000 options per cycle; the arithmetic is the scalar model's, element by element.
    """

    cap: np.ndarray  # [n, K] cap W; NaN = uncapped
    power: np.ndarray  # [n, K] predicted draw W
    cost: np.ndarray  # [n, K] weighted slowdown + cap and change costs
    valid: np.ndarray  # [n, K] bool

    def rows(self) -> list[list[Option]]:
        """The per-GPU option lists (for the CP-SAT polish and the scalar reference)."""
        out = []
        for i in range(self.cap.shape[0]):
            ks = np.flatnonzero(self.valid[i])
            out.append([Option(None if math.isnan(self.cap[i, k]) else float(self.cap[i, k]),
                               float(self.power[i, k]), float(self.cost[i, k])) for k in ks])
        return out

    def columns(self, choice: tuple[int, ...]) -> np.ndarray:
        """The column of each GPU's chosen option (``choice[i]`` counts GPU i's valid options)."""
        rank = np.cumsum(self.valid, axis=1) - 1
        hit = self.valid & (rank == np.asarray(choice, dtype=np.int64).reshape(-1, 1))
        cols: np.ndarray = np.argmax(hit, axis=1)
        return cols


def option_table(
    gpus: tuple[GPUView, ...], config: PowerConfig, allow_lower: bool, now: float,
    memory: Mapping[str, GPUMemory], levels: Mapping[AcceleratorSpec, tuple[float, ...]],
) -> OptionTable:
    """:func:`options_for` for every GPU of a domain, as arrays (see :class:`OptionTable`)."""
    n = len(gpus)
    width = 2 + max((len(v) for v in levels.values()), default=0)
    nan = math.nan
    p = np.array([min(max(g.prefill, 0.0), 1.0) for g in gpus]).reshape(n, 1)
    prompt = np.array([g.prompt_w for g in gpus]).reshape(n, 1)
    token = np.array([g.token_w for g in gpus]).reshape(n, 1)
    peak = np.array([g.peak_w for g in gpus]).reshape(n, 1)
    current = np.array([nan if g.current_cap_w is None else g.current_cap_w for g in gpus]).reshape(n, 1)
    weight = np.array([_weight(config, g.priority) for g in gpus]).reshape(n, 1)
    rho = np.array([min(g.load, config.max_load) if config.queue_aware else 0.0 for g in gpus]).reshape(n, 1)
    held = np.array([
        g.current_cap_w is not None and (m := memory.get(g.key)) is not None and m.capped_since is not None
        and now - m.capped_since < config.min_hold_s
        for g in gpus
    ], dtype=bool).reshape(n, 1)  # dtype: an empty domain must still give a boolean mask

    # Candidate caps: column 0 uncapped, then the device's levels below its peak, then the current cap.
    cap = np.full((n, width), nan)
    valid = np.zeros((n, width), dtype=bool)
    valid[:, 0] = True
    spec_ids = np.array([id(g.spec) for g in gpus], dtype=np.int64)
    by_id = {id(g.spec): g.spec for g in gpus}  # specs are shared objects (one per pool): compare by identity
    for sid, spec in by_id.items():
        lv = levels[spec]
        rows = spec_ids == sid
        if not lv:
            continue
        cap[rows, 1:1 + len(lv)] = lv
        valid[rows, 1:1 + len(lv)] = np.array(lv)[None, :] < peak[rows]
    has_current = ~np.isnan(current[:, 0])
    listed = (valid[:, 1:-1] & (cap[:, 1:-1] == current)).any(axis=1)
    extra = has_current & ~listed
    cap[extra, -1] = current[extra, 0]
    valid[extra, -1] = True
    capped = ~np.isnan(cap)
    with np.errstate(invalid="ignore"):
        if not allow_lower:  # release mode: only caps at or above the current one, or uncapped
            valid &= ~capped | (has_current[:, None] & (cap >= current))
        # a cap younger than min_hold_s may only go deeper, never up (hysteresis in time)
        valid &= ~held | (capped & (cap <= current))

    # Predicted draw: each phase clipped at the cap (mix_power_w).
    clipped_prompt = np.where(capped, np.minimum(prompt, cap), prompt)
    clipped_token = np.where(capped, np.minimum(token, cap), token)
    power = p * clipped_prompt + (1 - p) * clipped_token

    # Speed: each phase slowed by phase_speed, times stretched by their shares (mix_speed).
    with np.errstate(divide="ignore", invalid="ignore"):
        s_prompt = _phase_speeds(prompt, cap, capped)
        s_token = _phase_speeds(token, cap, capped)
        speed = 1.0 / (p / s_prompt + (1 - p) / s_token)
        if config.queue_aware:  # slowdown_cost
            queued = np.minimum(config.max_penalty, (1.0 - rho) / (speed - rho) - 1.0)
            slow = np.where(speed >= 1.0, 0.0, np.where(speed <= rho, config.max_penalty, queued))
        else:
            slow = np.where(speed >= 1.0, 0.0, 1.0 - speed)
    same = (capped & (cap == current)) | (~capped & ~has_current[:, None])
    cost = weight * slow + np.where(capped, config.cap_cost, 0.0) + np.where(same, 0.0, config.change_cost)
    return OptionTable(cap=cap, power=power, cost=cost, valid=valid)


def _phase_speeds(demand: np.ndarray, cap: np.ndarray, capped: np.ndarray) -> np.ndarray:
    """:func:`policies.power_model.phase_speed` element-wise; the powers with Python's ``**``.

    numpy's vectorised ``pow`` differs from the C library's in the last bit for ~5% of inputs;
    computing each distinct ratio once with Python keeps plans bit-identical to the scalar model
    (same snapshot, same plan, whichever code path ran). Prompt ratios repeat (discrete levels over
    one TDP), so the distinct ones are few.
    """
    slowed = capped & (demand > cap) & (demand > 0)
    out = np.ones(cap.shape)
    if slowed.any():
        ratio = (np.broadcast_to(cap, out.shape)[slowed] / np.broadcast_to(demand, out.shape)[slowed])
        distinct, inverse = np.unique(ratio, return_inverse=True)
        powered = np.array([x**CAP_SPEED_EXPONENT for x in distinct.tolist()])
        out[slowed] = powered[inverse]
    return out


def solve_greedy_table(table: OptionTable, capacity_w: float) -> Solution:
    """:func:`solve_greedy` on an :class:`OptionTable`: the same plan and bound, hulls built for all GPUs at once.

    Each GPU's lower convex hull of (watts saved, added cost) is wrapped in at most K vectorised
    rounds (every round takes, per GPU, the next point of least slope, ties to the larger saving);
    the global walk over the steps sorted by slope is the scalar one.
    """
    valid, power, cost = table.valid, table.power, table.cost
    n = valid.shape[0]
    rank = np.cumsum(valid, axis=1) - 1  # column -> option index in the GPU's list
    inf = math.inf
    # Start: the cheapest option, ties to the higher draw, then the first.
    c = np.where(valid, cost, inf)
    best = c == c.min(axis=1, keepdims=True)
    pw = np.where(best, power, -inf)
    start = np.argmax(best & (pw == pw.max(axis=1, keepdims=True)), axis=1)
    rows = np.arange(n)
    start_power, start_cost = power[rows, start], cost[rows, start]
    total_power = sum(start_power.tolist())
    objective = sum(start_cost.tolist())
    need = total_power - capacity_w
    if need <= 1e-9:
        return Solution(tuple(rank[rows, start].tolist()), objective, objective, True, SolverStatus.OPTIMAL, 0.0)
    saved = start_power[:, None] - power  # [n, K]
    added = cost - start_cost[:, None]
    alive = valid & (power < start_power[:, None])
    at_s, at_c = np.zeros(n), np.zeros(n)
    slopes, gpus, options, dss, dcs = [], [], [], [], []
    while alive.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(alive, (added - at_c[:, None]) / (saved - at_s[:, None]), inf)
        least = slope == slope.min(axis=1, keepdims=True)
        far = np.where(least & alive, saved, -inf)
        pick = np.argmax(least & alive & (far == far.max(axis=1, keepdims=True)), axis=1)
        live = alive.any(axis=1)
        idx = rows[live]
        k = pick[live]
        ds = saved[idx, k] - at_s[idx]
        dc = added[idx, k] - at_c[idx]
        slopes.append(dc / ds)
        gpus.append(idx)
        options.append(k)
        dss.append(ds)
        dcs.append(dc)
        at_s[idx], at_c[idx] = saved[idx, k], added[idx, k]
        alive &= saved > at_s[:, None] + 1e-9
    if not slopes:  # nobody can save anything
        return Solution(tuple(rank[rows, start].tolist()), objective, objective, False, SolverStatus.INFEASIBLE, 0.0)
    slope_all, gpu_all = np.concatenate(slopes), np.concatenate(gpus)
    option_all, ds_all, dc_all = np.concatenate(options), np.concatenate(dss), np.concatenate(dcs)
    order = np.lexsort((-ds_all, gpu_all, slope_all))
    bound = objective
    position = start.copy()
    for j in order.tolist():
        i, k, s_, a_ = int(gpu_all[j]), int(option_all[j]), float(ds_all[j]), float(dc_all[j])
        bound += a_ * min(1.0, need / s_)
        objective += a_
        position[i] = k
        need -= s_
        if need <= 1e-9:
            return Solution(tuple(rank[rows, position].tolist()), objective, bound, True, SolverStatus.HEURISTIC, 0.0)
    return Solution(tuple(rank[rows, position].tolist()), objective, bound, False, SolverStatus.INFEASIBLE, 0.0)


# -- model / solve -----------------------------------------------------------------------------


def solve_greedy(options: list[list[Option]], capacity_w: float) -> Solution:
    """Exact LP relaxation of the multiple-choice knapsack by convex-hull greedy, rounded up.

    Start every GPU at its cheapest option; while predicted power exceeds ``capacity_w``, take the
    hull step with the lowest added cost per watt saved. Stopping after the step that reaches the
    target gives a feasible plan; counting only the needed fraction of that last step gives the LP
    bound (no integer plan is cheaper).
    """
    choice = [min(range(len(opts)), key=lambda k: (opts[k].cost, -opts[k].power_w)) for opts in options]
    power = sum(opts[k].power_w for opts, k in zip(options, choice, strict=True))
    objective = sum(opts[k].cost for opts, k in zip(options, choice, strict=True))
    need = power - capacity_w
    if need <= 1e-9:
        return Solution(tuple(choice), objective, objective, True, SolverStatus.OPTIMAL, 0.0)
    steps: list[tuple[float, int, int, float, float]] = []  # (slope, gpu, to option, watts saved, added cost)
    for i, opts in enumerate(options):
        steps += _hull_steps(i, opts, choice[i])
    steps.sort(key=lambda s: (s[0], s[1], -s[3]))
    bound = objective
    position = list(choice)
    for _slope, i, k, saved, added in steps:
        fraction = min(1.0, need / saved)
        bound += added * fraction
        objective += added
        position[i] = k
        need -= saved
        if need <= 1e-9:
            return Solution(tuple(position), objective, bound, True, SolverStatus.HEURISTIC, 0.0)
    return Solution(tuple(position), objective, bound, False, SolverStatus.INFEASIBLE, 0.0)


def _hull_steps(i: int, opts: list[Option], start: int) -> list[tuple[float, int, int, float, float]]:
    """Lower convex hull of (watts saved, added cost) from the start option, as increments."""
    base = opts[start]
    points = sorted(
        ((base.power_w - o.power_w, o.cost - base.cost, k) for k, o in enumerate(opts) if o.power_w < base.power_w),
        key=lambda p: p[0],
    )
    steps = []
    at_s, at_c = 0.0, 0.0
    while points:
        best = min(points, key=lambda p: ((p[1] - at_c) / (p[0] - at_s), -p[0]))
        ds, dc = best[0] - at_s, best[1] - at_c
        steps.append((dc / ds, i, best[2], ds, dc))
        at_s, at_c = best[0], best[1]
        points = [p for p in points if p[0] > at_s + 1e-9]
    return steps


def build_model(
    options: list[list[Option]], capacity_w: float, hint: tuple[int, ...]
) -> tuple[cp_model.CpModel, list[list[cp_model.IntVar]]]:
    """CP-SAT: one option per GPU, predicted power within capacity, minimum total cost."""
    model = cp_model.CpModel()
    # pick[i][k] = 1 if GPU i (in domain order) takes option k (uncapped or a cap level)
    pick = [[model.new_bool_var(f"pick[{i},{k}]") for k in range(len(opts))] for i, opts in enumerate(options)]
    # Each GPU takes exactly one option.
    for row in pick:
        model.add_exactly_one(row)
    # Predicted domain power stays within capacity (watts rounded up, so the integer model is safe).
    model.add(
        sum(math.ceil(o.power_w * _WATT_SCALE) * v for opts, row in zip(options, pick, strict=True)
            for o, v in zip(opts, row, strict=True))
        <= math.floor(capacity_w * _WATT_SCALE)
    )
    model.minimize(
        sum(round(o.cost * _COST_SCALE) * v for opts, row in zip(options, pick, strict=True)
            for o, v in zip(opts, row, strict=True))
    )
    for row, k in zip(pick, hint, strict=True):
        for j, v in enumerate(row):
            model.add_hint(v, j == k)
    return model, pick


def solve(
    options: list[list[Option]], capacity_w: float, config: PowerConfig
) -> Solution:
    """Greedy LP first; CP-SAT polish when the gap is worth it and solver time is allowed."""
    greedy = solve_greedy(options, capacity_w)
    if not _worth_polishing(greedy, len(options), config):
        return greedy
    return polish(options, capacity_w, config, greedy)


def solve_table(table: OptionTable, capacity_w: float, config: PowerConfig) -> Solution:
    """:func:`solve` on an :class:`OptionTable` (option lists are built only for a polish)."""
    greedy = solve_greedy_table(table, capacity_w)
    if not _worth_polishing(greedy, table.cap.shape[0], config):
        return greedy
    return polish(table.rows(), capacity_w, config, greedy)


def _worth_polishing(greedy: Solution, gpus: int, config: PowerConfig) -> bool:
    if not greedy.feasible or not config.use_solver or config.time_limit_s <= 0:
        return False
    return _gap(greedy.objective, greedy.bound) > config.polish_gap and gpus <= config.polish_max_gpus


def polish(options: list[list[Option]], capacity_w: float, config: PowerConfig, greedy: Solution) -> Solution:
    """CP-SAT from the greedy plan (hinted), time-limited; the greedy plan stands when CP-SAT does not beat it."""
    # Only GPUs with a real choice enter the model; the rest keep their only option.
    free = [i for i, opts in enumerate(options) if len(opts) > 1]
    fixed_w = sum(options[i][0].power_w for i, opts in enumerate(options) if len(opts) == 1)
    fixed_cost = sum(options[i][0].cost for i, opts in enumerate(options) if len(opts) == 1)
    sub = [options[i] for i in free]
    model, pick = build_model(sub, capacity_w - fixed_w, tuple(greedy.choice[i] for i in free))
    solver = cp_model.CpSolver()
    # Same input -> same plan: the binding limit is CP-SAT's deterministic time (work units, ~seconds on
    # one core), not wall time; the wall limit is only a backstop for a starved machine.
    solver.parameters.max_deterministic_time = config.time_limit_s
    solver.parameters.max_time_in_seconds = config.wall_limit_s
    solver.parameters.num_workers = 1
    status = solver.solve(model)
    solve_ms = solver.wall_time * 1000.0
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return Solution(greedy.choice, greedy.objective, greedy.bound, True, SolverStatus.HEURISTIC, solve_ms)
    choice = list(greedy.choice)
    for i, row in zip(free, pick, strict=True):
        choice[i] = next(k for k, v in enumerate(row) if solver.boolean_value(v))
    objective = fixed_cost + sum(options[i][choice[i]].cost for i in free)
    if objective > greedy.objective:
        return Solution(greedy.choice, greedy.objective, greedy.bound, True, SolverStatus.HEURISTIC, solve_ms)
    bound = max(greedy.bound, fixed_cost + solver.best_objective_bound / _COST_SCALE)
    named = SolverStatus.OPTIMAL if status == cp_model.OPTIMAL else SolverStatus.FEASIBLE
    return Solution(tuple(choice), objective, min(bound, objective), True, named, solve_ms)


def _gap(objective: float, bound: float) -> float:
    return abs(objective - bound) / max(abs(objective), 1e-9)


# -- per domain --------------------------------------------------------------------------------


def _plan_domain(snapshot: Snapshot, domain: PowerDomain, config: PowerConfig, state: PowerState) -> DomainResult:
    gpus, fixed_w = domain_gpus(snapshot, domain, state, config.pinned_tolerance)
    memory = _domain_memory(snapshot, domain, state, gpus, fixed_w, config)
    target = domain.budget_w * (1 - domain.safety_margin) - volatility_allowance(memory, config)
    current = tuple(g.current_cap_w for g in gpus)
    measured = fixed_w + sum(g.reading_w for g in gpus)
    predicted_now = fixed_w + sum(_predict(g, g.current_cap_w) for g in gpus)
    if predicted_now > target:
        mode, capacity, allow_lower = "tighten", target - fixed_w, True
    else:
        mode, capacity, allow_lower = "release", target - config.release_hysteresis * domain.budget_w - fixed_w, False
    levels = {spec: cap_levels(spec, config) for spec in {g.spec for g in gpus}}  # once per distinct device
    table = option_table(gpus, config, allow_lower, snapshot.now, state.gpus, levels)
    solution = solve_table(table, capacity, config)
    if mode == "release" and not solution.feasible:
        # Not enough room to raise anything without losing the hysteresis band: keep every cap.
        mode = "hold"
        caps = current
        solution = Solution(solution.choice, 0.0, 0.0, True, SolverStatus.NOT_RUN, solution.solve_ms)
    elif not solution.feasible:
        # Even every option's deepest cap misses the target: apply the deepest caps (a named fallback).
        deepest = np.where(table.valid & ~np.isnan(table.cap), table.cap, math.inf).min(axis=1, initial=math.inf)
        caps = tuple(g.current_cap_w if math.isinf(c) else float(c) for c, g in zip(deepest.tolist(), gpus,
                                                                                      strict=True))
    else:
        cols = table.columns(solution.choice)
        rows = np.arange(len(gpus))
        caps = tuple(None if math.isnan(c) else c for c in table.cap[rows, cols].tolist())
        predicted = fixed_w + sum(table.power[rows, cols].tolist())  # the same numbers _predict gives
        return DomainResult(domain, gpus, caps, solution, mode, measured, fixed_w, predicted, target, memory)
    predicted = fixed_w + sum(_predict(g, c) for g, c in zip(gpus, caps, strict=True))
    return DomainResult(domain, gpus, caps, solution, mode, measured, fixed_w, predicted, target, memory)


def volatility_allowance(memory: DomainMemory, config: PowerConfig) -> float:
    """Watts kept free for the next cycle's rise: k x the typical rise, or the largest recent one.

    The EWMA covers steady jitter; the recent maximum (``config.history`` cycles, opt-in) covers
    bursts that hit many servers at once, which a 1 s loop can only absorb if it left room before
    them — at a price in caps and latency (see docs/benchmarks.md, power, aligned case).
    """
    typical = config.volatility_k * memory.swing_w
    largest = 0.0
    if config.recent_max_rise:
        largest = max((b - a for a, b in pairwise(memory.recent_draw_w)), default=0.0)
    if config.burst_room:
        # Rises of predicted uncapped demand, not of measured draw: a brake or a cap being lifted
        # raises the draw without any new demand, and room kept for that only caps more after brakes.
        largest = max(largest, max((b - a for a, b in pairwise(memory.recent_demand_w)), default=0.0))
    return max(typical, largest)


def _predict(g: GPUView, cap: float | None) -> float:
    return g.power_at(cap)


def _domain_memory(
    snapshot: Snapshot, domain: PowerDomain, state: PowerState, gpus: tuple[GPUView, ...], fixed_w: float,
    config: PowerConfig,
) -> DomainMemory:
    """Update the volatility estimate and the over-budget clock from this cycle's measured draw."""
    old = state.domains.get(domain.name, DomainMemory())
    draw = fixed_w + sum(g.reading_w for g in gpus)
    swing = old.swing_w
    demands: tuple[float, ...] = ()
    if config.burst_room:  # volatility of predicted demand: a brake or cap lifting is not a swing
        demand = fixed_w + sum(g.demand_w for g in gpus)
        if old.recent_demand_w:
            rise = max(0.0, demand - old.recent_demand_w[-1])
            swing = (1 - config.volatility_alpha) * swing + config.volatility_alpha * rise
        demands = (*old.recent_demand_w, demand)[-config.history:]
    elif old.last_draw_w is not None:
        rise = max(0.0, draw - old.last_draw_w)
        swing = (1 - config.volatility_alpha) * swing + config.volatility_alpha * rise
    over = old.over_budget_s
    if draw > domain.budget_w and old.last_now is not None:
        over += max(0.0, snapshot.now - old.last_now)
    recent = (*old.recent_draw_w, draw)[-config.history:]
    return DomainMemory(last_draw_w=draw, swing_w=swing, last_now=snapshot.now, over_budget_s=over,
                        recent_draw_w=recent, recent_demand_w=demands)


def next_state_json(
    snapshot: Snapshot, state: PowerState, results: list[DomainResult], config: PowerConfig
) -> dict[str, Any]:
    """The next :class:`PowerState` in its JSON form (what ``PowerState.model_dump(mode="json")`` gives).

    Written directly: at 10,000 GPUs, building and serialising 10,000 pydantic models cost more than
    the rest of a release cycle; the test suite checks the dict validates back to the same state.
    """
    gpus: dict[str, dict[str, float | None]] = {}
    for r in results:
        for g, cap in zip(r.gpus, r.caps, strict=True):
            old = state.gpus.get(g.key)
            since = None
            if cap is not None:
                same = g.current_cap_w is not None and old is not None and old.capped_since is not None
                since = old.capped_since if same and old is not None else snapshot.now
            if g.pinned:
                demand = max(g.token_w, old.demand_w if old else 0.0)
            else:  # smoothed, so one high second does not stick to a GPU that then gets capped
                demand = g.token_w if old is None else (
                    config.demand_alpha * g.token_w + (1 - config.demand_alpha) * old.demand_w)
            gpus[g.key] = {"demand_w": demand, "capped_since": since}
    domains = {r.domain.name: r.memory.model_dump(mode="json") for r in results}
    return {"gpus": gpus, "domains": domains}


# -- to plan -----------------------------------------------------------------------------------


def _actions(r: DomainResult, config: PowerConfig) -> list[SetPowerCap]:
    """A command for every GPU whose cap changes; ``None`` limits clear a cap."""
    out = []
    for g, cap in zip(r.gpus, r.caps, strict=True):
        if cap == g.current_cap_w:
            continue
        clock = clock_for_cap(g.spec, cap) if (config.frequency_lock and cap is not None) else None
        out.append(SetPowerCap(node=g.node, gpu=g.index, power_limit_w=cap, clock_limit_mhz=clock,
                               priority=g.priority))
    return out


def domain_metrics(r: DomainResult) -> dict[str, float]:
    """What a PowerDomain status needs from one cycle (the controller adds p50/p99 over time)."""
    capped = [(g, c) for g, c in zip(r.gpus, r.caps, strict=True) if c is not None]
    return {
        "budget_w": r.domain.budget_w,
        "measured_w": round(r.measured_w, 1),
        "predicted_w": round(r.predicted_w, 1),
        "target_w": round(r.target_w, 1),
        "headroom_w": round(r.domain.budget_w - r.measured_w, 1),
        "draw_p50_w": round(_percentile(r.memory.recent_draw_w, 0.50), 1),
        "draw_p99_w": round(_percentile(r.memory.recent_draw_w, 0.99), 1),
        "caps_applied": float(len(capped)),
        "caps_best_effort": float(sum(1 for g, _ in capped if g.priority is PriorityClass.BEST_EFFORT)),
        "caps_latency_critical": float(sum(1 for g, _ in capped if g.priority is PriorityClass.LATENCY_CRITICAL)),
        "over_budget_s": round(r.memory.over_budget_s, 3),
        "swing_w": round(r.memory.swing_w, 1),
    }


def _percentile(values: tuple[float, ...], q: float) -> float:
    """Nearest-rank percentile (0 for no values); enough for a status line."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _explain(results: list[DomainResult], actions: list[SetPowerCap], solve_ms: float) -> Explanation:
    if not results:
        return Explanation(reason=Reason.NO_CHANGE, summary="no power domains")
    metrics: dict[str, float] = {}
    for r in results:
        metrics.update({f"{r.domain.name}.{k}": v for k, v in domain_metrics(r).items()})
    statuses = [r.solution.status for r in results]
    infeasible = [r for r in results if not r.solution.feasible]
    tightening = [r for r in results if r.mode == "tighten"]
    objective = sum(r.solution.objective for r in results)
    bound = sum(r.solution.bound for r in results)
    parts = [
        f"{r.domain.name}: {r.mode}, measured {r.measured_w:.0f} W, predicted {r.predicted_w:.0f} W "
        f"<= target {r.target_w:.0f} W of {r.domain.budget_w:.0f} W, "
        f"{sum(1 for c in r.caps if c is not None)} GPUs capped"
        for r in results
    ]
    fallback = None
    if infeasible:
        reason = Reason.OVER_BUDGET
        fallback = "deepest-caps"
        parts.insert(0, "budget unreachable even at the deepest caps: deepest caps applied")
        status = SolverStatus.INFEASIBLE
    elif tightening and actions:
        reason = Reason.OVER_BUDGET
        status = _worst(statuses)
    elif actions:
        reason = Reason.UNDER_BUDGET
        status = _worst(statuses)
    else:
        reason = Reason.NO_CHANGE
        status = _worst(statuses)
    summary = f"{len(actions)} cap changes; " + "; ".join(parts)
    return Explanation(reason=reason, summary=summary, objective=objective, bound=bound, solver_status=status,
                       solve_ms=solve_ms, fallback=fallback, metrics=metrics)


def _worst(statuses: list[SolverStatus]) -> SolverStatus:
    order = [SolverStatus.INFEASIBLE, SolverStatus.UNKNOWN, SolverStatus.HEURISTIC, SolverStatus.FEASIBLE,
             SolverStatus.OPTIMAL, SolverStatus.NOT_RUN]
    return min(statuses, key=order.index) if statuses else SolverStatus.NOT_RUN


def node_shares(budget_w: float, draws: Mapping[str, float | None], peaks: Mapping[str, float],
                step_w: float = 100.0, highs: Mapping[str, float] | None = None,
                held: Collection[str] = ()) -> dict[str, float] | None:
    """Each node's share of its domain's budget for the agents' local guard, or None to keep the last ones.

    The guard is the last line of defence while the controller is away: it must stop a node from
    *rising* past its part of the budget, not take over the policy's job of choosing whom to cap.
    So the domain's headroom goes first where draw is known to swing: a node gets back up to its
    recent high (``highs``: its highest draw over the last few reports), and a node its guard is
    holding (``held``) up to its peak, since the guard hides how much it wants (as a capped GPU
    hides its demand); if the headroom is short of that, in proportion to what each wants. The
    rest goes in proportion to draw (a serving node's swings scale with what it draws), never
    past what a node could still draw (its peak): what a node near its peak cannot use goes to the
    others (:func:`fill_by_weight`). Splitting the headroom by room to rise alone gave idle nodes
    headroom they never used and held busy ones at every burst: in the simulator the guard then
    took over from the policy's priority-aware caps and SLO fell (``docs/benchmarks.md``,
    simulate). A node whose draw is unknown counts at its peak and gets no share. Over budget
    there is no headroom to share: None, the previous shares stay (their sum was within a budget)
    while the policy's priority-aware caps bring the draw down. Shares are rounded down to
    ``step_w`` so that small drifts do not resend them (a ``step_w`` of headroom per node is set
    aside first, so rounding never holds a node below its draw), and their sum never exceeds the budget.
    """
    names = list(draws)
    draw = np.array([np.nan if draws[n] is None else draws[n] for n in names], dtype=float)
    peak = np.array([peaks.get(n, np.nan) for n in names], dtype=float)
    high = np.array([(highs or {}).get(n, np.nan) for n in names], dtype=float)
    out = node_shares_array(budget_w, draw, peak, high, np.array([n in held for n in names], dtype=bool), step_w)
    if out is None:
        return None
    return {n: v for n, v in zip(names, out.tolist(), strict=True) if v == v}


def node_shares_array(budget_w: float, draw: np.ndarray, peak: np.ndarray, high: np.ndarray, held: np.ndarray,
                      step_w: float = 100.0) -> np.ndarray | None:
    """:func:`node_shares` over arrays, one entry per node of the domain (what the simulator calls
    for thousands of nodes every 2 s): ``draw`` NaN for a silent node, ``peak`` NaN when unknown (no
    room to rise; a silent node then counts at 0 W), ``high`` NaN for no recent high. Returns each
    node's share (NaN for silent nodes), or None to keep the last ones."""
    known = ~np.isnan(draw)
    total = float(draw[known].sum()) + float(np.nan_to_num(peak[~known]).sum())
    headroom = budget_w - total
    if headroom < 0 or not known.any():
        return None
    d = draw[known]
    # what rounding down may take: set aside first, so that no node's share falls below its draw
    reserve = min(step_w, headroom / len(d))
    left = headroom - reserve * len(d)
    room = np.maximum(np.nan_to_num(peak[known] - d), 0.0)
    room = np.maximum(room - reserve, 0.0)
    up = np.minimum(np.maximum(np.nan_to_num(high[known] - d) - reserve, 0.0), room)
    want = np.where(held[known], room, up)
    extra = want if want.sum() <= left else fill_by_weight(left, want, want)
    rest = fill_by_weight(left - float(extra.sum()), d, room - extra)
    out = np.full(len(draw), np.nan)
    out[known] = np.floor((d + reserve + extra + rest) / step_w) * step_w
    return out


def fill_by_weight(amount: float, weights: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Split ``amount`` in proportion to ``weights``, none above its ``room`` (water-filling).

    Each entry gets ``min(room, level * weight)`` with one level for all, chosen so the parts sum to
    ``amount``; if every entry is full, the rest is split by weight alone (evenly when every weight
    is zero), so the parts always sum to ``amount``.
    """
    w = np.maximum(np.asarray(weights, dtype=float), 0.0)
    r = np.maximum(np.asarray(room, dtype=float), 0.0)
    if w.sum() <= 0:
        w = np.ones_like(w)
    amount = max(amount, 0.0)
    out: np.ndarray = np.zeros(len(w))
    pos = np.nonzero(w > 0)[0]
    order = pos[np.argsort(r[pos] / w[pos], kind="stable")]
    ro, wo = r[order], w[order]
    left = amount - np.concatenate(([0.0], np.cumsum(ro)[:-1]))  # what is left when each entry's turn comes
    w_left = np.maximum(wo.sum() - np.concatenate(([0.0], np.cumsum(wo)[:-1])), 0.0)
    # full below the level (room / weight <= left / w_left): takes its room, never more than is left
    full = (ro <= left) & (ro * w_left <= left * wo)
    k = len(order) if full.all() else int(np.argmin(full))
    out[order[:k]] = ro[:k]
    pool = order[k:] if k < len(order) else order  # every entry full: the rest by weight over all
    out[pool] += max(amount - float(out.sum()), 0.0) * w[pool] / w[pool].sum()
    return out


__all__ = [
    "DomainResult", "GPUMemory", "GPUView", "Option", "OptionTable", "PowerConfig", "PowerState", "Solution",
    "build_model", "cap_levels", "domain_gpus", "domain_metrics", "fill_by_weight", "next_state_json", "node_shares",
    "node_shares_array", "option_table", "options_for",
    "plan_power", "polish", "solve", "solve_greedy", "solve_greedy_table", "solve_table", "workload_priorities",
]
