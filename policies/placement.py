"""Placement and autoscaling across heterogeneous pools: replicas per (deployment, pool).

Problem (numbers in :mod:`policies.placement_instance`)::

    min  sum_k obj_cost[k] r[k]  +  sum_k dis[k] |r[k] - r0[k]|  +  sum_m short_price[m] short[m]  + min-penalty
    s.t. sum_{k of m} cap[k] r[k] + short[m] >= need[m]            demand with headroom, at SLO
         min_replicas[m] <= sum_{k of m} r[k] <= max_replicas[m]   (min is soft, heavily penalised)
         sum_{k in pool p} dev[k] r[k] <= devices[p]                pool capacity (whole nodes)
         sum_{k in domain d} power[k] r[k] <= budget[d]             power-domain budgets
         0 <= r[k] <= ub[k], integer

Unmet demand is a priced slack, so the model is always feasible and an impossible demand yields the
best partial plan with reason ``InsufficientCapacity``.

How it is solved (a naive CP-SAT model of 1,000 x 20 ends at a ~91% gap after 2 s):

1. **Relax**: the LP relaxation with GLOP, built with vectorised helper calls; its value is a bound.
2. **Price and decompose**: the LP duals of pool-capacity and power-budget rows price devices and
   watts; with those prices the problem splits into one small integer problem per deployment,
   solved exactly by branch and bound (:func:`_solve_deployment`). Their sum minus the priced
   capacities is a Lagrangian bound, never weaker than the LP bound.
3. **Round and repair**: the per-deployment optima form a plan; pools or domains left over their
   limits are repaired by moving the least valuable replicas, cheapest-first, elsewhere.
4. **Polish** with CP-SAT (time limit, hinted with the better of the current plan and the
   repaired plan; a primal improver only - the reported bound stays the Lagrangian one, since
   CP-SAT sees an integer-rounded model) on each independent component (deployments linked by shared pools or power
   domains) small enough to solve in the time limit, unless step 2-3 already proved a gap
   of at most ``polish_gap``.
5. If nothing feasible comes out, the greedy baseline's plan is used and the Plan says so.

Solve time: pass a ``clock`` (e.g. ``time.perf_counter``) to measure the whole cycle, model building
included. Without one, ``solve_ms`` is what the solvers report themselves: CP-SAT's wall time only,
since GLOP through the model-builder helper reports 0 and the branch and bound is plain Python;
``metrics["solve_ms_from_clock"]`` says which.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from ortools.linear_solver.python import model_builder_helper as mbh
from ortools.sat.python import cp_model
from pydantic import Field

from policies.baselines.greedy import greedy_plan, greedy_replicas
from policies.placement_instance import (
    FloatArray,
    Instance,
    InstanceParams,
    IntArray,
    build_instance,
    components,
    domain_draw,
    evaluate,
    missing_min_penalty,
    plan_metrics,
    replica_actions,
    violations,
    with_need,
)
from policies.plan import Explanation, Plan, PolicyName, Reason, SolverStatus, noop_plan
from policies.profiles import ProfileTable, default_table
from policies.snapshot import Frozen, NonNegFloat, NonNegInt, PosFloat, PosInt, Snapshot

Clock = Callable[[], float]
COST_SCALE = 100_000_000  # CP-SAT works in integers: $1/h = 10^8 units (small prices stay exact to ~1e-4)
CAP_SCALE = 100  # capacities and need in 1/100 tokens/s
POWER_SCALE = 10  # watts in 1/10 W


class PlacementConfig(Frozen):
    time_limit_s: PosFloat = 1.0  # CP-SAT wall limit per solve (the whole cycle stays near it)
    deterministic_time_limit: PosFloat = 0.5  # binds before the wall limit normally: same input, same plan
    num_workers: PosInt = 1
    cpsat_max_pairs: NonNegInt = 1500  # components up to this many pairs get the CP-SAT polish
    bnb_node_limit: PosInt = 400  # per deployment; beyond it the LP bound stands in for that one (150 left a
    # 2.1% gap at 1,000 deployments once SLO-feasible capacities made pools less interchangeable; 400: 1.8%)
    polish_gap: NonNegFloat = 0.001  # skip the CP-SAT polish where the proven gap is already this small
    power_price_per_kwh: NonNegFloat = 0.10
    disruption_weight: NonNegFloat = 0.25  # a change costs this many hours of the replica's cost
    preferred_discount: NonNegFloat = 0.05
    shortfall_factor: PosFloat = 10.0
    # down slow: a deployment's need never falls below its highest need of this window, and while
    # the deployment has been watched for less than the window its current capacity is kept (the
    # first forecast is one period of noise; the initial fleet's headroom must not go on it)
    scale_down_window_s: NonNegFloat = 300.0
    # a fallback is its large model's overflow valve and a replica takes a minute or more to start:
    # it keeps ready capacity for this multiple of the large model's current (post-routing) load, so
    # the routing shift in a burst lands on running replicas (2: the large model's load triples)
    fallback_surge: NonNegFloat = 2.0

    def instance_params(self, unlimited_capacity: bool = False) -> InstanceParams:
        return InstanceParams(
            power_price_per_kwh=self.power_price_per_kwh, disruption_weight=self.disruption_weight,
            preferred_discount=self.preferred_discount, shortfall_factor=self.shortfall_factor,
            unlimited_capacity=unlimited_capacity,
        )


class PlacementState(Frozen):
    """Memory between cycles: only what explains trends (placement itself lives in the cluster)."""

    cycles: NonNegInt = 0
    last_objective: float | None = None
    last_plan_cost: float | None = None
    history: dict[str, float] = Field(default_factory=dict)
    first_seen: dict[str, float] = Field(default_factory=dict)  # deployment -> time of its first plan
    needs: dict[str, tuple[tuple[float, float], ...]] = Field(default_factory=dict)  # (time, raw need) in window


@dataclass
class Solution:
    r: IntArray
    objective: float
    bound: float
    status: SolverStatus
    solve_ms: float
    method: str
    lp_bound: float = 0.0


# -- 1. relax ----------------------------------------------------------------------------------


@dataclass
class Relaxation:
    x: FloatArray  # fractional replicas per pair
    objective: float
    pool_price: FloatArray  # $/h per device (>= 0)
    domain_price: FloatArray  # $/h per W (>= 0)
    wall_s: float
    optimal: bool


def relax(inst: Instance) -> Relaxation:
    """LP relaxation over up/down moves from the current plan, solved by GLOP."""
    n, m_count = inst.n_pairs, len(inst.deployments)
    b: Any = mbh.ModelBuilderHelper()  # untyped use: its stubs reject plain float arrays
    up_ub = np.maximum(inst.ub - inst.r0, 0).astype(np.float64)
    dn_lb = np.maximum(inst.r0 - inst.ub, 0).astype(np.float64)
    # up[k] >= 0: replicas added to pair k; down[k]: replicas removed (r = r0 + up - down)
    up = b.add_var_array_with_bounds(np.zeros(n), up_ub, np.zeros(n, dtype=bool), "up")
    down = b.add_var_array_with_bounds(dn_lb, inst.r0.astype(np.float64), np.zeros(n, dtype=bool), "down")
    # short[m] >= 0: unmet need (tokens/s); miss[m] >= 0: replicas below min_replicas
    short = b.add_var_array_with_bounds(np.zeros(m_count), np.full(m_count, math.inf), np.zeros(m_count, dtype=bool),
                                        "short")
    miss = b.add_var_array_with_bounds(np.zeros(m_count), np.full(m_count, math.inf), np.zeros(m_count, dtype=bool),
                                       "miss")
    rho = missing_min_penalty(inst)
    idx = np.concatenate([up, down, short, miss]).tolist()
    coef = np.concatenate([inst.obj_cost + inst.dis, -inst.obj_cost + inst.dis, inst.short_price, rho]).tolist()
    b.set_objective_coefficients(idx, coef)
    const = float(inst.obj_cost @ inst.r0)

    base_cover = np.bincount(inst.pair_m, weights=inst.cap * inst.r0, minlength=m_count)
    base_count = np.bincount(inst.pair_m, weights=inst.r0.astype(np.float64), minlength=m_count)
    by_m = [inst.pairs_of(m).tolist() for m in range(m_count)]
    up_l, dn_l, cap_l = up.tolist(), down.tolist(), inst.cap.tolist()
    add = b.safe_add_term_to_constraint
    for m in range(m_count):
        # demand: sum cap (up - down) + short >= need - current cover
        c = b.add_linear_constraint()
        b.set_constraint_lower_bound(c, float(inst.need[m] - base_cover[m]))
        b.set_constraint_upper_bound(c, math.inf)
        for k in by_m[m]:
            add(c, up_l[k], cap_l[k])
            add(c, dn_l[k], -cap_l[k])
        add(c, int(short[m]), 1.0)
        # replica bounds: min (soft via miss) <= count <= max
        c = b.add_linear_constraint()
        b.set_constraint_lower_bound(c, float(inst.min_r[m] - base_count[m]))
        b.set_constraint_upper_bound(c, float(inst.max_r[m] - base_count[m]))
        for k in by_m[m]:
            add(c, up_l[k], 1.0)
            add(c, dn_l[k], -1.0)
        add(c, int(miss[m]), 1.0)
    pool_rows: dict[int, int] = {}
    dev_l = inst.dev.astype(np.float64).tolist()
    used0 = np.bincount(inst.pair_p, weights=inst.dev * inst.r0, minlength=len(inst.pools))
    for p in range(len(inst.pools)):
        if math.isinf(inst.pool_devices[p]):
            continue
        # pool capacity: devices of all replicas in pool p
        c = b.add_linear_constraint()
        b.set_constraint_lower_bound(c, -math.inf)
        b.set_constraint_upper_bound(c, float(inst.pool_devices[p] - used0[p]))
        for k in np.flatnonzero(inst.pair_p == p).tolist():
            add(c, up_l[k], dev_l[k])
            add(c, dn_l[k], -dev_l[k])
        pool_rows[p] = c
    dom_rows: dict[int, int] = {}
    draw0 = domain_draw(inst, inst.r0)
    dom_of_pair = inst.pool_domain[inst.pair_p]
    pow_l = inst.power.tolist()
    for d in range(len(inst.domains)):
        if math.isinf(inst.domain_budget[d]):
            continue
        # power budget: predicted W of replicas in the domain's pools
        c = b.add_linear_constraint()
        b.set_constraint_lower_bound(c, -math.inf)
        b.set_constraint_upper_bound(c, float(inst.domain_budget[d] - draw0[d]))
        for k in np.flatnonzero(dom_of_pair == d).tolist():
            add(c, up_l[k], pow_l[k])
            add(c, dn_l[k], -pow_l[k])
        dom_rows[d] = c

    solver = mbh.ModelSolverHelper("glop")
    solver.solve(b)
    status = solver.status()
    optimal = status == mbh.SolveStatus.OPTIMAL
    pool_price = np.zeros(len(inst.pools))
    domain_price = np.zeros(len(inst.domains))
    if not optimal:
        return Relaxation(inst.r0.astype(np.float64), -math.inf, pool_price, domain_price, solver.wall_time(), False)
    values = solver.variable_values()
    duals = solver.dual_values()
    x = inst.r0 + values[up] - values[down]
    for p, c in pool_rows.items():
        pool_price[p] = max(0.0, -float(duals[c]))
    for d, c in dom_rows.items():
        domain_price[d] = max(0.0, -float(duals[c]))
    return Relaxation(x, float(solver.objective_value()) + const, pool_price, domain_price, solver.wall_time(), True)


# -- 2. price and decompose: one exact small integer problem per deployment ---------------------


@dataclass
class Subproblem:
    """One deployment's integer problem at given per-replica costs; pools sorted by cost per token/s.

    ``f_j(r) = c_j r + w_j |r - r0_j|`` per pool, ``pi`` per token/s unmet, ``rho`` per replica
    below ``min_r``, at most ``max_r`` replicas. ``tables[i]`` holds the LP bound of pools i.. as a
    piecewise-linear function of the residual need, so a bound is one bisection.
    """

    ks: IntArray  # pair indices, in branching order
    a: list[float]
    c: list[float]
    w: list[float]
    r0: list[int]
    ub: list[int]
    need: float
    pi: float
    rho: float
    min_r: int
    max_r: int
    fixed: float  # disruption of pairs that can hold no replica (must drain): w * r0
    tables: list[tuple[float, float, list[float], list[float], list[float]]]


def _subproblem(
    inst: Instance, m: int, cost: FloatArray, ub: IntArray, rho: FloatArray
) -> Subproblem:
    ks_all = inst.pairs_of(m)
    live_mask = (inst.cap[ks_all] > 0) & (ub[ks_all] > 0)
    live, dead = ks_all[live_mask], ks_all[~live_mask]
    live = _undominated(inst, live, cost, ub, float(inst.need[m]), int(inst.min_r[m]))
    order = live[np.argsort(cost[live] / inst.cap[live], kind="stable")]
    sp = Subproblem(
        ks=order, a=inst.cap[order].tolist(), c=cost[order].tolist(), w=inst.dis[order].tolist(),
        r0=inst.r0[order].tolist(), ub=ub[order].tolist(), need=float(inst.need[m]),
        pi=float(inst.short_price[m]), rho=float(rho[m]), min_r=int(inst.min_r[m]), max_r=int(inst.max_r[m]),
        fixed=float(inst.dis[dead] @ inst.r0[dead]), tables=[],
    )
    n = len(order)
    for i in range(n + 1):
        const, free_tokens = 0.0, 0.0
        segs: list[tuple[float, float]] = []  # (cost per token, tokens)
        for j in range(i, n):
            a, c, w, r0, u = sp.a[j], sp.c[j], sp.w[j], sp.r0[j], sp.ub[j]
            keep = min(r0, u)
            const += w * r0  # f_j(0)
            for slope, length in ((c - w, keep), (c + w, u - keep)):
                if length <= 0:
                    continue
                if slope <= 0:  # profitable whatever the need: always taken in the LP
                    const += slope * length
                    free_tokens += a * length
                elif slope / a < sp.pi:
                    segs.append((slope / a, a * length))
        segs.sort()
        cum_t, cum_c, per = [0.0], [0.0], []
        for pt, tok in segs:
            per.append(pt)
            cum_t.append(cum_t[-1] + tok)
            cum_c.append(cum_c[-1] + pt * tok)
        sp.tables.append((const, free_tokens, cum_t, cum_c, per))
    return sp


def _undominated(inst: Instance, live: IntArray, cost: FloatArray, ub: IntArray, need: float, min_r: int) -> IntArray:
    """Drop pools an optimum never needs: empty now, and another pool is at least as good and roomy.

    Pool j (no current replicas) is dominated by pool i when i gives at least the capacity per
    replica for at most the marginal cost (c + w), and i can take every replica the deployment
    could ever use (current ones plus enough to cover the need alone). Moving j's replicas to i
    then never costs more, so removing j keeps the subproblem exact. Typical fleets have several
    pools of one GPU type at one price: this keeps one of them per deployment.
    """
    if len(live) <= 1:
        return live
    a = inst.cap[live]
    top = cost[live] + inst.dis[live]
    r0 = inst.r0[live]
    most = int(r0.sum()) + max(min_r, math.ceil(need / float(a.min()))) + 1
    roomy = ub[live] >= most
    idx = np.arange(len(live))
    # dominates[i, j]: pool i is roomy and at least as good as j (ties broken by index)
    ge_a = a[:, None] >= a[None, :] - 1e-9
    le_top = top[:, None] <= top[None, :] + 1e-12
    strict = (a[:, None] > a[None, :] + 1e-9) | (top[:, None] < top[None, :] - 1e-12) | (idx[:, None] < idx[None, :])
    dominates = roomy[:, None] & ge_a & le_top & strict
    dropped = dominates.any(axis=0) & (r0 == 0)
    kept: IntArray = live[~dropped]
    return kept


def _bound(sp: Subproblem, i: int, residual: float) -> float:
    """LP bound of pools i.. covering ``residual`` tokens/s (count bounds dropped: still a bound)."""
    const, free, cum_t, cum_c, per = sp.tables[i]
    rest = residual - free
    if rest <= 0:
        return const
    j = bisect.bisect_left(cum_t, rest)
    if j >= len(cum_t):
        return const + cum_c[-1] + sp.pi * (rest - cum_t[-1])
    return const + cum_c[j - 1] + per[j - 1] * (rest - cum_t[j - 1])


def _leaf_cost(sp: Subproblem, r: list[int]) -> float:
    cover = sum(sp.a[j] * r[j] for j in range(len(r)))
    cost = sum(sp.c[j] * r[j] + sp.w[j] * abs(r[j] - sp.r0[j]) for j in range(len(r)))
    return cost + sp.pi * max(0.0, sp.need - cover) + sp.rho * max(0, sp.min_r - sum(r))


def solve_deployment(sp: Subproblem, incumbent: list[int], node_limit: int) -> tuple[list[int], float, float]:
    """Best-first branch and bound over pools: (replicas per pool, value, proven lower bound)."""
    n = len(sp.a)
    if n == 0:
        val = sp.fixed + sp.pi * sp.need + sp.rho * sp.min_r
        return [], val, val
    best = [min(max(v, 0), u) for v, u in zip(incumbent, sp.ub, strict=True)]
    while sum(best) > sp.max_r:
        j = max(range(n), key=lambda q: (best[q], q))
        best[j] -= 1
    best_val = _leaf_cost(sp, best)
    # node: (bound, tie, depth, prefix cost, prefix cover, prefix count, prefix)
    heap: list[tuple[float, int, int, float, float, int, tuple[int, ...]]] = [
        (_bound(sp, 0, sp.need), 0, 0, 0.0, 0.0, 0, ())]
    tie, nodes = 1, 0
    while heap:
        lb, _, i, cost, cover, count, prefix = heapq.heappop(heap)
        if lb >= best_val - 1e-9:
            break  # every open node is at least as bad: the incumbent is optimal
        nodes += 1
        if nodes > node_limit:
            return best, best_val + sp.fixed, lb + sp.fixed
        a, c, w, r0 = sp.a[i], sp.c[i], sp.w[i], sp.r0[i]
        residual = sp.need - cover
        # a pool may take what covers the need, keeps its current replicas, or makes up the minimum count:
        # without the last term a deployment with no need yet never got its min_replicas here (only from
        # the incumbent, lost when that sat in a pool _undominated dropped) and zero was "proven" optimal
        hi = min(sp.ub[i], sp.max_r - count, max(math.ceil(max(residual, 0.0) / a), r0, sp.min_r - count))
        last = i + 1 == n
        for v in range(max(hi, 0), -1, -1):
            c2 = cost + c * v + w * abs(v - r0)
            cov2 = cover + a * v
            if last:
                val = c2 + sp.pi * max(0.0, sp.need - cov2) + sp.rho * max(0, sp.min_r - count - v)
                if val < best_val - 1e-12:
                    best_val, best = val, [*prefix, v]
                continue
            b2 = c2 + _bound(sp, i + 1, sp.need - cov2)
            if b2 < best_val - 1e-9:
                heapq.heappush(heap, (b2, tie, i + 1, c2, cov2, count + v, (*prefix, v)))
                tie += 1
    return best, best_val + sp.fixed, best_val + sp.fixed


def priced_costs(inst: Instance, lp: Relaxation) -> FloatArray:
    """Objective cost per replica plus the LP's shadow prices of the devices and watts it uses."""
    dom = inst.pool_domain[inst.pair_p]
    watt_price = lp.domain_price[np.maximum(dom, 0)] if len(inst.domains) else np.zeros(inst.n_pairs)
    return inst.obj_cost + lp.pool_price[inst.pair_p] * inst.dev + np.where(dom >= 0, watt_price, 0.0) * inst.power


