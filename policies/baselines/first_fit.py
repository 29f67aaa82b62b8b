"""First-fit scheduling: the replay scheduler that fragments a cluster, and how pending pods get placed.

Kubernetes' default scheduler spreads; FGD's experiments replay the trace with simple packers and
watch fragmentation grow. First fit (lowest-indexed bin that fits, best-fit device inside it) is
the plain, reproducible one, and it is also how the benchmark decides which pending pods a plan
made placeable.
"""

from __future__ import annotations

from collections.abc import Iterable

from policies.fragmentation import Packing


def first_fit_bin(packing: Packing, i: int, bins: Iterable[int] | None = None) -> tuple[int, tuple[int, ...]] | None:
    """The first bin (in index order) item ``i`` fits, with its devices; None when none fits."""
    it = packing.items[i]
    for b in range(len(packing.bins)) if bins is None else bins:
        if it.cpu_milli > packing.cpu_free[b] or it.memory_mib > packing.mem_free[b]:
            continue
        if it.num_gpu and max(packing.gpu_free[b], default=0) < it.gpu_milli:
            continue
        gpus = packing.fit(i, b)
        if gpus is not None:
            return b, gpus
    return None


def place_first_fit(packing: Packing, order: Iterable[int]) -> list[int]:
    """Place the unplaced items in ``order`` first-fit, in place; return those placed."""
    placed = []
    for i in order:
        if packing.assign[i] >= 0:
            continue
        got = first_fit_bin(packing, i)
        if got is not None:
            packing.place(i, got[0], got[1])
            placed.append(i)
    return placed


def pending_placeable(packing: Packing) -> tuple[int, int]:
    """(pending pods, their GPUs) the scheduler could place now, first-fit in name order, on a copy."""
    trial = packing.copy()
    pending = [i for i, it in enumerate(trial.items) if trial.assign[i] < 0]
    placed = place_first_fit(trial, pending)
    return len(placed), sum(trial.items[i].num_gpu for i in placed)
