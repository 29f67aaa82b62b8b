"""Fleet-level routing to smaller models: how much of a model's traffic its fallback takes.

Per deployment with a ``fallback``, requests fall into difficulty classes (score bands of the
learned scorer, :mod:`policies.difficulty`, with each model's measured accuracy per band). An LP
chooses the fraction of each class sent to the fallback that maximises expected quality subject to

* the large model's capacity (its replicas x profile throughput, reduced by power caps in force)
  at its target utilisation — the headroom that keeps queues, and so latency, under the SLO;
* the fallback's own capacity (its direct traffic comes first), counting the replicas placement
  can add for it on free devices (:func:`growth_capacity`: placement runs next and sizes the
  fallback for what is routed to it, so its current size alone must not cap the shift);
* the user's quality floor (expected quality relative to "large only"), which is never violated:
  when capacity and floor conflict, the floor wins and the plan says so (``QualityFloor``);
* monotonicity (an easier class goes to the fallback at least as much as a harder one), so the
  decision is one score threshold the data plane can apply per request.

Capacity shortfalls are slack variables with a large penalty, so the LP is always feasible.

Queue-aware: demand is last period's offered load, which lags a surge and hides work already
waiting. So the large model's serving telemetry adjusts the inputs (:func:`pressure`): requests
queued at the large model add the rate that drains them within ``drain_s``, and a measured TTFT
p99 above ``ttft_pressure`` x its SLO lowers the target utilisation in proportion — traffic moves
to the fallback *before* requests queue past the SLO, not after.

Hysteresis: traffic shifts to the fallback at once when the target utilisation needs it, but
shifts back only as far as a lower *release* utilisation allows (``release_margin`` below the
target), and not at all while the large model still shows a queue or a TTFT p99 above
``ttft_release`` x its SLO, so a load hovering at the edge does not flap the table. The last decision (share,
threshold, version) lives in :class:`RoutingState`; the version increments whenever the table
changes, and every cycle re-emits the current table so the executor can refresh its TTL.

Without capacity pressure a fixed threshold is already optimal (RouteLLM's setting); the gain
comes when the large pool is short of replicas or power-capped. ``plan_threshold`` is that
baseline: a fixed fallback share, blind to capacity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import ortools.linear_solver.pywraplp as pywraplp
from pydantic import Field

from policies.difficulty import CalibrationBin
from policies.plan import Explanation, Plan, PolicyName, Reason, SetRoutingShare, SolverStatus
from policies.profiles import ProfileTable, cap_throughput_factor, default_table
from policies.snapshot import Fraction, Frozen, ModelDeployment, NonNegFloat, NonNegInt, PosFloat, Snapshot

SHORTFALL_PENALTY = 1e3  # objective cost per unit of demand share above capacity (quality is in [0, 1])
LARGE_CALL_COST = 1e-4  # tie-break: at equal quality, prefer the cheaper fallback
SHARE_EPSILON = 1e-3  # share changes below this are not a new table
OPEN_EDGE = 1e9  # the outer score bands are open; thresholds at +-OPEN_EDGE route all / nothing

# Score bands of the packaged scorer on its training split (``policies/data/router_weights.json``
# ``calibration``, produced by ``wattplane/train_router.py`` seed 0; a test checks they match).
# Accuracy of gpt-4-1106-preview (large) and Mixtral-8x7B (small) per band of 10% of questions,
# measured with out-of-fold scores (so they hold on unseen questions).
DEFAULT_CLASSES: tuple[CalibrationBin, ...] = tuple(
    CalibrationBin(lower=lo, upper=hi, share=sh, quality_large=ql, quality_small=qs)
    for lo, hi, sh, ql, qs in (
        (-1e9, 0.035547, 0.1001, 0.6766, 0.6880),
        (0.035547, 0.060546, 0.1000, 0.8516, 0.7760),
        (0.060546, 0.079903, 0.1000, 0.8573, 0.7703),
        (0.079903, 0.096703, 0.1000, 0.8488, 0.7589),
        (0.096703, 0.11272, 0.1001, 0.8390, 0.7593),
        (0.11272, 0.13286, 0.1000, 0.8288, 0.7161),
        (0.13286, 0.15665, 0.1000, 0.8288, 0.6919),
        (0.15665, 0.18334, 0.1000, 0.7932, 0.6205),
        (0.18334, 0.22973, 0.1000, 0.7432, 0.5464),
        (0.22973, 1e9, 0.1001, 0.7493, 0.4345),
    )
)


class RoutingConfig(Frozen):
    classes: tuple[CalibrationBin, ...] = DEFAULT_CLASSES
    release_margin: Fraction = 0.15  # shift back only while utilisation stays below target - margin
    time_limit_s: PosFloat = 1.0
    fixed_fallback_share: Fraction | None = None  # plan_threshold only; None: the most the floor allows
    # queue-aware knobs, chosen on the bench's capacity cases (docs/benchmarks.md ## routing): a lower
    # ttft_pressure buys SLO attainment with fallback share, so it trades quality away
    drain_s: PosFloat = 15.0  # requests queued at the large model should be drained within this long
    ttft_pressure: Fraction = 0.9  # measured TTFT p99 above this x SLO lowers the target utilisation
    ttft_release: Fraction = 0.6  # shift back only while TTFT p99 is below this x SLO (and nothing queues)
    min_utilisation_factor: Fraction = 0.5  # TTFT pressure lowers the target utilisation at most to this x
    queue_release: NonNegFloat = 1.0  # requests queued at the large model above which nothing shifts back
    profiles: ProfileTable = Field(default_factory=default_table)


class RouteDecision(Frozen):
    """The routing table in force for one deployment."""

    fallback: str
    fallback_share: Fraction
    threshold: float
    expected_quality: Fraction  # relative to "large only"
    version: NonNegInt = 0


class RoutingState(Frozen):
    routes: Mapping[str, RouteDecision] = Field(default_factory=dict)


class Capacity(Frozen):
    """Output tokens/s one deployment serves at its SLO, and the demand it faces."""

    tokens_per_s: NonNegFloat  # at 100% utilisation, with power caps applied
    demand_tokens_per_s: NonNegFloat  # offered output tokens/s (before routing)
    cap_factor: Fraction = 1.0  # capacity lost to power caps (1 = none)


class Pressure(Frozen):
    """What the large model's serving telemetry says beyond offered load."""

    backlog_tokens_per_s: NonNegFloat = 0.0  # extra output tokens/s that drain its queue within drain_s
    utilisation_factor: Fraction = 1.0  # multiplies the target utilisation (1: latency within bounds)
    blocks_release: bool = False  # still queueing or slow: do not shift traffic back yet
    queue_depth: NonNegFloat = 0.0
    ttft_p99_ms: NonNegFloat = 0.0