def lagrangian_terms(inst: Instance, lp: Relaxation, node_limit: int, known: dict[int, float]) -> FloatArray:
    """Per deployment: the exact (or, past the node limit, a proven lower) integer optimum at LP prices."""
    priced = priced_costs(inst, lp)
    rho = missing_min_penalty(inst)
    rounded = np.rint(lp.x).astype(np.int64)
    terms = np.zeros(len(inst.deployments))
    for m in range(len(inst.deployments)):
        if m in known:
            terms[m] = known[m]
            continue
        sp = _subproblem(inst, m, priced, inst.ub, rho)
        _, _, lower = solve_deployment(sp, rounded[sp.ks].tolist(), node_limit)
        terms[m] = lower
    return terms


def lagrangian_bound(inst: Instance, lp: Relaxation, terms: FloatArray, ms: IntArray, ps: IntArray) -> float:
    """Sum of deployment terms minus the priced capacities, over one component's deployments and pools."""
    cap = np.where(np.isinf(inst.pool_devices[ps]), 0.0, inst.pool_devices[ps])
    value = float(terms[ms].sum()) - float(lp.pool_price[ps] @ cap)
    for d in sorted({int(d) for d in inst.pool_domain[ps] if d >= 0}):
        if not math.isinf(inst.domain_budget[d]):
            value -= float(lp.domain_price[d] * inst.domain_budget[d])
    return value


