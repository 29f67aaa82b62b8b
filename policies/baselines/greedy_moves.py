"""Greedy best single move, repeated: the strong simple baseline and our warm start.

Each step takes the one migration that lowers total fragmentation most, until no move helps or the
migration limit is reached. A move's effect splits into "leave the source" plus "join the target",
and fragmentation depends only on a bin's free-capacity signature, so the best target per item
shape is a heap over distinct signatures rather than a scan over every node.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from policies.fragmentation import Packing, Signature, _choose_gpus

Shape = tuple[int, int, int, int, str | None]
SigKey = tuple[str, int, int, tuple[int, ...]]  # a signature made totally ordered (None model -> "")
EPS = 1e-9


@dataclass(frozen=True)
class MoveBudget:
    """How many migrations may still be used: in total (MNL) and per PodDisruptionBudget."""

    mnl: int
    pdb_left: Mapping[str, int]


def movable_items(packing: Packing) -> list[int]:
    return [i for i, it in enumerate(packing.items) if it.movable and it.origin >= 0 and packing.assign[i] >= 0]


def can_move(packing: Packing, i: int, moved: set[int], pdb_used: Mapping[str, int], budget: MoveBudget) -> bool:
    """A new migration must fit the MNL and its PDB. A pod migrates once per plan: moving it again would
    be one migration whose device choice differs from what the sequence assumed."""
    if i in moved:
        return False
    if len(moved) >= budget.mnl:
        return False
    pdb = packing.items[i].pdb
    return pdb is None or pdb_used.get(pdb, 0) < budget.pdb_left.get(pdb, 0)


def greedy_moves(packing: Packing, budget: MoveBudget, should_stop: Callable[[], bool] | None = None) -> int:
    """Apply best-single-moves to ``packing`` in place; return the number of steps taken."""
    items = movable_items(packing)
    if not items or budget.mnl <= 0:
        return 0
    shapes = sorted({packing.items[i].shape for i in items}, key=_shape_key)
    groups: dict[Signature, list[int]] = {}
    for b in range(len(packing.bins)):
        if packing.bins[b].schedulable:
            groups.setdefault(packing.signature(b), []).append(b)
    heaps: dict[Shape, list[tuple[float, SigKey, Signature]]] = {s: [] for s in shapes}
    for sig in groups:
        _push_signature(packing, heaps, sig)
    on_bin: dict[int, list[int]] = {}
    for i in items:
        on_bin.setdefault(packing.assign[i], []).append(i)
    leave: dict[int, float] = {}
    moved = set(packing.moved())
    pdb_used = _pdb_used(packing, moved)
    shape_of = {i: packing.items[i].shape for i in items}
    steps = 0
    while should_stop is None or not should_stop():
        lowest = {shape: _lower(heap, groups) for shape, heap in heaps.items()}  # best join per shape
        best: tuple[float, int, int] | None = None  # (delta, item, target bin)
        for i in items:
            low = lowest[shape_of[i]]
            gain = leave.get(i)
            if gain is None:
                gain = _leave_delta(packing, i)
                leave[i] = gain
            # prune: even the best join for this shape cannot make a better (or any) improving move
            if gain + low >= (best[0] if best is not None else 0.0) - EPS:
                continue
            if not can_move(packing, i, moved, pdb_used, budget):
                continue
            target = _best_target(heaps[shape_of[i]], groups, packing.assign[i])
            if target is None:
                continue
            delta = gain + target[0]
            if delta < -EPS and (best is None or delta < best[0] - EPS):
                best = (delta, i, target[1])
        if best is None:
            break
        _, i, b = best
        a = packing.assign[i]
        sig_a, sig_b = packing.signature(a), packing.signature(b)
        if not packing.move(i, b):  # signatures said it fits; keep going defensively
            break
        steps += 1
        it = packing.items[i]
        if i not in moved:
            moved.add(i)
            if it.pdb is not None:
                pdb_used[it.pdb] = pdb_used.get(it.pdb, 0) + 1
        elif b == it.origin:
            moved.discard(i)
            if it.pdb is not None:
                pdb_used[it.pdb] -= 1
        on_bin[a].remove(i)
        on_bin.setdefault(b, []).append(i)
        for bb, old in ((a, sig_a), (b, sig_b)):
            _regroup(packing, groups, heaps, bb, old)
            for j in on_bin.get(bb, []):
                leave.pop(j, None)
    return steps


def _pdb_used(packing: Packing, moved: set[int]) -> dict[str, int]:
    used: dict[str, int] = {}
    for i in moved:
        pdb = packing.items[i].pdb
        if pdb is not None:
            used[pdb] = used.get(pdb, 0) + 1
    return used


def _shape_key(s: Shape) -> tuple[int, int, int, int, str]:
    return (s[0], s[1], s[2], s[3], s[4] or "")


def _leave_delta(packing: Packing, i: int) -> float:
    """Fragment change of item ``i``'s bin when it leaves."""
    a = packing.assign[i]
    it = packing.items[i]
    before = packing.signature(a)
    free = list(packing.gpu_free[a])
    for g in packing.gpu_of[i]:
        free[g] += it.gpu_milli
    after: Signature = (before[0], before[1] + it.cpu_milli, before[2] + it.memory_mib, tuple(sorted(free)))
    return packing.signature_fragment(after) - packing.signature_fragment(before)