class LPResult(Frozen):
    shares: tuple[float, ...]  # per class: fraction routed to the fallback
    status: SolverStatus
    objective: float
    solve_ms: float
    shortfall: float  # demand share above capacity (0 when capacity suffices)


# -- inputs from the snapshot -----------------------------------------------------------------

def capacity(snapshot: Snapshot, deployment: ModelDeployment, profiles: ProfileTable) -> Capacity:
    """Serving capacity from ready replicas x profile, scaled by the mean power cap of the deployment's GPUs."""
    demand = next((d for d in snapshot.demand if d.deployment == deployment.name), None)
    out_demand = demand.output_tokens_per_s if demand else 0.0
    input_share = (demand.input_tokens_per_s / demand.output_tokens_per_s) if demand and out_demand > 0 else 1.0
    total = 0.0
    uncapped = 0.0
    # replicas still starting serve nothing yet: counting them would hand a surge back to the large
    # model a minute before it can take it. A snapshot without readiness (every ``ready`` 0, e.g.
    # hand-built) counts the desired replicas.
    has_readiness = any(rs.ready > 0 for rs in snapshot.replicas)
    for rs in snapshot.replicas:
        serving = min(rs.ready, rs.replicas) if has_readiness else rs.replicas
        if rs.deployment != deployment.name or serving == 0:
            continue
        pool = snapshot.pool(rs.pool)
        prof = profiles.for_deployment(deployment, pool.accelerator)
        if prof is None:
            continue
        caps = [
            g.power_limit_w / pool.accelerator.tdp_w
            for g in snapshot.gpu_telemetry
            if g.deployment == deployment.name and g.power_limit_w is not None
            and any(n.name == g.node and n.pool == pool.name for n in snapshot.nodes)
        ]
        cap = sum(caps) / len(caps) if caps else 1.0
        f_out, f_in = cap_throughput_factor(cap)
        per = 1.0 / (1.0 / (prof.output_tokens_per_s * f_out) + input_share / (prof.input_tokens_per_s * f_in))
        total += serving * per
        uncapped += serving * prof.tokens_per_s_capacity(input_share)
    factor = total / uncapped if uncapped > 0 else 1.0
    return Capacity(tokens_per_s=total, demand_tokens_per_s=out_demand, cap_factor=min(factor, 1.0))