def sequential(
    inst: Instance, cost: FloatArray, start: IntArray, order: list[int], node_limit: int,
    unbound_terms: dict[int, float] | None = None, unbound_fit: dict[int, bool] | None = None,
) -> IntArray:
    """Re-solve deployments one at a time against what the others leave free (pools and power).

    Each deployment gets its exact optimum at ``cost`` given everyone else's replicas, so a pass
    never breaks a limit and, at true costs, never makes the objective worse. When
    ``unbound_terms`` is given, deployments whose limits did not bind record their proven lower
    bound there (it is then the unrestricted subproblem's, reusable as a Lagrangian term).
    """
    r = start.copy()
    rho = missing_min_penalty(inst)
    used = np.bincount(inst.pair_p, weights=inst.dev * r, minlength=len(inst.pools)).astype(np.float64)
    draw = domain_draw(inst, r) if len(inst.domains) else np.zeros(0)
    dom_of = inst.pool_domain[inst.pair_p]
    for m in order:
        ks = inst.pairs_of(m)
        used -= np.bincount(inst.pair_p[ks], weights=inst.dev[ks] * r[ks], minlength=len(inst.pools))
        in_dom = ks[dom_of[ks] >= 0]
        if len(in_dom):
            draw -= np.bincount(dom_of[in_dom], weights=inst.power[in_dom] * r[in_dom], minlength=len(inst.domains))
        ub = inst.ub.copy()
        free = inst.pool_devices[inst.pair_p[ks]] - used[inst.pair_p[ks]]
        ub[ks] = np.minimum(ub[ks], np.floor(np.minimum(free, 1e12) / inst.dev[ks]).astype(np.int64))
        if len(in_dom):
            watts = inst.domain_budget[dom_of[in_dom]] - draw[dom_of[in_dom]]
            ub[in_dom] = np.minimum(ub[in_dom], np.floor(np.minimum(watts, 1e15) / np.maximum(inst.power[in_dom], 1e-9))
                                    .astype(np.int64))
        ub[ks] = np.maximum(ub[ks], 0)
        sp = None
        if unbound_terms is not None:
            # the unrestricted optimum is the Lagrangian term; keep it when it also fits what is free
            free_sp = _subproblem(inst, m, cost, inst.ub, rho)
            vals, _, unbound_terms[m] = solve_deployment(free_sp, r[free_sp.ks].tolist(), node_limit)
            if all(v <= u for v, u in zip(vals, ub[free_sp.ks].tolist(), strict=True)):
                sp = free_sp
            if unbound_fit is not None:
                unbound_fit[m] = sp is not None
        if sp is None:
            sp = _subproblem(inst, m, cost, ub, rho)
            vals, _, _ = solve_deployment(sp, r[sp.ks].tolist(), node_limit)
        r[ks] = 0
        r[sp.ks] = vals
        # pools of one domain share its budget: shed replicas until it holds (rare)
        if len(in_dom):
            for d in np.unique(dom_of[in_dom]):
                mine = in_dom[dom_of[in_dom] == d]
                while draw[d] + float(inst.power[mine] @ r[mine]) > inst.domain_budget[d] + 1e-6 and r[mine].sum() > 0:
                    k = mine[np.argmax(np.where(r[mine] > 0, inst.power[mine] / np.maximum(inst.cap[mine], 1e-9), -1))]
                    r[k] -= 1
            draw += np.bincount(dom_of[in_dom], weights=inst.power[in_dom] * r[in_dom], minlength=len(inst.domains))
        used += np.bincount(inst.pair_p[ks], weights=inst.dev[ks] * r[ks], minlength=len(inst.pools))
    return r


