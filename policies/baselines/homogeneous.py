"""The best homogeneous fleet: every deployment on one GPU type, the cheapest type that serves all.

The anchor for "does heterogeneity pay?". For each accelerator model in the snapshot's pools, the
deployments are placed only on pools of that type, with capacity and power budgets lifted (a
fleet of that type bought to fit the demand), by the same optimiser we use, so the difference
measured is the fleet mix, not the algorithm. The type that covers the most need, then costs
least, wins. Types on which some deployment does not fit lose on coverage.
"""

from __future__ import annotations

import numpy as np

from policies.placement_instance import Instance, IntArray, evaluate


def homogeneous_options(inst: Instance) -> dict[str, list[int]]:
    """Accelerator model -> pool indices of that type."""
    out: dict[str, list[int]] = {}
    for p, acc in enumerate(inst.pool_accelerator):
        out.setdefault(acc, []).append(p)
    return out


def best_homogeneous(
    unlimited: Instance, solve: object, *, restrict_to: list[str] | None = None,
) -> tuple[str, IntArray]:
    """(GPU type, replicas) of the best single-type fleet; ``solve(instance) -> replicas``.

    ``unlimited`` must be built with ``InstanceParams(unlimited_capacity=True)``.
    """
    assert callable(solve)
    best: tuple[float, float, str, IntArray] | None = None
    for acc, pools in sorted(homogeneous_options(unlimited).items()):
        if restrict_to is not None and acc not in restrict_to:
            continue
        sub = unlimited.restrict_pools(pools)
        r = np.asarray(solve(sub), dtype=np.int64)
        ev = evaluate(sub, r)
        key = (float(ev.shortfall.sum()), ev.cost_per_hour, acc, r)
        if best is None or key[:2] < best[:2]:
            best = key
    assert best is not None, "no pools"
    return best[2], best[3]
