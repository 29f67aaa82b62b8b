"""A descheduler-like threshold evictor (the Kubernetes descheduler's HighNodeUtilization strategy).

HighNodeUtilization evicts pods from under-utilised nodes (all resources below ``thresholds``) so
that the scheduler, scored MostAllocated, packs them onto busier nodes. Its eviction caps
(``maxNoOfPodsToEvictPerNode``, ``maxNoOfPodsToEvictTotal`` = MNL) and PDBs bound it, and it only
evicts a pod that fits on some other node that is not under-utilised. This module simulates the
evictions and the scheduler's re-placement on a :class:`Packing`.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.baselines.greedy_moves import MoveBudget, can_move, movable_items
from policies.fragmentation import Form, Packing
from policies.plan import Explanation, MigratePod, Plan, PolicyName, Reason, SolverStatus
from policies.snapshot import Snapshot


@dataclass(frozen=True)
class DeschedulerConfig:
    threshold: float = 0.5  # a bin is under-utilised when its used share of every resource is below this
    max_per_node: int | None = None  # maxNoOfPodsToEvictPerNode
    max_total: int = 10  # maxNoOfPodsToEvictTotal (the MNL) when run as a policy
    form: Form = Form.GPU
    pending_weight: float = 4.0  # FGD task mix for the reported fragmentation, as RescheduleConfig


def plan_descheduler(snapshot: Snapshot, config: DeschedulerConfig = DeschedulerConfig()) -> Plan:
    """The baseline as a policy (same contract as ``plan_reschedule``, stateless): MigratePod actions."""
    before = Packing.from_snapshot(snapshot, config.form, pending_weight=config.pending_weight)
    after = before.copy()
    budget = MoveBudget(mnl=config.max_total, pdb_left={p.name: p.max_unavailable for p in snapshot.pdbs})
    descheduler_moves(after, budget, config)
    last = {i: k for k, i in enumerate(after.log)}
    order = sorted(after.moved(), key=lambda i: (last.get(i, len(last)), i))
    actions = tuple(
        MigratePod(pod=after.items[i].name, from_node=before.bins[after.items[i].origin].node,
                   to_node=after.bins[after.assign[i]].node, deployment=after.items[i].deployment,
                   to_numa=after.bins[after.assign[i]].numa)
        for i in order
    )
    rate_before, rate_after = before.frag_rate(), after.frag_rate()
    summary = (f"evicted {len(actions)} pod(s) from nodes below {config.threshold:.0%} use; "
               f"fragmentation {rate_before:.3f} -> {rate_after:.3f}")
    return Plan(
        policy=PolicyName.RESCHEDULE,
        actions=actions,
        explanation=Explanation(
            reason=Reason.FRAGMENTATION if actions else Reason.NO_CHANGE, summary=summary,
            objective=after.fragment(), solver_status=SolverStatus.HEURISTIC, fallback="descheduler",
            metrics={"frag_rate_before": rate_before, "frag_rate": rate_after, "migrations": float(len(actions))},
        ),
    )


def utilisation(packing: Packing, b: int) -> float:
    """Highest used share over the resources the form cares about (GPU and CPU, or CPU and memory)."""
    bn = packing.bins[b]
    cpu = 1 - packing.cpu_free[b] / bn.cpu_milli if bn.cpu_milli else 1.0
    mem = 1 - packing.mem_free[b] / bn.memory_mib if bn.memory_mib else 1.0
    if packing.form is Form.NUMA:
        return max(cpu, mem)
    gpu = 1 - sum(packing.gpu_free[b]) / (1000 * bn.gpus) if bn.gpus else 1.0
    return max(gpu, cpu)


def descheduler_moves(packing: Packing, budget: MoveBudget, config: DeschedulerConfig = DeschedulerConfig()) -> int:
    """Evict from under-utilised bins (least used first) and re-place MostAllocated; return migrations."""
    under = sorted(
        (b for b in range(len(packing.bins)) if utilisation(packing, b) < config.threshold),
        key=lambda b: (utilisation(packing, b), b),
    )
    under_set = set(under)
    targets = [b for b in range(len(packing.bins)) if b not in under_set and packing.bins[b].schedulable]
    movable = set(movable_items(packing))
    moved = set(packing.moved())
    pdb_used: dict[str, int] = {}
    done = 0
    for a in under:
        evicted_here = 0
        for i in sorted(i for i in movable if packing.assign[i] == a):
            if config.max_per_node is not None and evicted_here >= config.max_per_node:
                break
            if not can_move(packing, i, moved, pdb_used, budget):
                continue
            target = _most_allocated_fit(packing, i, targets)
            if target is None:
                continue
            packing.move(i, target)
            moved.add(i)
            pdb = packing.items[i].pdb
            if pdb is not None:
                pdb_used[pdb] = pdb_used.get(pdb, 0) + 1
            evicted_here += 1
            done += 1
    return done


def _most_allocated_fit(packing: Packing, i: int, targets: list[int]) -> int | None:
    best: tuple[float, int] | None = None
    for b in targets:
        if packing.fit(i, b) is None:
            continue
        score = utilisation(packing, b)
        if best is None or score > best[0]:
            best = (score, b)
    return best[1] if best else None