# -- 3. repair ----------------------------------------------------------------------------------


def repair(inst: Instance, r: IntArray) -> IntArray:
    """Bring pools, power domains and replica maxima within limits, then refill unmet need greedily."""
    r = np.minimum(np.maximum(r, 0), inst.ub).astype(np.int64)
    total = np.bincount(inst.pair_m, weights=r.astype(np.float64), minlength=len(inst.deployments))
    for m in np.flatnonzero(total > inst.max_r):
        ks = inst.pairs_of(int(m))
        for k in ks[np.argsort(-inst.cost[ks] / np.maximum(inst.cap[ks], 1e-12))]:
            excess = int(r[ks].sum() - inst.max_r[m])
            if excess <= 0:
                break
            r[k] -= min(excess, int(r[k]))
    # over-full pools / domains: remove the replica whose loss of cover costs least per device freed
    for _ in range(10 * inst.n_pairs + 10):
        used = np.bincount(inst.pair_p, weights=inst.dev * r, minlength=len(inst.pools))
        over_p = np.flatnonzero(used > inst.pool_devices + 1e-9)
        over_d = (np.flatnonzero(domain_draw(inst, r) > inst.domain_budget + 1e-6) if len(inst.domains)
                  else np.zeros(0, dtype=np.int64))
        if len(over_p) == 0 and len(over_d) == 0:
            break
        if len(over_p):
            cand = np.flatnonzero((inst.pair_p == over_p[0]) & (r > 0))
        else:
            cand = np.flatnonzero((inst.pool_domain[inst.pair_p] == over_d[0]) & (r > 0))
        cover = np.bincount(inst.pair_m, weights=inst.cap * r, minlength=len(inst.deployments))
        slack = cover[inst.pair_m[cand]] - inst.need[inst.pair_m[cand]]
        # prefer replicas whose deployment has surplus cover, then the least cover per device
        no_surplus = (slack < inst.cap[cand]).astype(np.int64)
        k = int(cand[np.lexsort((inst.cap[cand] / inst.dev[cand], no_surplus))[0]])
        r[k] -= 1
    return greedy_replicas(inst, start=r)