def pressure(snapshot: Snapshot, deployment: ModelDeployment, config: RoutingConfig) -> Pressure:
    """Queue and latency pressure on ``deployment`` from its serving telemetry (none: no pressure).

    The queue is in requests; its tokens are the queue times the mean output tokens per request
    (serving telemetry's, else the demand's). The utilisation factor is
    ``ttft_pressure * SLO / TTFT p99`` when that is below 1, never below ``min_utilisation_factor``.
    """
    serving = next((t for t in snapshot.serving if t.deployment == deployment.name), None)
    if serving is None:
        return Pressure()
    demand = next((d for d in snapshot.demand if d.deployment == deployment.name), None)
    per_request = 0.0
    if serving.requests_per_s > 0:
        per_request = serving.output_tokens_per_s / serving.requests_per_s
    elif demand is not None and demand.requests_per_s > 0:
        per_request = demand.output_tokens_per_s / demand.requests_per_s
    slo_ms = deployment.slo.ttft_p99_ms
    factor = 1.0
    if serving.ttft_p99_ms > config.ttft_pressure * slo_ms:
        factor = max(config.ttft_pressure * slo_ms / serving.ttft_p99_ms, config.min_utilisation_factor)
    return Pressure(
        backlog_tokens_per_s=serving.queue_depth * per_request / config.drain_s,
        utilisation_factor=factor,
        blocks_release=serving.queue_depth > config.queue_release or serving.ttft_p99_ms > config.ttft_release * slo_ms,
        queue_depth=serving.queue_depth,
        ttft_p99_ms=serving.ttft_p99_ms,
    )


