"""Defragmenting rescheduling: choose at most MNL migrations that leave the least fragmented capacity.

A naive CP-SAT model over every pod and node was worse than greedy in a prior prototype, so the
search is structured:

1. greedy best-single-move (``baselines/greedy_moves``): a strong warm start, each pod moved once;
2. NUMA form (VMs): a whole-cluster CP-SAT *flow* model over migration counts per (NUMA node, VM
   shape) — exact there, since NUMA nodes differ only in free capacity — hinted with greedy; it
   often proves the plan optimal, which the explanation reports;
3. large-neighbourhood search (``build_model``/``solve``): CP-SAT re-packs the pods of a few bins at
   device level, the MNL and PDBs counted against the snapshot's placement so LNS may also trade a
   greedy move for a better one; a result is kept only when the exact fragmentation improves;
4. the result is *executed* (``realise``: migrations in order, best-fit devices, evict-and-wait when
   a target is full) and polished with more single moves; if the search's executed plan is not
   better than greedy's, greedy's plan is used, so the plan is never worse than the warm start.

The gap is reported against a valid bound: a migration changes at most two bins, so at most
``2 * MNL`` bins can lose their fragment (in the NUMA form the remainders also sum to at least the
total free cores mod the VM size), or the flow model's proven bound when it is stronger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from ortools.sat.python import cp_model

from policies.baselines.first_fit import pending_placeable
from policies.baselines.greedy_moves import MoveBudget, greedy_moves, join_delta
from policies.fragmentation import WHOLE, Form, Packing, Signature, TaskClass, apply_moves
from policies.plan import Explanation, MigratePod, Plan, PolicyName, Reason, SolverStatus
from policies.snapshot import Frozen, NonNegFloat, NonNegInt, PosFloat, PosInt, Snapshot

Clock = Callable[[], float]
LNS_PATIENCE = 64  # neighbourhood picks in a row that repeat one already solved before the LNS stops


class RescheduleConfig(Frozen):
    """Knobs of the rescheduler; defaults suit a cycle of a few seconds."""

    form: Form = Form.GPU
    mnl: NonNegInt = 10  # migration number limit per plan
    time_limit_s: PosFloat = 5.0  # the whole call (with a clock); CP-SAT deterministic seconds without one
    vm_cores: PosInt = 16  # NUMA form: the VM size whose unusable cores count as fragment
    pending_weight: NonNegFloat = 4.0  # a pending pod counts this many times in the FGD task mix
    neighbourhood_bins: PosInt = 8  # bins re-packed together in one LNS step
    sub_time_limit_s: PosFloat = 0.5  # per neighbourhood solve
    max_lns_steps: PosInt = 100_000  # also bounds the run when no clock is given
    seed: int = 0  # neighbourhood choice
    workers: PosInt = 1  # CP-SAT workers per neighbourhood (the host has 2 shared cores)
    use_lns: bool = True
    # 1-exchange over greedy's moves (drop one, refill greedily): at most this many trials, each a full
    # greedy pass; with a clock also bounded by 45 % of the time limit
    exchange_trials: NonNegInt = 20
    # Only plan when a pending pod cannot be placed as things stand: the controller's trigger (moving
    # running pods only to lower a fragmentation score is churn no one asked for); benchmarks plan on
    # any snapshot.
    require_pending: bool = False


class RescheduleState(Frozen):
    """Memory between cycles: the fragmentation the last plan aimed at (for the operator's trend)."""

    cycles: NonNegInt = 0
    last_frag_rate: float | None = None


@dataclass
class Search:
    """What one run found, for the explanation."""

    frag_before: float
    frag_greedy: float
    greedy_steps: int
    lns_steps: int = 0
    lns_accepted: int = 0
    solver_s: float = 0.0
    statuses: dict[str, int] | None = None
    flow_status: SolverStatus = SolverStatus.NOT_RUN
    flow_accepted: bool = False
    flow_bound: float | None = None  # proven lower bound on the fragment from the whole-cluster model
    polish_steps: int = 0
    exchange_trials: int = 0
    exchange_accepted: int = 0


def plan_reschedule(
    snapshot: Snapshot, config: RescheduleConfig, state: RescheduleState | None = None, clock: Clock | None = None
) -> Plan:
    """Emit at most ``config.mnl`` ``MigratePod`` actions that lower fragmentation; honour PDBs and do-not-move."""
    # The budget covers the whole call: greedy and the final polish may use 85% of it, the CP-SAT
    # search stops at 70%, and the rest is kept for ordering and scoring the moves.
    start = clock() if clock is not None else 0.0
    state = state or RescheduleState()
    packing = Packing.from_snapshot(snapshot, config.form, vm_cores=config.vm_cores,
                                    pending_weight=config.pending_weight)
    budget = budget_of(snapshot, config.mnl)
    before = packing.copy()
    if config.require_pending:
        waiting = sum(1 for at in packing.assign if at < 0)
        if waiting == 0 or pending_placeable(packing)[0] == waiting:
            idle = to_plan(before, before, [], config, state, Search(before.fragment(), before.fragment(), 0))
            why = "no pending pod waits for room" if waiting == 0 else f"all {waiting} pending pod(s) fit already"
            return idle.model_copy(update={"explanation": idle.explanation.model_copy(update={
                "summary": f"{why}: nothing to reschedule (fragmentation {before.frag_rate():.3f})"})})

    def past(share: float) -> Callable[[], bool]:
        return lambda: clock is not None and clock() >= start + share * config.time_limit_s

    out_of_time, search_over = past(0.85), past(0.7)

    def time_left() -> float:
        return max(start + 0.7 * config.time_limit_s - clock(), 0.0) if clock is not None else config.time_limit_s

    steps = greedy_moves(packing, budget, out_of_time)
    search = Search(before.fragment(), packing.fragment(), steps, statuses={})
    greedy = packing.copy()
    if config.exchange_trials and config.mnl > 0 and config.form is Form.GPU:
        packing = improve_exchange(before, packing, budget, config.exchange_trials, search, past(0.45))
    if config.form is Form.NUMA and config.mnl > 0 and not search_over():
        packing = improve_flow(before, packing, budget, config, search, time_left if clock is not None else None)
    proven = search.flow_bound is not None and packing.fragment() <= search.flow_bound + 1e-9
    if config.use_lns and config.mnl > 0 and not proven:
        packing = improve_lns(packing, budget, config, search, search_over, time_left if clock is not None else None)
    # The plan names nodes, not devices: score what the moves give when run one by one with the
    # scheduler's best-fit device choice, and keep the greedy plan if the search's is not better then.
    realised, order = realise(before, packing)
    if search.lns_accepted or search.flow_accepted or search.exchange_accepted:
        fallback, fallback_order = realise(before, greedy)
        if realised.fragment() > fallback.fragment() + 1e-9:
            realised, order = fallback, fallback_order
            search.lns_accepted = search.exchange_accepted = 0
            search.flow_accepted = False
    # Executed moves can land on other devices than the search assumed (a pod moved twice by greedy
    # migrates once): polish the executed state with more single moves while they help.
    for _ in range(3):
        extra = realised.copy()
        if greedy_moves(extra, budget, out_of_time) == 0:
            break
        polished, polished_order = realise(before, extra)
        if polished.fragment() >= realised.fragment() - 1e-9:
            break
        realised, order = polished, polished_order
        search.polish_steps += 1
    return to_plan(before, realised, order, config, state, search)


def budget_of(snapshot: Snapshot, mnl: int) -> MoveBudget:
    """MNL plus per-PDB allowances (``max_unavailable`` pods of a PDB may be away at once)."""
    return MoveBudget(mnl=mnl, pdb_left={p.name: p.max_unavailable for p in snapshot.pdbs})


# -- 1-exchange over the greedy moves ------------------------------------------------------------

def improve_exchange(
    before: Packing, current: Packing, budget: MoveBudget, max_trials: int, search: Search,
    out_of_time: Callable[[], bool],
) -> Packing:
    """Drop one migration of the plan and let greedy refill the freed slot; keep the first exchange that
    lowers the executed fragment, and start over from it.

    Why: greedy commits to its best move at each step, and an early move can lose its value once later
    moves are made (its target fills up, or a better pod for the same slot appears). Trying the latest
    moves first is cheapest to win: they gained least. Each trial replays the other moves on a fresh
    copy (eviction semantics, best-fit devices) and runs a full greedy pass, so trials are few.
    """
    best, order = realise(before, current)
    best_frag = best.fragment()
    while search.exchange_trials < max_trials and not out_of_time():
        moves = [(best.items[i].name, best.assign[i]) for i in order]
        improved = False
        for k in reversed(range(len(moves))):
            if search.exchange_trials >= max_trials or out_of_time():
                break
            search.exchange_trials += 1
            trial = before.copy()
            apply_moves(trial, moves[:k] + moves[k + 1:])
            greedy_moves(trial, budget, out_of_time)
            got, got_order = realise(before, trial)
            if got.fragment() < best_frag - 1e-9:
                best, order, best_frag = got, got_order, got.fragment()
                search.exchange_accepted += 1
                improved = True
                break
        if not improved:
            break
    if not search.exchange_accepted:
        return current
    # hand the search the executed result, with its log in executed order
    best.log = list(order)
    return best


# -- whole-cluster flow model (NUMA form) ---------------------------------------------------------

ShapeKey = tuple[int, int, str | None]  # (cpu_milli, memory_mib, pdb): items the flow model treats as alike


@dataclass
class FlowModel:
    """CP-SAT over migration counts per (bin, item shape): exact when bins only differ in free capacity.

    NUMA bins of VMs have no per-device packing and no affinity, so which VM of a shape moves, and
    where exactly it lands among equal choices, does not change the outcome: the model needs
    ``2 x bins x shapes`` integers instead of ``items x bins`` booleans and can prove a bound.
    """

    model: cp_model.CpModel
    shapes: list[ShapeKey]
    out: dict[tuple[int, int], cp_model.IntVar]
    into: dict[tuple[int, int], cp_model.IntVar]
    scale: int


def build_flow_model(before: Packing, hint: Packing, budget: MoveBudget) -> FlowModel:
    """Migrations from the snapshot's placement ``before``; ``hint`` (the greedy result) seeds the search."""
    m = cp_model.CpModel()
    movable = [i for i, it in enumerate(before.items) if it.movable and before.assign[i] >= 0]
    shapes = sorted({_shape_key(before, i) for i in movable}, key=lambda k: (k[0], k[1], k[2] or ""))
    index = {k: s for s, k in enumerate(shapes)}
    count: dict[tuple[int, int], int] = {}
    for i in movable:
        key = (before.assign[i], index[_shape_key(before, i)])
        count[key] = count.get(key, 0) + 1
    hint_out: dict[tuple[int, int], int] = {}
    hint_in: dict[tuple[int, int], int] = {}
    for i in hint.moved():
        s = index[_shape_key(hint, i)]
        hint_out[hint.items[i].origin, s] = hint_out.get((hint.items[i].origin, s), 0) + 1
        hint_in[hint.assign[i], s] = hint_in.get((hint.assign[i], s), 0) + 1
    cap = budget.mnl
    # out[b, s] = items of shape s that leave bin b; into[b, s] = items of shape s that arrive on bin b
    out: dict[tuple[int, int], cp_model.IntVar] = {}
    into: dict[tuple[int, int], cp_model.IntVar] = {}
    for b, bn in enumerate(before.bins):
        for s, (cpu, mem, _) in enumerate(shapes):
            if count.get((b, s)):
                out[b, s] = m.new_int_var(0, min(count[b, s], cap), f"out[{bn.name},{s}]")
            if bn.schedulable and cpu <= bn.cpu_milli and mem <= bn.memory_mib:
                room = min(bn.cpu_milli // cpu if cpu else cap, bn.memory_mib // mem if mem else cap)
                into[b, s] = m.new_int_var(0, min(room, cap), f"into[{bn.name},{s}]")
    # every item that leaves arrives somewhere (per shape)
    for s in range(len(shapes)):
        m.add(sum(v for (b, t), v in out.items() if t == s) == sum(v for (b, t), v in into.items() if t == s))
    # at most MNL migrations, and per PDB at most its allowance
    moves = sum(out.values())
    m.add(moves <= budget.mnl)
    for pdb in sorted({k[2] for k in shapes if k[2] is not None}):
        m.add(sum(v for (b, s), v in out.items() if shapes[s][2] == pdb) <= budget.pdb_left.get(pdb, 0))
    # capacity after the moves; the fragment is the free cores mod vm_cores per bin
    frag = []
    for b, bn in enumerate(before.bins):
        delta_cpu = sum(shapes[s][0] * (out.get((b, s), 0) - into.get((b, s), 0)) for s in range(len(shapes))
                        if (b, s) in out or (b, s) in into)
        delta_mem = sum(shapes[s][1] * (out.get((b, s), 0) - into.get((b, s), 0)) for s in range(len(shapes))
                        if (b, s) in out or (b, s) in into)
        cpu_free = before.cpu_free[b] + delta_cpu
        m.add(cpu_free >= 0)
        m.add(before.mem_free[b] + delta_mem >= 0)
        cores_max = bn.cpu_milli // 1000 + 1
        # cores[b] = whole free cores; rem[b] = cores mod vm_cores, the fragment of bin b
        cores = m.new_int_var(0, cores_max, f"cores[{bn.name}]")
        milli = m.new_int_var(0, 999, f"milli[{bn.name}]")
        m.add(cpu_free == 1000 * cores + milli)
        quot = m.new_int_var(0, cores_max // before.vm_cores + 1, f"quot[{bn.name}]")
        rem = m.new_int_var(0, before.vm_cores - 1, f"rem[{bn.name}]")
        m.add(cores == before.vm_cores * quot + rem)
        hint_free = hint.cpu_free[b]
        for var, value in ((cores, hint_free // 1000), (milli, hint_free % 1000),
                           (quot, hint_free // 1000 // before.vm_cores), (rem, hint_free // 1000 % before.vm_cores)):
            m.add_hint(var, value)
        frag.append(rem)
    whole_cores = all(it.cpu_milli % 1000 == 0 for it in before.items) and all(
        b.cpu_milli % 1000 == 0 for b in before.bins)
    if whole_cores:
        # redundant, helps the proof: the remainders add up to the (fixed) total free cores mod vm_cores
        total_cores = sum(c // 1000 for c in before.cpu_free)
        # wraps = how many times vm_cores fits in the sum of remainders
        wraps = m.new_int_var(0, len(before.bins), "wraps")
        m.add(sum(frag) == before.vm_cores * wraps + total_cores % before.vm_cores)
        m.add_hint(wraps, (sum(c // 1000 % before.vm_cores for c in hint.cpu_free) - total_cores % before.vm_cores)
                   // before.vm_cores)
    scale = budget.mnl + 1
    m.minimize(scale * sum(frag) + moves)  # fragment first, then fewer migrations
    for key, v in out.items():
        m.add_hint(v, hint_out.get(key, 0))
    for key, v in into.items():
        m.add_hint(v, hint_in.get(key, 0))
    return FlowModel(m, shapes, out, into, scale)


def _shape_key(p: Packing, i: int) -> ShapeKey:
    it = p.items[i]
    return (it.cpu_milli, it.memory_mib, it.pdb)


def solve_flow(
    flow: FlowModel, time_limit_s: float, workers: int, *, deterministic: bool = False
) -> tuple[SolverStatus, float, float | None, dict[tuple[int, int], int] | None, dict[tuple[int, int], int] | None]:
    """(status, wall s, fragment lower bound, out counts, into counts).

    ``deterministic`` limits CP-SAT's deterministic time instead of wall time (reproducible plans
    when the caller gives no clock)."""
    solver = cp_model.CpSolver()
    if deterministic:
        solver.parameters.max_deterministic_time = max(time_limit_s, 0.05)
        solver.parameters.max_time_in_seconds = 60.0 + 10 * time_limit_s  # a safety net only
    else:
        solver.parameters.max_time_in_seconds = max(time_limit_s, 0.05)
    solver.parameters.num_workers = workers
    code = solver.solve(flow.model)
    status = SolverStatus(solver.status_name(code))
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return status, solver.wall_time, None, None, None
    bound = max(0.0, float(-(-(solver.best_objective_bound - (flow.scale - 1)) // flow.scale)))
    out = {k: int(solver.value(v)) for k, v in flow.out.items()}
    into = {k: int(solver.value(v)) for k, v in flow.into.items()}
    return status, solver.wall_time, bound, out, into


def improve_flow(
    before: Packing, current: Packing, budget: MoveBudget, config: RescheduleConfig, search: Search,
    time_left: Callable[[], float] | None,
) -> Packing:
    """Solve the whole-cluster flow model from the greedy hint; keep its result if it is better."""
    flow = build_flow_model(before, current, budget)
    limit = time_left() if time_left is not None else config.time_limit_s
    status, wall, bound, out, into = solve_flow(flow, limit, config.workers, deterministic=time_left is None)
    search.solver_s += wall
    search.flow_status = status
    search.flow_bound = bound
    if out is None or into is None:
        return current
    trial = before.copy()
    by_shape: dict[int, list[int]] = {}
    for i, it in enumerate(before.items):
        if it.movable and before.assign[i] >= 0:
            by_shape.setdefault(flow.shapes.index(_shape_key(before, i)), []).append(i)
    leaving: dict[int, list[int]] = {}
    for (b, s), n in sorted(out.items()):
        taken = [i for i in by_shape.get(s, []) if before.assign[i] == b][:n]
        leaving.setdefault(s, []).extend(taken)
    arrivals: dict[int, list[int]] = {}
    for (b, s), n in sorted(into.items()):
        arrivals.setdefault(s, []).extend([b] * n)
    for s, items in leaving.items():
        targets = arrivals.get(s, [])
        for i in items:
            trial.remove(i)
        for i, b in zip(items, targets, strict=True):
            trial.place(i, b, ())
    feasible = all(c >= 0 for c in trial.cpu_free) and all(c >= 0 for c in trial.mem_free)
    better = trial.fragment() < current.fragment() - 1e-9 or (
        trial.fragment() <= current.fragment() + 1e-9 and len(trial.moved()) < len(current.moved()))
    if feasible and better:
        search.flow_accepted = True
        return trial
    return current


# -- large-neighbourhood search -------------------------------------------------------------------

class _Rng:
    """SplitMix64: a seeded generator, so the neighbourhoods (and the plan) follow from the inputs."""

    def __init__(self, seed: int) -> None:
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n if n > 0 else 0


def improve_lns(
    packing: Packing, budget: MoveBudget, config: RescheduleConfig, search: Search, out_of_time: Callable[[], bool],
    time_left: Callable[[], float] | None = None,
) -> Packing:
    """Re-pack small groups of bins with CP-SAT while time lasts; keep only exact improvements.

    A neighbourhood already re-packed since the last accepted change would give the same model again,
    so it is skipped; ``LNS_PATIENCE`` such picks in a row end the search (on a small cluster every
    pick is the whole cluster, and without a clock the tiny solves would otherwise repeat until the
    deterministic budget or ``max_lns_steps`` — minutes of Python for nothing)."""
    rng = _Rng(config.seed)
    solver_budget = config.time_limit_s
    statuses = search.statuses if search.statuses is not None else {}
    tried: set[tuple[int, ...]] = set()
    repeats = 0
    for _ in range(config.max_lns_steps):
        if out_of_time() or search.solver_s >= solver_budget:
            break
        bins = choose_neighbourhood(packing, config.neighbourhood_bins, rng)
        if len(bins) < 2:
            break
        if tuple(bins) in tried:
            repeats += 1
            if repeats >= LNS_PATIENCE:
                break
            continue
        tried.add(tuple(bins))
        repeats = 0
        search.lns_steps += 1
        sub = build_model(packing, bins, budget)
        if sub is None:
            continue
        left = max(solver_budget - search.solver_s, 0.01)
        # With a clock the wall budget rules; without one, deterministic time does (same input, same plan).
        wall_cap = max(time_left(), 0.01) if time_left is not None else None
        status, wall, det, assignment = solve(sub, min(config.sub_time_limit_s, left), config.workers,
                                              seed=rng.below(1 << 30), wall_cap_s=wall_cap)
        search.solver_s += wall if time_left is not None else det
        statuses[status.value] = statuses.get(status.value, 0) + 1
        if assignment is None:
            continue
        old_frag = sum(packing.bin_fragment(b) for b in bins)
        old_moved = sum(1 for i in assignment if packing.assign[i] != packing.items[i].origin)
        undo = {i: (packing.assign[i], packing.gpu_of[i]) for i in assignment}
        ok = _apply_assignment(packing, assignment)
        new_frag = sum(packing.bin_fragment(b) for b in bins)
        new_moved = sum(1 for i in assignment if packing.assign[i] != packing.items[i].origin)
        if ok and (new_frag < old_frag - 1e-9 or (new_frag <= old_frag + 1e-9 and new_moved < old_moved)):
            search.lns_accepted += 1
            tried.clear()  # the packing changed: every neighbourhood is worth another look
        else:
            _apply_assignment(packing, undo)
    return packing


def choose_neighbourhood(packing: Packing, size: int, rng: _Rng) -> list[int]:
    """Bins to re-pack together: a fragmented bin, the bins where its pods would fit best (what a
    single greedy move cannot exploit is several pods leaving together), sometimes both ends of a
    current migration (so LNS can trade a weak move for a better one when the MNL binds)."""
    live = [b for b in range(len(packing.bins)) if packing.bins[b].schedulable]
    frag = sorted(((packing.bin_fragment(b), b) for b in live), key=lambda fb: (-fb[0], fb[1]))
    hot = [b for f, b in frag if f > 0]
    if not hot:
        return []
    chosen: set[int] = set()
    moved = packing.moved()
    if moved and rng.below(3) == 0:
        i = moved[rng.below(len(moved))]
        chosen.update((packing.items[i].origin, packing.assign[i]))
    top = min(len(hot), max(4 * size, 64))
    seed = hot[rng.below(top)]
    chosen.add(seed)
    partners = _partners(packing, seed, live)
    picks = partners[: 2 * size]
    while len(chosen) < size and picks:
        chosen.add(picks.pop(rng.below(len(picks))))
    attempts = 0
    while len(chosen) < size and attempts < 8 * size:
        attempts += 1
        chosen.add(hot[rng.below(top)])
    return sorted(chosen)


def _partners(packing: Packing, seed: int, live: list[int]) -> list[int]:
    """Bins ranked by how much fragment the seed's movable pods would remove by joining them."""
    shapes = {packing.items[i].shape for i, at in enumerate(packing.assign) if at == seed and packing.items[i].movable}
    if not shapes:
        return []
    by_sig: dict[Signature, list[int]] = {}
    for b in live:
        if b != seed:
            by_sig.setdefault(packing.signature(b), []).append(b)
    scored: list[tuple[float, int]] = []
    for sig, members in by_sig.items():
        deltas = [d for d in (join_delta(packing, sig, shape) for shape in shapes) if d is not None]
        if deltas:
            scored.extend((min(deltas), b) for b in members[:2])
    return [b for _, b in sorted(scored)]


@dataclass
class SubModel:
    """A CP-SAT model re-packing the items of a few bins; ``x``/``dev`` map back to the packing."""

    model: cp_model.CpModel
    bins: list[int]
    items: list[int]
    x: dict[tuple[int, int], cp_model.IntVar]
    dev: dict[tuple[int, int, int], cp_model.IntVar]


def build_model(packing: Packing, bins: list[int], budget: MoveBudget) -> SubModel | None:
    """Re-pack the movable items now on ``bins`` among ``bins``; minimise fragment, then migrations."""
    m = cp_model.CpModel()
    in_nbhd = set(bins)
    items = sorted(i for i in range(len(packing.items)) if packing.assign[i] in in_nbhd and packing.items[i].movable)
    if not items:
        return None
    fixed_cpu = {b: packing.cpu_free[b] for b in bins}
    fixed_mem = {b: packing.mem_free[b] for b in bins}
    fixed_gpu = {b: list(packing.gpu_free[b]) for b in bins}
    for i in items:  # free capacity without the items being re-packed
        b, it = packing.assign[i], packing.items[i]
        fixed_cpu[b] += it.cpu_milli
        fixed_mem[b] += it.memory_mib
        for g in packing.gpu_of[i]:
            fixed_gpu[b][g] += it.gpu_milli
    groups = {b: _canonicalise(packing, b, fixed_gpu[b]) for b in bins}

    # x[i, b] = 1 if item i ends on bin b
    x: dict[tuple[int, int], cp_model.IntVar] = {}
    # dev[i, b, g] = 1 if item i uses device g of bin b
    dev: dict[tuple[int, int, int], cp_model.IntVar] = {}
    for i in items:
        it = packing.items[i]
        for b in bins:
            bn = packing.bins[b]
            if it.cpu_milli > fixed_cpu[b] or it.memory_mib > fixed_mem[b]:
                continue
            if it.num_gpu and ((it.gpu_model is not None and it.gpu_model != bn.model) or it.num_gpu > bn.gpus):
                continue
            if b != packing.assign[i] and not bn.schedulable:
                continue
            x[i, b] = m.new_bool_var(f"x[{it.name},{bn.name}]")
            if it.num_gpu:
                for g in range(bn.gpus):
                    if fixed_gpu[b][g] >= it.gpu_milli:
                        dev[i, b, g] = m.new_bool_var(f"dev[{it.name},{bn.name},{g}]")
                m.add(sum(dev[i, b, g] for g in range(bn.gpus) if (i, b, g) in dev) == it.num_gpu * x[i, b])
        # each item ends on exactly one bin
        m.add_exactly_one(x[i, b] for b in bins if (i, b) in x)

    # capacity: CPU and memory per bin, share per device
    cpu_free: dict[int, cp_model.LinearExpr] = {}
    for b in bins:
        here = [i for i in items if (i, b) in x]
        cpu_free[b] = fixed_cpu[b] - _weighted([x[i, b] for i in here], [packing.items[i].cpu_milli for i in here])
        m.add(cpu_free[b] >= 0)
        m.add(fixed_mem[b] - sum(packing.items[i].memory_mib * x[i, b] for i in items if (i, b) in x) >= 0)
    gpu_free: dict[tuple[int, int], cp_model.LinearExpr] = {}
    for b in bins:
        for g in range(packing.bins[b].gpus):
            on = [i for i in items if (i, b, g) in dev]
            gpu_free[b, g] = fixed_gpu[b][g] - _weighted([dev[i, b, g] for i in on],
                                                         [packing.items[i].gpu_milli for i in on])
            m.add(gpu_free[b, g] >= 0)
    # symmetry: devices with the same fixed load are interchangeable, so keep their free shares sorted
    for b in bins:
        for same in groups[b]:
            for g, h in pairwise(same):
                m.add(gpu_free[b, g] <= gpu_free[b, h])

    # migrations, counted against the snapshot's placement
    moved_terms: list[cp_model.LinearExpr] = []
    pdb_terms: dict[str, list[cp_model.LinearExpr]] = {}
    for i in items:
        it = packing.items[i]
        term = 1 - x[i, it.origin] if (i, it.origin) in x else cp_model.LinearExpr.constant(1)
        moved_terms.append(term)
        if it.pdb is not None:
            pdb_terms.setdefault(it.pdb, []).append(term)
    outside = [j for j in packing.moved() if packing.assign[j] not in in_nbhd]
    m.add(sum(moved_terms) <= budget.mnl - len(outside))
    for pdb, terms in pdb_terms.items():
        used_outside = sum(1 for j in outside if packing.items[j].pdb == pdb)
        m.add(sum(terms) <= budget.pdb_left.get(pdb, 0) - used_outside)

    frag_terms = _fragment_terms(m, packing, bins, cpu_free, gpu_free, fixed_mem, items, x)
    # objective: fragment first (scaled), then fewer migrations
    m.minimize(sum(frag_terms) * 1000 + sum(moved_terms))

    # hint: the current placement
    for (i, b), var in x.items():
        m.add_hint(var, packing.assign[i] == b)
    for (i, b, g), var in dev.items():
        m.add_hint(var, packing.assign[i] == b and g in packing.gpu_of[i])
    return SubModel(m, bins, items, x, dev)


def _fragment_terms(
    m: cp_model.CpModel, packing: Packing, bins: list[int], cpu_free: dict[int, cp_model.LinearExpr],
    gpu_free: dict[tuple[int, int], cp_model.LinearExpr], fixed_mem: dict[int, int], items: list[int],
    x: dict[tuple[int, int], cp_model.IntVar],
) -> list[cp_model.LinearExpr]:
    terms: list[cp_model.LinearExpr] = []
    if packing.form is Form.NUMA:
        for b in bins:
            cap_cores = packing.bins[b].cpu_milli // 1000 + 1
            # cores[b] = whole free cores of bin b; rem[b] = cores mod vm_cores (the fragment)
            cores = m.new_int_var(0, cap_cores, f"cores[{b}]")
            sub = m.new_int_var(0, 999, f"milli[{b}]")
            m.add(cpu_free[b] == 1000 * cores + sub)
            quot = m.new_int_var(0, cap_cores // packing.vm_cores + 1, f"quot[{b}]")
            rem = m.new_int_var(0, packing.vm_cores - 1, f"rem[{b}]")
            m.add(cores == packing.vm_cores * quot + rem)
            terms.append(rem)
        return terms
    mem_free = {b: fixed_mem[b] - sum(packing.items[i].memory_mib * x[i, b] for i in items if (i, b) in x)
                for b in bins}
    for b in bins:
        bn = packing.bins[b]
        devices = range(bn.gpus)
        if not bn.gpus:
            continue
        total = cp_model.LinearExpr.sum([gpu_free[b, g] for g in devices])
        big = WHOLE * bn.gpus
        below: dict[int, list[cp_model.IntVar]] = {}  # below[d][g] = 1 if device g has less than d milli free
        waste: dict[int, list[cp_model.IntVar]] = {}  # waste[d][g] >= free of device g when it is below d
        for t in model_mix(packing.mix):
            weight = round(t.weight * 1000)
            if weight == 0:
                continue
            if t.gpu_model is not None and t.gpu_model != bn.model:
                terms.append(weight * total)
                continue
            d = min(t.gpu_milli, WHOLE)
            if d not in below:
                below[d], waste[d] = [], []
                for g in devices:
                    now = packing.gpu_free[b][g]  # the hint: the current placement
                    lt = m.new_bool_var(f"below[{b},{g},{d}]")
                    m.add(gpu_free[b, g] + d * lt >= d)
                    z = m.new_int_var(0, WHOLE, f"waste[{b},{g},{d}]")
                    m.add(z >= gpu_free[b, g] - WHOLE * (1 - lt))
                    m.add_hint(lt, now < d)
                    m.add_hint(z, now if now < d else 0)
                    below[d].append(lt)
                    waste[d].append(z)
            # nofit = 1 if the task cannot run on bin b (then all its free GPU counts as fragment)
            nofit = m.new_bool_var(f"nofit[{b},{t}]")
            m.add(cpu_free[b] >= t.cpu_milli).only_enforce_if(nofit.Not())
            m.add(mem_free[b] >= t.memory_mib).only_enforce_if(nofit.Not())
            need = t.num_gpu if d >= WHOLE else 1
            m.add(sum(1 - lt for lt in below[d]) >= need).only_enforce_if(nofit.Not())
            # frag[b, t] = this task's unusable free GPU on bin b
            frag = m.new_int_var(0, big, f"frag[{b},{t}]")
            m.add(frag >= sum(waste[d]))
            m.add(frag >= total - big * (1 - nofit))
            free_now = packing.gpu_free[b]
            fits_now = (packing.cpu_free[b] >= t.cpu_milli and packing.mem_free[b] >= t.memory_mib
                        and sum(1 for f in free_now if f >= d) >= need)
            m.add_hint(nofit, not fits_now)
            m.add_hint(frag, sum(free_now) if not fits_now else sum(f for f in free_now if f < d))
            terms.append(weight * frag)
    return terms


def model_mix(mix: tuple[TaskClass, ...]) -> list[TaskClass]:
    """The task mix as the neighbourhood model sees it: classes with the same GPU request merged
    (weights added, CPU and memory of the heaviest member kept). Smaller models solve faster; the
    exact mix still decides, since every neighbourhood result is re-scored before it is kept."""
    merged: dict[tuple[int, int, str], list[TaskClass]] = {}
    for t in mix:
        merged.setdefault((t.num_gpu, t.gpu_milli, t.gpu_model or ""), []).append(t)
    out = []
    for _, members in sorted(merged.items()):
        head = max(members, key=lambda t: (t.weight, t.cpu_milli, t.memory_mib))
        out.append(TaskClass(head.num_gpu, head.gpu_milli, head.cpu_milli, head.memory_mib, head.gpu_model,
                             sum(t.weight for t in members)))
    return out


def _canonicalise(packing: Packing, b: int, fixed: list[int]) -> list[list[int]]:
    """Relabel bin ``b``'s devices so that devices with equal fixed load come in order of current free share.

    Device labels are internal (the plan names nodes, not devices) and fragmentation depends only on
    the multiset of free shares, so a consistent renaming of a bin's devices changes nothing real; it
    lets the model break device symmetry while the current placement (the hint) stays feasible.
    Returns the groups of interchangeable devices.
    """
    order = sorted(range(len(fixed)), key=lambda g: (fixed[g], packing.gpu_free[b][g], g))
    new_of = {old: new for new, old in enumerate(order)}
    packing.gpu_free[b] = [packing.gpu_free[b][old] for old in order]
    fixed[:] = [fixed[old] for old in order]
    for i, at in enumerate(packing.assign):
        if at == b and packing.gpu_of[i]:
            packing.gpu_of[i] = tuple(sorted(new_of[g] for g in packing.gpu_of[i]))
    groups: list[list[int]] = []
    for g in range(len(fixed)):
        if g and fixed[g] == fixed[g - 1]:
            groups[-1].append(g)
        else:
            groups.append([g])
    return [grp for grp in groups if len(grp) > 1]


def _weighted(variables: list[cp_model.IntVar], coefficients: list[int]) -> cp_model.LinearExpr:
    return cp_model.LinearExpr.weighted_sum(variables, coefficients)


def solve(
    sub: SubModel, time_limit_s: float, workers: int, *, seed: int = 0, wall_cap_s: float | None = None
) -> tuple[SolverStatus, float, float, dict[int, tuple[int, tuple[int, ...]]] | None]:
    """Solve a neighbourhood: (status, wall s, deterministic s, item -> (bin, devices)) or no assignment."""
    solver = cp_model.CpSolver()
    # Deterministic time makes a neighbourhood's answer reproducible (same snapshot, same plan); the
    # wall-clock limit only guards against a loaded machine.
    solver.parameters.max_deterministic_time = time_limit_s
    solver.parameters.max_time_in_seconds = min(3 * time_limit_s, wall_cap_s) if wall_cap_s else 60.0
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    code = solver.solve(sub.model)
    status = SolverStatus(solver.status_name(code))
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return status, solver.wall_time, solver.deterministic_time, None
    out: dict[int, tuple[int, tuple[int, ...]]] = {}
    for i in sub.items:
        b = next(b for b in sub.bins if (i, b) in sub.x and solver.value(sub.x[i, b]))
        devs = tuple(g for (j, bb, g), v in sub.dev.items() if j == i and bb == b and solver.value(v))
        out[i] = (b, devs)
    return status, solver.wall_time, solver.deterministic_time, out


def _apply_assignment(packing: Packing, assignment: dict[int, tuple[int, tuple[int, ...]]]) -> bool:
    for i in assignment:
        packing.remove(i)
    for i, (b, devs) in sorted(assignment.items()):
        packing.place(i, b, devs)
    ok = all(c >= 0 for c in packing.cpu_free) and all(c >= 0 for c in packing.mem_free)
    return ok and all(f >= 0 for gs in packing.gpu_free for f in gs)


# -- plan ---------------------------------------------------------------------------------------

def fragment_bound(before: Packing, mnl: int) -> float:
    """A valid lower bound on the fragment reachable with ``mnl`` migrations (see module docstring)."""
    frags = sorted((before.bin_fragment(b) for b in range(len(before.bins))), reverse=True)
    bound = sum(frags[2 * mnl:])
    if before.form is Form.NUMA and all(it.cpu_milli % 1000 == 0 for it in before.items) and \
            all(bn.cpu_milli % 1000 == 0 for bn in before.bins):
        bound = max(bound, float(int(before.free_capacity()) % before.vm_cores))
    return bound


def realise(before: Packing, after: Packing) -> tuple[Packing, list[int]]:
    """Order the migrations from ``before`` towards ``after`` and run them as the executor would.

    The search's own order is kept (replaying greedy's moves reproduces its device choices); a pod
    whose target has no room yet is evicted first and lands once a later migration makes room
    (:func:`apply_moves` semantics, e.g. for swaps). Pods land on best-fit devices, since a plan names
    nodes, not devices.
    """
    last = {i: k for k, i in enumerate(after.log)}
    order = sorted(after.moved(), key=lambda i: (last.get(i, len(last)), i))
    result = before.copy()
    apply_moves(result, [(after.items[i].name, after.assign[i]) for i in order])
    moved = set(result.moved())
    return result, [i for i in order if i in moved]


def to_plan(
    before: Packing, after: Packing, order: list[int], config: RescheduleConfig, state: RescheduleState,
    search: Search,
) -> Plan:
    """MigratePod actions in executable order, with the fragment reached, the bound and how it was found."""
    actions = [
        MigratePod(
            pod=after.items[i].name,
            from_node=before.bins[after.items[i].origin].node,
            to_node=after.bins[after.assign[i]].node,
            deployment=after.items[i].deployment,
            to_numa=after.bins[after.assign[i]].numa,
        )
        for i in order
    ]
    frag = after.fragment()
    bound = max(fragment_bound(before, config.mnl), search.flow_bound or 0.0)
    rate_before, rate_after = before.frag_rate(), after.frag_rate()
    placed, placed_gpus = pending_placeable(after)
    improved = search.lns_accepted > 0 or search.flow_accepted or search.exchange_accepted > 0
    status = SolverStatus.FEASIBLE if improved else SolverStatus.HEURISTIC
    if frag <= bound + 1e-9 and search.flow_status is not SolverStatus.NOT_RUN:
        status = SolverStatus.OPTIMAL  # the whole-cluster model proved it (possibly the greedy start itself)
    elif not improved and search.statuses and all(
            k in ("INFEASIBLE", "UNKNOWN", "MODEL_INVALID") for k in search.statuses):
        status = SolverStatus.UNKNOWN  # no neighbourhood solved in time: the greedy plan stands
    unit = "GPU milli" if config.form is Form.GPU else "cores"
    if actions:
        summary = (f"{len(actions)} migration(s) lower fragmentation {rate_before:.3f} -> {rate_after:.3f} "
                   f"({search.frag_before:.0f} -> {frag:.0f} {unit}; greedy {search.frag_greedy:.0f}, "
                   f"exchanges accepted {search.exchange_accepted}/{search.exchange_trials}, "
                   f"LNS accepted {search.lns_accepted}/{search.lns_steps} neighbourhoods; "
                   f"bound {bound:.0f}, solver {status.value})")
    else:
        summary = f"no migration lowers fragmentation ({rate_before:.3f}) within MNL {config.mnl}"
    explanation = Explanation(
        reason=Reason.FRAGMENTATION if actions else Reason.NO_CHANGE,
        summary=summary,
        objective=frag,
        bound=bound,
        solver_status=status,
        solve_ms=search.solver_s * 1000.0,
        fallback=None if improved or status is SolverStatus.OPTIMAL else "greedy",
        metrics={
            "frag_rate_before": rate_before,
            "frag_rate": rate_after,
            "fragment_before": search.frag_before,
            "fragment_greedy": search.frag_greedy,
            "migrations": float(len(actions)),
            "greedy_steps": float(search.greedy_steps),
            "lns_steps": float(search.lns_steps),
            "lns_accepted": float(search.lns_accepted),
            "flow_accepted": float(search.flow_accepted),
            "exchange_trials": float(search.exchange_trials),
            "exchange_accepted": float(search.exchange_accepted),
            "polish_rounds": float(search.polish_steps),
            "whole_gpus_free": float(after.whole_gpus_free()),
            "pending_placeable": float(placed),
            "pending_placeable_gpus": float(placed_gpus),
        },
    )
    next_state = RescheduleState(cycles=state.cycles + 1, last_frag_rate=rate_after)
    return Plan(policy=PolicyName.RESCHEDULE, actions=tuple(actions), explanation=explanation,
                state=next_state.model_dump(mode="json"))


__all__ = [
    "RescheduleConfig", "RescheduleState", "build_model", "fragment_bound", "plan_reschedule", "solve",
    "to_plan",
]
