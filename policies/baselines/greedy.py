"""Greedy cheapest-first placement (the Kthena-style anchor, and the solver's fallback).

For each deployment, largest need first, add replicas one at a time in the pool with the lowest
cost per token/s of capacity that still has room (devices, power budget, replica bounds), until
the need is covered; then top up to ``min_replicas``. It ignores the current placement, which
is how simple cost-greedy autoscalers behave and why they churn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.placement_instance import (
    Instance,
    InstanceParams,
    IntArray,
    build_instance,
    plan_metrics,
    replica_actions,
)
from policies.plan import Explanation, Plan, PolicyName, Reason, SolverStatus
from policies.profiles import ProfileTable, default_table
from policies.snapshot import Snapshot


def greedy_replicas(inst: Instance, start: IntArray | None = None) -> IntArray:
    """Replicas per pair chosen cheapest-first; ``start`` (default zero) is kept and topped up."""
    r = np.zeros(inst.n_pairs, dtype=np.int64) if start is None else start.astype(np.int64).copy()
    used = np.bincount(inst.pair_p, weights=inst.dev * r, minlength=len(inst.pools)).astype(np.float64)
    dom = inst.pool_domain
    draw = np.zeros(len(inst.domains))
    for j in np.flatnonzero(r):
        if dom[inst.pair_p[j]] >= 0:
            draw[dom[inst.pair_p[j]]] += inst.power[j] * r[j]
    ratio = np.where(inst.cap > 0, inst.cost / np.maximum(inst.cap, 1e-12), np.inf)
    order_m = sorted(range(len(inst.deployments)), key=lambda m: (-inst.need[m], inst.deployments[m]))
    for m in order_m:
        pairs = inst.pairs_of(m)
        pairs = pairs[np.argsort(ratio[pairs], kind="stable")]
        ks: list[int] = [int(k) for k in pairs[np.isfinite(ratio[pairs])]]
        covered = float(inst.cap[ks] @ r[ks]) if ks else 0.0
        total = int(r[inst.pairs_of(m)].sum())

        def room(k: int) -> bool:
            p = inst.pair_p[k]
            if r[k] >= inst.ub[k] or used[p] + inst.dev[k] > inst.pool_devices[p] + 1e-9:
                return False
            return not (dom[p] >= 0 and draw[dom[p]] + inst.power[k] > inst.domain_budget[dom[p]] + 1e-6)

        while total < inst.max_r[m] and (covered < inst.need[m] - 1e-9 or total < inst.min_r[m]):
            choice = next((k for k in ks if room(k)), None)
            if choice is None:
                break
            k = choice
            r[k] += 1
            total += 1
            covered += inst.cap[k]
            p = inst.pair_p[k]
            used[p] += inst.dev[k]
            if dom[p] >= 0:
                draw[dom[p]] += inst.power[k]
    return r


def plan_greedy(
    snapshot: Snapshot, params: InstanceParams | None = None, profiles: ProfileTable | None = None,
) -> Plan:
    """The greedy anchor as a policy: same contract, same instance, no solver."""
    inst = build_instance(snapshot, profiles or default_table(), params or InstanceParams())
    r = greedy_replicas(inst)
    return greedy_plan(inst, r, summary_prefix="greedy cheapest-first", fallback=None)


def greedy_plan(inst: Instance, r: IntArray, summary_prefix: str, fallback: str | None,
                state: dict[str, Any] | None = None) -> Plan:
    metrics = plan_metrics(inst, r)
    short = metrics["shortfall_tokens_per_s"] > 1e-6
    actions = replica_actions(inst, r)
    reason = (Reason.SOLVER_FALLBACK if fallback else
              Reason.INSUFFICIENT_CAPACITY if short else
              Reason.DEMAND_CHANGED if actions else Reason.NO_CHANGE)
    summary = (f"{summary_prefix}: {len(actions)} replica set(s) changed, cost ${metrics['cost_per_hour']:.2f}/h"
               + (f", {metrics['shortfall_tokens_per_s']:.0f} tokens/s of need unmet" if short else ""))
    return Plan(
        policy=PolicyName.PLACEMENT,
        actions=actions,
        explanation=Explanation(
            reason=reason, summary=summary, objective=metrics["objective"],
            solver_status=SolverStatus.HEURISTIC, fallback=fallback, metrics=metrics,
        ),
        state=state or {},
    )
