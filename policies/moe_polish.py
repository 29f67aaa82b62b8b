"""CP-SAT polish of one layer's placement: the same replica counts, fewer copies.

The heuristic decides replica counts and a placement greedily. With counts fixed, each replica's
load is a constant, and finding the placement that needs the fewest copies while no device exceeds
a load cap is a small assignment problem. It is solved as a large-neighbourhood step: only the
experts the heuristic touched (added or removed somewhere) are free; everything else stays put.
The heuristic's placement is the hint, so the result is never worse than the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from ortools.sat.python import cp_model

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

LOAD_SCALE = 100_000  # a device's load cap maps to this many integer units


@dataclass(frozen=True)
class PolishModel:
    model: cp_model.CpModel
    x: dict[tuple[int, int], cp_model.IntVar]  # x[g, e] = 1 if free expert e has a replica on device g
    free: list[int]
    fixed: list[set[int]]  # per device, experts that stay where the heuristic put them


@dataclass(frozen=True)
class PolishResult:
    sets: list[set[int]] | None  # per-device expert sets, None when the solver found nothing better
    status: str
    copies_before: int
    copies_after: int
    wall_s: float


def build_model(
    w: FloatArray, carried: IntArray, heuristic: IntArray, allowed: BoolArray, load_cap: float
) -> PolishModel:
    """CP-SAT model for one layer (``[G, S]`` slot tables); ``load_cap`` bounds every device's load."""
    devices, per = heuristic.shape
    before = [set(int(e) for e in row if e >= 0) for row in carried]
    after = [set(int(e) for e in row if e >= 0) for row in heuristic]
    counts = np.zeros(w.shape[0], dtype=np.int64)
    for s in after:
        for e in s:
            counts[e] += 1
    free = sorted({e for g in range(devices) for e in before[g] ^ after[g]})
    free_set = set(free)
    fixed = [{e for e in after[g] if e not in free_set} for g in range(devices)]
    unit = LOAD_SCALE / max(load_cap, 1e-300)
    model = cp_model.CpModel()
    # x[g, e] = 1 if free expert e has a replica on device g (only where allowed)
    x = {(g, e): model.new_bool_var(f"x_d{g}_e{e}") for g in range(devices) for e in free if allowed[e, g]}
    # every free expert keeps the heuristic's replica count (its per-replica load is then a constant)
    for e in free:
        model.add(sum(x[g, e] for g in range(devices) if (g, e) in x) == int(counts[e]))
    for g in range(devices):
        mine = [(e, x[g, e]) for e in free if (g, e) in x]
        # every slot holds an expert
        model.add(sum(v for _, v in mine) == per - len(fixed[g]))
        # the device stays under the load cap
        fixed_load = sum(round(float(w[e] / counts[e] * unit)) for e in fixed[g])
        # (+per absorbs rounding; the caller re-checks the real balancedness)
        model.add(sum(round(float(w[e] / counts[e] * unit)) * v for e, v in mine) <= LOAD_SCALE + per - fixed_load)
    # fewest copies: replicas on devices that did not hold the expert before
    model.minimize(sum(v for (g, e), v in x.items() if e not in before[g]))
    for (g, e), v in x.items():
        model.add_hint(v, 1 if e in after[g] else 0)
    return PolishModel(model=model, x=x, free=free, fixed=fixed)


def solve(pm: PolishModel, time_limit_s: float, seed: int = 0) -> tuple[cp_model.CpSolver, cp_model.CpSolverStatus]:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed
    return solver, solver.solve(pm.model)


def polish_layer(
    w: FloatArray,
    carried: IntArray,
    heuristic: IntArray,
    allowed: BoolArray,
    load_cap: float,
    time_limit_s: float,
) -> PolishResult:
    """Fewer copies for the same counts and a device load cap; None sets when nothing better was found."""
    before = [set(int(e) for e in row if e >= 0) for row in carried]
    after = [set(int(e) for e in row if e >= 0) for row in heuristic]
    copies_before = sum(len(after[g] - before[g]) for g in range(len(after)))
    pm = build_model(w, carried, heuristic, allowed, load_cap)
    if not pm.free:
        return PolishResult(None, "NOT_RUN", copies_before, copies_before, 0.0)
    solver, status = solve(pm, time_limit_s)
    name = solver.status_name(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return PolishResult(None, name, copies_before, copies_before, solver.wall_time)
    sets = [set(f) for f in pm.fixed]
    for (g, e), v in pm.x.items():
        if solver.value(v):
            sets[g].add(e)
    copies_after = sum(len(sets[g] - before[g]) for g in range(len(sets)))
    if copies_after >= copies_before:
        return PolishResult(None, name, copies_before, copies_before, solver.wall_time)
    return PolishResult(sets, name, copies_before, copies_after, solver.wall_time)


def sets_to_slots(carried: IntArray, sets: list[set[int]]) -> IntArray:
    """Slot table for per-device sets: experts already on a device keep their slot."""
    out = np.full(carried.shape, -1, dtype=np.int64)
    for g, want in enumerate(sets):
        kept = {int(e) for e in carried[g] if e >= 0} & want
        for k, e in enumerate(carried[g]):
            if int(e) in kept:
                out[g, k] = e
        new = sorted(want - kept)
        free = [k for k in range(carried.shape[1]) if out[g, k] < 0]
        for k, e in zip(free, new, strict=False):
            out[g, k] = e
    return out