# -- 4. CP-SAT polish on small components -------------------------------------------------------


@dataclass
class CpModel:
    model: cp_model.CpModel
    r: dict[int, cp_model.IntVar]
    scale: float


def build_model(inst: Instance, ms: IntArray, hint: IntArray) -> CpModel:
    """CP-SAT model of one component (deployments ``ms`` and their pairs), hinted with ``hint``."""
    model = cp_model.CpModel()
    ks = np.flatnonzero(np.isin(inst.pair_m, ms))
    rho = missing_min_penalty(inst)
    # r[k] = replicas of deployment pair_m[k] in pool pair_p[k]
    r = {int(k): model.new_int_var(0, int(inst.ub[k]), f"r_{k}")
         for k in ks}
    terms: list[cp_model.LinearExprT] = []
    coefs: list[int] = []
    for k, var in r.items():
        r0 = int(inst.r0[k])
        # dev[k] = |r[k] - r0[k]|: replicas added or removed
        dev = model.new_int_var(0, max(int(inst.ub[k]), r0), f"d_{k}")
        model.add(dev >= var - r0)
        model.add(dev >= r0 - var)
        terms += [var, dev]
        coefs += [round(inst.obj_cost[k] * COST_SCALE), round(inst.dis[k] * COST_SCALE)]
        model.add_hint(var, int(min(max(hint[k], 0), inst.ub[k])))
    for m in ms.tolist():
        mk = [int(k) for k in inst.pairs_of(m) if int(k) in r]
        need = math.ceil(inst.need[m] * CAP_SCALE)
        # short[m] = unmet need, in 1/CAP_SCALE tokens/s
        short = model.new_int_var(0, need, f"short_{inst.deployments[m]}")
        # demand with headroom: capacities in 1/CAP_SCALE tokens/s, rounded down (safe side)
        model.add(sum(math.floor(inst.cap[k] * CAP_SCALE) * r[k] for k in mk) + short >= need)
        count = sum(r[k] for k in mk)
        model.add(count <= int(inst.max_r[m]))
        # miss[m] = replicas below min_replicas
        miss = model.new_int_var(0, int(inst.min_r[m]), f"miss_{inst.deployments[m]}")
        model.add(count + miss >= int(inst.min_r[m]))
        terms += [short, miss]
        coefs += [max(1, round(inst.short_price[m] * COST_SCALE / CAP_SCALE)), round(rho[m] * COST_SCALE)]
    pools = sorted({int(inst.pair_p[k]) for k in r})
    for p in pools:
        if math.isinf(inst.pool_devices[p]):
            continue
        # pool capacity in devices
        model.add(sum(int(inst.dev[k]) * r[k] for k in r if inst.pair_p[k] == p) <= int(inst.pool_devices[p]))
    for d in range(len(inst.domains)):
        if math.isinf(inst.domain_budget[d]):
            continue
        in_d = [k for k in r if inst.pool_domain[inst.pair_p[k]] == d]
        if in_d:
            # power budget in 1/POWER_SCALE W, rounded up per replica (safe side)
            model.add(sum(math.ceil(inst.power[k] * POWER_SCALE) * r[k] for k in in_d)
                      <= math.floor(inst.domain_budget[d] * POWER_SCALE))
    model.minimize(sum(c * t for c, t in zip(coefs, terms, strict=True)))
    return CpModel(model, r, COST_SCALE)