def join_delta(packing: Packing, sig: Signature, shape: Shape) -> float | None:
    """Fragment change of a bin with signature ``sig`` when an item of ``shape`` joins; None if it cannot."""
    cpu, mem, num_gpu, milli, model = shape
    if cpu > sig[1] or mem > sig[2] or (num_gpu and model is not None and model != sig[0]):
        return None
    free = list(sig[3])
    gpus = _choose_gpus(free, num_gpu, milli)
    if gpus is None:
        return None
    for g in gpus:
        free[g] -= milli
    after: Signature = (sig[0], sig[1] - cpu, sig[2] - mem, tuple(sorted(free)))
    return packing.signature_fragment(after) - packing.signature_fragment(sig)


def _push_signature(
    packing: Packing, heaps: dict[Shape, list[tuple[float, SigKey, Signature]]], sig: Signature
) -> None:
    for shape, heap in heaps.items():
        d = join_delta(packing, sig, shape)
        if d is not None:
            heapq.heappush(heap, (d, (sig[0] or "", sig[1], sig[2], sig[3]), sig))


def _regroup(
    packing: Packing, groups: dict[Signature, list[int]], heaps: dict[Shape, list[tuple[float, SigKey, Signature]]],
    b: int, old: Signature,
) -> None:
    if not packing.bins[b].schedulable:
        return
    members = groups.get(old)
    if members is not None and b in members:
        members.remove(b)
        if not members:
            del groups[old]
    new = packing.signature(b)
    if new in groups:
        groups[new].append(b)
        groups[new].sort()
    else:
        groups[new] = [b]
        _push_signature(packing, heaps, new)


def _lower(heap: list[tuple[float, SigKey, Signature]], groups: Mapping[Signature, list[int]]) -> float:
    while heap and heap[0][2] not in groups:
        heapq.heappop(heap)
    return heap[0][0] if heap else float("inf")


def _best_target(
    heap: list[tuple[float, SigKey, Signature]], groups: Mapping[Signature, list[int]], exclude: int
) -> tuple[float, int] | None:
    """Cheapest join over live signatures, skipping bin ``exclude`` (the item's own bin)."""
    popped: list[tuple[float, SigKey, Signature]] = []
    found: tuple[float, int] | None = None
    while heap:
        d, _, sig = heap[0]
        members = groups.get(sig)
        if members is None:
            heapq.heappop(heap)
            continue
        target = next((b for b in members if b != exclude), None)
        if target is not None:
            found = (d, target)
            break
        popped.append(heapq.heappop(heap))
    for entry in popped:
        heapq.heappush(heap, entry)
    return found