def growth_capacity(snapshot: Snapshot, deployment: ModelDeployment, profiles: ProfileTable) -> float:
    """Output tokens/s the fallback could add on devices free in its pools, up to its ``max_replicas``.

    Routing runs before placement, which sizes the fallback for the traffic routed to it. Judging
    the fallback's room by its current replicas alone deadlocks under a surge: routing sends little
    because the fallback is small, and placement keeps it small because little is routed. Free
    devices are the pool's devices less those foreign pods hold
    (:func:`policies.placement_instance.pool_room`: another workload's GPUs are no room to grow
    into) minus those of every replica there, and a replica counts only where it fits node by node;
    power budgets are left to placement (a fallback it cannot grow shows up as less ready capacity
    next cycle).
    """
    from policies.placement_instance import foreign_devices, pool_room, replica_devices

    demand = next((d for d in snapshot.demand if d.deployment == deployment.name), None)
    input_share = (demand.input_tokens_per_s / demand.output_tokens_per_s) if demand and \
        demand.output_tokens_per_s > 0 else 1.0
    allowed = set(deployment.allowed_pools) if deployment.allowed_pools else None
    deps = {d.name: d for d in snapshot.deployments}
    current = sum(rs.replicas for rs in snapshot.replicas if rs.deployment == deployment.name)
    left = max(deployment.max_replicas - current, 0)
    options: list[tuple[float, int]] = []  # (tokens/s per replica, replicas that fit)
    foreign = foreign_devices(snapshot)
    for pool in snapshot.pools:
        if left == 0 or (allowed is not None and pool.name not in allowed):
            continue
        prof = profiles.for_deployment(deployment, pool.accelerator)
        if prof is None:
            continue
        used = sum(rs.replicas * replica_devices(deps[rs.deployment].parallelism.devices, pool.gpus_per_node)
                   for rs in snapshot.replicas if rs.pool == pool.name and rs.deployment in deps)
        room = pool_room(snapshot, pool, foreign)
        free = room.devices - used
        dev = replica_devices(deployment.parallelism.devices, pool.gpus_per_node)
        # slots of this size left by node, less one per ``dev`` devices replicas use (they fill slots too)
        fits = min(int(free // dev), room.fits(dev) - math.ceil(used / dev)) if free >= dev else 0
        if fits > 0:
            options.append((prof.tokens_per_s_capacity(input_share), fits))
    total = 0.0
    for per, fits in sorted(options, reverse=True):
        take = min(fits, left)
        total += take * per
        left -= take
    return total


# -- the LP -----------------------------------------------------------------------------------

def build_model(
    classes: Sequence[CalibrationBin],
    large_room: float,
    small_room: float,
    quality_floor: float,
) -> tuple[pywraplp.Solver, list[pywraplp.Variable], pywraplp.Variable, pywraplp.Variable]:
    """LP over class shares; rooms are capacity as a fraction of the routed deployment's demand.

    ``large_room`` = large capacity at target utilisation / demand; ``small_room`` = fallback
    capacity left after its own traffic / the routed deployment's demand (both may exceed 1).
    """
    solver = pywraplp.Solver.CreateSolver("GLOP")
    # x[c] = fraction of class c's requests sent to the fallback
    x = [solver.NumVar(0.0, 1.0, f"x[{c}]") for c in range(len(classes))]
    # short_large = demand share the large model gets beyond its room (penalised)
    short_large = solver.NumVar(0.0, solver.infinity(), "short_large")
    # short_small = demand share the fallback gets beyond its room (penalised)
    short_small = solver.NumVar(0.0, solver.infinity(), "short_small")

    # The large model serves what is not routed, within its room (+ shortfall).
    solver.Add(sum(b.share * (1 - xc) for b, xc in zip(classes, x, strict=True)) <= large_room + short_large)
    # The fallback serves what is routed, within the room its own traffic leaves (+ shortfall).
    solver.Add(sum(b.share * xc for b, xc in zip(classes, x, strict=True)) <= small_room + short_small)
    # Quality floor, relative to sending everything to the large model.
    large_only = sum(b.share * b.quality_large for b in classes)
    quality = sum(b.share * (b.quality_small * xc + b.quality_large * (1 - xc))
                  for b, xc in zip(classes, x, strict=True))
    solver.Add(quality >= quality_floor * large_only)
    # Monotone in difficulty: one threshold implements the decision.
    for c in range(len(classes) - 1):
        solver.Add(x[c] >= x[c + 1])

    large_calls = sum(b.share * (1 - xc) for b, xc in zip(classes, x, strict=True))
    solver.Maximize(quality - SHORTFALL_PENALTY * (short_large + short_small) - LARGE_CALL_COST * large_calls)
    return solver, x, short_large, short_small


def solve(
    classes: Sequence[CalibrationBin], large_room: float, small_room: float, quality_floor: float,
    time_limit_s: float,
) -> LPResult:
    solver, x, short_large, short_small = build_model(classes, large_room, small_room, quality_floor)
    solver.SetTimeLimit(int(time_limit_s * 1000))
    code = solver.Solve()
    status = {
        pywraplp.Solver.OPTIMAL: SolverStatus.OPTIMAL,
        pywraplp.Solver.FEASIBLE: SolverStatus.FEASIBLE,
        pywraplp.Solver.INFEASIBLE: SolverStatus.INFEASIBLE,
    }.get(code, SolverStatus.UNKNOWN)
    if status not in (SolverStatus.OPTIMAL, SolverStatus.FEASIBLE):
        return LPResult(shares=tuple(0.0 for _ in classes), status=status, objective=0.0,
                        solve_ms=float(solver.wall_time()), shortfall=0.0)
    return LPResult(
        shares=tuple(min(max(v.solution_value(), 0.0), 1.0) for v in x),
        status=status,
        objective=solver.Objective().Value(),
        solve_ms=float(solver.wall_time()),
        shortfall=short_large.solution_value() + short_small.solution_value(),
    )


# -- turning class shares into a table --------------------------------------------------------

def total_share(classes: Sequence[CalibrationBin], shares: Sequence[float]) -> float:
    return sum(b.share * s for b, s in zip(classes, shares, strict=True))


def relative_quality(classes: Sequence[CalibrationBin], shares: Sequence[float]) -> float:
    large_only = sum(b.share * b.quality_large for b in classes)
    q = sum(b.share * (b.quality_small * s + b.quality_large * (1 - s)) for b, s in zip(classes, shares, strict=True))
    return q / large_only if large_only > 0 else 1.0


def threshold_for_share(classes: Sequence[CalibrationBin], share: float) -> float:
    """The score below which ``share`` of requests fall, interpolating linearly within a band.

    The outer bands are open (their stored edges are +-1e9); they get the width of their
    neighbour for interpolation. Share 0 gives -1e9 (nothing routed) and share 1 gives 1e9.
    """
    if share <= SHARE_EPSILON / 10 or not classes:
        return -OPEN_EDGE
    if share >= 1 - SHARE_EPSILON / 10:
        return OPEN_EDGE
    acc = 0.0
    for i, b in enumerate(classes):
        if acc + b.share >= share or i == len(classes) - 1:
            lo, hi = _finite_band(classes, i)
            frac = (share - acc) / b.share if b.share > 0 else 1.0
            return lo + min(max(frac, 0.0), 1.0) * (hi - lo)
        acc += b.share
    return OPEN_EDGE


def _finite_band(classes: Sequence[CalibrationBin], i: int) -> tuple[float, float]:
    b = classes[i]
    lo, hi = b.lower, b.upper
    if lo <= -OPEN_EDGE / 10:
        width = (classes[i + 1].upper - classes[i + 1].lower) if i + 1 < len(classes) and classes[i + 1].upper < \
            OPEN_EDGE / 10 else 1.0
        lo = (hi if hi < OPEN_EDGE / 10 else 0.0) - width
    if hi >= OPEN_EDGE / 10:
        width = (classes[i - 1].upper - classes[i - 1].lower) if i > 0 and classes[i - 1].lower > \
            -OPEN_EDGE / 10 else 1.0
        hi = lo + width
    return lo, hi


def shares_for_total(classes: Sequence[CalibrationBin], share: float) -> tuple[float, ...]:
    """Class shares of a threshold rule that routes ``share`` of requests (easiest first)."""
    out = []
    left = share
    for b in classes:
        take = min(b.share, max(left, 0.0))
        out.append(take / b.share if b.share > 0 else 0.0)
        left -= take
    return tuple(out)


def max_share_at_floor(classes: Sequence[CalibrationBin], floor: float) -> float:
    """The largest threshold-rule share whose relative quality stays at or above ``floor`` (bisection)."""
    lo, hi = 0.0, 1.0
    if relative_quality(classes, shares_for_total(classes, 1.0)) >= floor:
        return 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if relative_quality(classes, shares_for_total(classes, mid)) >= floor:
            lo = mid
        else:
            hi = mid
    return lo


# -- the policy -------------------------------------------------------------------------------

def plan_routing(
    snapshot: Snapshot, config: RoutingConfig | None = None, state: RoutingState | None = None
) -> Plan:
    """Per deployment with a fallback: the LP's share at target utilisation, with release hysteresis."""
    return _plan(snapshot, config or RoutingConfig(), state or RoutingState(), _decide_lp)


def plan_threshold(
    snapshot: Snapshot, config: RoutingConfig | None = None, state: RoutingState | None = None
) -> Plan:
    """Baseline: a fixed threshold (RouteLLM's deployment mode), blind to capacity and power caps."""
    return _plan(snapshot, config or RoutingConfig(), state or RoutingState(), _decide_fixed)


Decider = Callable[[Snapshot, ModelDeployment, RoutingConfig, RouteDecision | None],
                   tuple[tuple[float, ...], Reason, SolverStatus, float, str, dict[str, float], str | None]]


def _decide_fixed(
    snapshot: Snapshot, dep: ModelDeployment, config: RoutingConfig, prev: RouteDecision | None
) -> tuple[tuple[float, ...], Reason, SolverStatus, float, str, dict[str, float], str | None]:
    assert dep.fallback is not None
    share = config.fixed_fallback_share
    if share is None:
        share = max_share_at_floor(config.classes, dep.fallback.quality_floor)
    return (shares_for_total(config.classes, share), Reason.NO_CHANGE, SolverStatus.HEURISTIC, 0.0,
            f"fixed threshold routes {share:.0%}", {}, "threshold")


def _decide_lp(
    snapshot: Snapshot, dep: ModelDeployment, config: RoutingConfig, prev: RouteDecision | None
) -> tuple[tuple[float, ...], Reason, SolverStatus, float, str, dict[str, float], str | None]:
    assert dep.fallback is not None
    small_dep = next((d for d in snapshot.deployments if d.name == dep.fallback.deployment), None)
    large = capacity(snapshot, dep, config.profiles)
    small = capacity(snapshot, small_dep, config.profiles) if small_dep else Capacity(tokens_per_s=0,
                                                                                     demand_tokens_per_s=0)
    press = pressure(snapshot, dep, config)
    demand = large.demand_tokens_per_s + press.backlog_tokens_per_s
    floor = dep.fallback.quality_floor
    metrics = {
        "large_capacity_tokens_per_s": large.tokens_per_s, "demand_tokens_per_s": demand,
        "fallback_capacity_tokens_per_s": small.tokens_per_s, "power_cap_factor": large.cap_factor,
        "queue_depth": press.queue_depth, "ttft_p99_ms": press.ttft_p99_ms,
        "backlog_tokens_per_s": press.backlog_tokens_per_s, "utilisation_factor": press.utilisation_factor,
    }
    if demand <= 0:
        return (tuple(0.0 for _ in config.classes), Reason.NO_CHANGE, SolverStatus.NOT_RUN, 0.0,
                "no demand: all traffic to the large model", metrics, None)
    util = dep.target_utilisation * press.utilisation_factor
    small_util = small_dep.target_utilisation if small_dep else util
    small_grow = growth_capacity(snapshot, small_dep, config.profiles) if small_dep else 0.0
    small_room = max((small.tokens_per_s + small_grow) * small_util - small.demand_tokens_per_s, 0.0) / demand
    metrics["fallback_growth_tokens_per_s"] = small_grow
    need = solve(config.classes, large.tokens_per_s * util / demand, small_room, floor, config.time_limit_s)
    release_util = max(util - config.release_margin, 0.0)
    release = solve(config.classes, large.tokens_per_s * release_util / demand, small_room, floor,
                    config.time_limit_s)
    solve_ms = need.solve_ms + release.solve_ms
    if need.status not in (SolverStatus.OPTIMAL, SolverStatus.FEASIBLE):
        # The LP has slack on every capacity row, so this is a solver fault, not a real infeasibility:
        # keep the table in force (or large only when there is none) and say so.
        if prev is not None:
            return (shares_for_total(config.classes, prev.fallback_share), Reason.SOLVER_FALLBACK, need.status,
                    solve_ms, f"LP {need.status.value}: keeping the previous share (fallback)", metrics,
                    "hold_previous")
        return (tuple(0.0 for _ in config.classes), Reason.SOLVER_FALLBACK, need.status, solve_ms,
                f"LP {need.status.value}: large only (fallback)", metrics, "large_only")
    need_total = total_share(config.classes, need.shares)
    prev_total = prev.fallback_share if prev else 0.0
    metrics.update({"needed_share": need_total, "release_share": total_share(config.classes, release.shares),
                    "shortfall": need.shortfall})
    if prev_total <= need_total + SHARE_EPSILON:
        shares = need.shares
        held = False
    elif press.blocks_release:
        # the large model still queues or answers slowly: keep what is on the fallback
        shares = shares_for_total(config.classes, prev_total)
        held = True
    else:
        # Shift back only as far as the release utilisation allows (hysteresis band).
        target = max(min(prev_total, total_share(config.classes, release.shares)), need_total)
        shares = need.shares if target <= need_total + SHARE_EPSILON else shares_for_total(config.classes, target)
        held = target > need_total + SHARE_EPSILON
    # The data plane applies one score threshold: easiest requests first (a prefix of the bands).
    # The LP only guarantees monotone class shares, so project onto the prefix rule with the same
    # total and enforce the floor on what will actually run.
    total = min(total_share(config.classes, shares), max_share_at_floor(config.classes, floor))
    shares = shares_for_total(config.classes, total)
    if need.shortfall > 1e-6 and relative_quality(config.classes, shares) <= floor + 1e-6:
        reason = Reason.QUALITY_FLOOR
        why = (f"large model short of capacity ({large.tokens_per_s:.0f} tok/s at cap factor "
               f"{large.cap_factor:.2f} for {demand:.0f} tok/s) but the quality floor {floor:.0%} stops the shift")
    elif held:
        reason = Reason.STABILISING
        why = (f"holding {total:.0%} on the fallback while the large model queues ({press.queue_depth:.0f} waiting, "
               f"TTFT p99 {press.ttft_p99_ms:.0f} ms)" if press.blocks_release else
               f"holding {total:.0%} on the fallback until utilisation falls below {release_util:.0%}")
    elif total > prev_total + SHARE_EPSILON and need.shortfall <= 1e-6 and need_total > 0:
        reason = Reason.CAPACITY_PRESSURE
        queued = (f"; {press.queue_depth:.0f} queued, TTFT p99 {press.ttft_p99_ms:.0f} ms"
                  if press.backlog_tokens_per_s > 0 or press.utilisation_factor < 1 else "")
        why = (f"large model capacity {large.tokens_per_s:.0f} tok/s (cap factor {large.cap_factor:.2f}) at "
               f"{util:.0%} utilisation is short of {demand:.0f} tok/s{queued}: {total:.0%} to the fallback")
    elif abs(total - prev_total) <= SHARE_EPSILON:
        reason = Reason.NO_CHANGE
        why = f"{total:.0%} to the fallback, unchanged"
    else:
        reason = Reason.DEMAND_CHANGED
        why = f"fallback share {prev_total:.0%} -> {total:.0%}"
    return shares, reason, need.status, solve_ms, why, metrics, None


def _plan(snapshot: Snapshot, config: RoutingConfig, state: RoutingState, decide: Decider) -> Plan:
    actions: list[SetRoutingShare] = []
    # only deployments that still exist: a deleted one's entry would ride along in every State forever
    names = {d.name for d in snapshot.deployments}
    routes: dict[str, RouteDecision] = {k: v for k, v in state.routes.items() if k in names}
    summaries: list[str] = []
    reasons: list[Reason] = []
    statuses: list[SolverStatus] = []
    metrics: dict[str, float] = {}
    solve_ms = 0.0
    objective = 0.0
    fallback_used: str | None = None
    for dep in sorted(snapshot.deployments, key=lambda d: d.name):
        if dep.fallback is None:
            continue
        prev = state.routes.get(dep.name)
        shares, reason, status, ms, why, m, fb = decide(snapshot, dep, config, prev)
        total = total_share(config.classes, shares)
        quality = relative_quality(config.classes, shares)
        threshold = threshold_for_share(config.classes, total)
        changed = (prev is None or abs(prev.fallback_share - total) > SHARE_EPSILON
                   or prev.fallback != dep.fallback.deployment)
        version = 1 if prev is None else prev.version + (1 if changed else 0)
        if not changed and prev is not None:
            total, threshold, quality = prev.fallback_share, prev.threshold, prev.expected_quality
        decision = RouteDecision(fallback=dep.fallback.deployment, fallback_share=min(max(total, 0.0), 1.0),
                                 threshold=threshold, expected_quality=min(max(quality, 0.0), 1.0), version=version)
        routes[dep.name] = decision
        actions.append(SetRoutingShare(
            deployment=dep.name, fallback=decision.fallback, threshold=decision.threshold,
            fallback_share=decision.fallback_share, expected_quality=decision.expected_quality, version=version,
        ))
        summaries.append(f"{dep.name}: {why}")
        sticky = (Reason.QUALITY_FLOOR, Reason.STABILISING, Reason.SOLVER_FALLBACK)  # worth saying even if unchanged
        reasons.append(reason if changed or reason in sticky else Reason.NO_CHANGE)
        statuses.append(status)
        solve_ms += ms
        objective += quality
        if fb:
            fallback_used = fb
        for k, v in m.items():
            metrics[f"{dep.name}.{k}"] = v
        metrics[f"{dep.name}.fallback_share"] = decision.fallback_share
        metrics[f"{dep.name}.expected_quality"] = decision.expected_quality
    if not actions:
        return Plan(policy=PolicyName.ROUTING,
                    explanation=Explanation(reason=Reason.NO_CHANGE, summary="no deployment has a fallback"),
                    state=RoutingState(routes=routes).model_dump(mode="json"))
    order = [Reason.QUALITY_FLOOR, Reason.SOLVER_FALLBACK, Reason.CAPACITY_PRESSURE, Reason.STABILISING,
             Reason.DEMAND_CHANGED, Reason.NO_CHANGE]
    reason = min(reasons, key=lambda r: order.index(r) if r in order else len(order))
    status = statuses[0] if len(set(statuses)) == 1 else SolverStatus.FEASIBLE
    return Plan(
        policy=PolicyName.ROUTING,
        actions=tuple(actions),
        explanation=Explanation(
            reason=reason, summary="; ".join(summaries), objective=objective, bound=objective
            if status == SolverStatus.OPTIMAL else None, solver_status=status, solve_ms=solve_ms,
            fallback=fallback_used, metrics=metrics,
        ),
        state=RoutingState(routes=routes).model_dump(mode="json"),
    )


def routed_to_fallback(plan: Plan) -> Mapping[str, tuple[bool, str]]:
    """Per deployment: (the ``RoutedToFallback`` condition, its reason) for the resource's status."""
    out: dict[str, tuple[bool, str]] = {}
    for a in plan.actions:
        if isinstance(a, SetRoutingShare):
            out[a.deployment] = (a.fallback_share > SHARE_EPSILON, plan.explanation.reason.value)
    return out


__all__ = [
    "DEFAULT_CLASSES", "Capacity", "LPResult", "Pressure", "RouteDecision", "RoutingConfig", "RoutingState",
    "build_model", "capacity", "max_share_at_floor", "plan_routing", "plan_threshold", "pressure", "relative_quality",
    "routed_to_fallback", "shares_for_total", "solve", "threshold_for_share", "total_share",
]