def solve(cp: CpModel, config: PlacementConfig) -> tuple[SolverStatus, dict[int, int], float, float]:
    """Run CP-SAT with the time limits; (status, values, bound in $/h, wall s)."""
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = config.time_limit_s
    solver.parameters.max_deterministic_time = config.deterministic_time_limit
    solver.parameters.num_workers = config.num_workers
    solver.parameters.random_seed = 0
    status = solver.solve(cp.model)
    name = SolverStatus(solver.status_name(status)) if solver.status_name(status) in SolverStatus.__members__ else (
        SolverStatus.UNKNOWN)
    values: dict[int, int] = {}
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        values = {k: int(solver.value(v)) for k, v in cp.r.items()}
    return name, values, solver.best_objective_bound / cp.scale, solver.wall_time


# -- the policy -------------------------------------------------------------------------------


def optimise(inst: Instance, config: PlacementConfig) -> Solution:
    """Relax, price, decompose, repair, then polish small components with CP-SAT."""
    if inst.n_pairs == 0:
        r = np.zeros(0, dtype=np.int64)
        return Solution(r, evaluate(inst, r).objective, evaluate(inst, r).objective, SolverStatus.NOT_RUN, 0.0, "none")
    lp = relax(inst)
    wall = lp.wall_s
    if not lp.optimal:
        r = greedy_replicas(inst)
        return Solution(r, evaluate(inst, r).objective, -math.inf, SolverStatus.UNKNOWN, wall * 1000, "greedy")
    priced = priced_costs(inst, lp)
    # big spenders first: they have the most to lose from a crowded pool
    spend = np.bincount(inst.pair_m, weights=priced * lp.x, minlength=len(inst.deployments))
    order = sorted(range(len(inst.deployments)), key=lambda m: (-spend[m], m))
    start = np.floor(lp.x + 1e-9).astype(np.int64)  # floor of a feasible LP point keeps every <= row
    known: dict[int, float] = {}
    known_fit: dict[int, bool] = {}
    r = sequential(inst, priced, start, order, config.bnb_node_limit, known, known_fit)  # round at LP prices
    terms = lagrangian_terms(inst, lp, config.bnb_node_limit, known)
    # improve at true costs; a deployment already at its unrestricted optimum with no priced pool is final
    unpriced = np.bincount(inst.pair_m, weights=(priced > inst.obj_cost + 1e-12).astype(np.float64),
                           minlength=len(inst.deployments)) == 0
    settled = {m for m in known if unpriced[m] and known_fit.get(m, False)}
    r = sequential(inst, inst.obj_cost, r, [m for m in order if m not in settled], config.bnb_node_limit)
    if violations(inst, r):
        r = repair(inst, r)
    comps = components(inst)
    bound = 0.0
    method = "lp+lagrangian+bnb"
    status = SolverStatus.FEASIBLE
    for ms, ps in comps:
        comp_bound = lagrangian_bound(inst, lp, terms, ms, ps)
        ks = np.flatnonzero(np.isin(inst.pair_m, ms))
        comp_obj = _comp_obj(inst, r, ks)
        proven = comp_obj - comp_bound <= config.polish_gap * max(abs(comp_obj), 1e-9)
        if 0 < len(ks) <= config.cpsat_max_pairs and not proven:
            hint = r if _comp_obj(inst, r, ks) <= _comp_obj(inst, inst.r0, ks) else inst.r0
            cp = build_model(inst, ms, hint)
            st, values, cp_bound, cp_wall = solve(cp, config)
            wall += cp_wall
            if values:
                cand = r.copy()
                for k, v in values.items():
                    cand[k] = v
                if not violations(inst, cand) and _comp_obj(inst, cand, ks) < _comp_obj(inst, r, ks) - 1e-9:
                    r = cand
                method = "lp+lagrangian+bnb+cpsat"
            # CP-SAT's own bound is for its integer-rounded (slightly tighter) model, so it is not
            # a valid bound here: only the Lagrangian bound is reported
            del st, cp_bound
        bound += comp_bound
    objective = evaluate(inst, r).objective
    bound = min(bound, objective)
    if objective - bound <= 1e-6 * max(1.0, abs(objective)):
        status = SolverStatus.OPTIMAL
    return Solution(r, objective, bound, status, wall * 1000, method, lp_bound=lp.objective)


def _comp_obj(inst: Instance, r: IntArray, ks: IntArray) -> float:
    """Objective restricted to one component (its pairs and deployments)."""
    ms = np.unique(inst.pair_m[ks])
    sub = np.zeros_like(r)
    sub[ks] = r[ks]
    ev = evaluate(inst, sub)
    other = np.setdiff1d(np.arange(len(inst.deployments)), ms)
    rho = missing_min_penalty(inst)
    outside = float(inst.short_price[other] @ ev.shortfall[other]) + float(rho[other] @ ev.missing_min[other])
    outside += float(inst.dis[np.setdiff1d(np.arange(inst.n_pairs), ks)] @ inst.r0[
        np.setdiff1d(np.arange(inst.n_pairs), ks)])
    return ev.objective - outside


def plan_placement(
    snapshot: Snapshot,
    config: PlacementConfig | None = None,
    state: PlacementState | None = None,
    *,
    profiles: ProfileTable | None = None,
    clock: Clock | None = None,
) -> Plan:
    """Replicas per (deployment, pool) for the forecast ``snapshot.demand``; see the module docstring."""
    config = config or PlacementConfig()
    state = state or PlacementState()
    t0 = clock() if clock else 0.0
    if not snapshot.deployments or not snapshot.pools:
        names = {d.name for d in snapshot.deployments}  # a deleted deployment's memory goes with it
        kept = state.model_copy(update={"first_seen": {k: v for k, v in state.first_seen.items() if k in names},
                                        "needs": {k: v for k, v in state.needs.items() if k in names}})
        return noop_plan(PolicyName.PLACEMENT, "no deployments or pools to place", kept.model_dump(mode="json"))
    inst = build_instance(snapshot, profiles or default_table(), config.instance_params())
    inst = with_need(inst, fallback_reserve(inst, snapshot, config.fallback_surge))
    inst, state = stabilise(inst, snapshot.now, config, state)
    try:
        sol = optimise(inst, config)
    except Exception as exc:  # a solver crash must not stop the fleet: fall back, and say so
        r = greedy_replicas(inst)
        return greedy_plan(inst, r, f"solver failed ({type(exc).__name__}: {exc}); greedy fallback", "greedy",
                           state=_next_state(state, inst, r))
    if violations(inst, sol.r) or sol.status == SolverStatus.UNKNOWN:
        r = greedy_replicas(inst)
        return greedy_plan(inst, r, f"solver ended {sol.status.value} without a valid plan; greedy fallback",
                           "greedy", state=_next_state(state, inst, r))
    solve_ms = (clock() - t0) * 1000 if clock else sol.solve_ms
    return to_plan(inst, sol, state, solve_ms, from_clock=clock is not None)


def fallback_reserve(inst: Instance, snapshot: Snapshot, surge: float) -> FloatArray:
    """Need with each fallback's burst reserve: ``surge`` x its large model's output demand, at the
    fallback's own target utilisation.

    Routing sends a burst's overflow to the fallback at once, but placement can only add fallback
    replicas that are ready a start-up later; sized for today's routed share alone, a fallback is
    scaled down in the quiet and the next burst queues on it (the fallback-under-load scenario).
    The large model runs near its target utilisation under routing, so a burst of ``1 + surge`` x
    its load overflows ``surge`` x its load onto the fallback. The reserve is ordinary need (priced
    like demand, bounded by the fallback's ``max_replicas`` and its pools), so it costs money in
    the quiet: ``fallback_surge = 0`` turns it off.
    """
    need = inst.need.copy()
    if surge <= 0:
        return need
    index = {name: m for m, name in enumerate(inst.deployments)}
    for dep in snapshot.deployments:
        if dep.fallback is None or dep.name not in index or dep.fallback.deployment not in index:
            continue
        fb = snapshot.deployment(dep.fallback.deployment)
        need[index[fb.name]] += surge * inst.demand_out[index[dep.name]] / max(fb.target_utilisation, 1e-6)
    return need


def stabilise(inst: Instance, now: float, config: PlacementConfig,
              state: PlacementState) -> tuple[Instance, PlacementState]:
    """Up fast, down slow (the HPA's scale-down stabilisation, on capacity rather than replicas).

    Need rises at once; it falls only to the highest raw need of the last ``scale_down_window_s``,
    and not below the current capacity until the deployment has been watched for a whole window,
    nor in a cycle whose raw need is above the last one (no scale-down into a rising trend: the
    window's history can predate a burst that has just begun).
    Every removed replica costs a cold start when the load comes back, and bursts arrive faster
    than replicas start. Returns the instance with the stabilised need and the state to carry on.
    """
    window = config.scale_down_window_s
    cover = np.bincount(inst.pair_m, weights=inst.cap * inst.r0, minlength=len(inst.deployments))
    need = inst.need.copy()
    first_seen: dict[str, float] = {}
    needs: dict[str, tuple[tuple[float, float], ...]] = {}
    for m, name in enumerate(inst.deployments):
        t0 = min(state.first_seen.get(name, now), now)
        recent = tuple((t, v) for t, v in state.needs.get(name, ()) if 0.0 <= now - t < window)
        raw = float(inst.need[m])
        floor = max((v for _, v in recent), default=0.0)
        rising = bool(recent) and raw > recent[-1][1]
        if now - t0 < window or rising:  # warming up, or need growing: never remove capacity now
            floor = max(floor, float(cover[m]))
        need[m] = max(raw, floor)
        first_seen[name] = t0
        needs[name] = (*recent, (now, round(raw, 3)))
    return with_need(inst, need), state.model_copy(update={"first_seen": first_seen, "needs": needs})


def to_plan(inst: Instance, sol: Solution, state: PlacementState, solve_ms: float, from_clock: bool = False) -> Plan:
    metrics = plan_metrics(inst, sol.r)
    metrics["lp_bound"] = round(sol.lp_bound, 6)
    metrics["solve_ms_from_clock"] = 1.0 if from_clock else 0.0
    actions = replica_actions(inst, sol.r)
    short = metrics["shortfall_tokens_per_s"] > 1e-6
    if short:
        reason = Reason.INSUFFICIENT_CAPACITY
        worst = np.argsort(-evaluate(inst, sol.r).shortfall)[:3]
        names = ", ".join(inst.deployments[int(m)] for m in worst if evaluate(inst, sol.r).shortfall[m] > 0)
        summary = (f"best partial plan: {metrics['shortfall_tokens_per_s']:.0f} tokens/s of need cannot be served "
                   f"within pool capacity and power budgets (short: {names}); {len(actions)} change(s)")
    elif actions:
        reason = Reason.DEMAND_CHANGED
        summary = (f"{len(actions)} replica set(s) changed ({metrics['replica_changes']:.0f} replicas) to meet "
                   f"forecast demand at ${metrics['cost_per_hour']:.2f}/h")
    else:
        reason = Reason.NO_CHANGE
        summary = f"current placement is already the best found (${metrics['cost_per_hour']:.2f}/h)"
    return Plan(
        policy=PolicyName.PLACEMENT,
        actions=actions,
        explanation=Explanation(
            reason=reason, summary=summary, objective=round(sol.objective, 6), bound=round(sol.bound, 6),
            solver_status=sol.status, solve_ms=round(solve_ms, 3), metrics=metrics,
        ),
        state=_next_state(state, inst, sol.r),
    )


def _next_state(state: PlacementState, inst: Instance, r: IntArray) -> dict[str, object]:
    ev = evaluate(inst, r)
    return PlacementState(
        cycles=state.cycles + 1, last_objective=round(ev.objective, 6), last_plan_cost=round(ev.cost_per_hour, 6),
        first_seen=state.first_seen, needs=state.needs,
    ).model_dump(mode="json")
