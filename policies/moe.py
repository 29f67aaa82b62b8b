"""Elastic MoE expert redistribution: ``plan_moe(snapshot, config, state) -> Plan``.

For every MoE deployment with expert telemetry, decide whether to re-place experts and how:

* **what**: :func:`policies.moe_core.rebalance` starts from the current placement and changes as
  few slots as needed to come within ``slack`` of a from-scratch EPLB placement's balancedness
  (EPLB itself rewrites nearly every slot on any drift);
* **when**: scale events (EP size changed) and failed devices always re-plan; on load drift the
  plan is taken only when ``gain - copy_penalty * copies / slots >= rebalance_threshold`` and at
  least ``min_interval_s`` passed since the last rebalance (gain = balancedness after - before);
* **how**: :mod:`policies.moe_staging` turns the change into copy / switch / free rounds that never
  hold more than ``slots + spare_slots`` experts on a device and never leave an expert unplaced.

Devices of the new group: survivors in their old order (failed ones dropped, the highest ordinals
removed on scale-down, as a pod group shrinks), then fresh devices; ``device_origin`` in the action
says which old device each new one was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from pydantic import Field

from policies.moe_core import (
    EMPTY,
    balancedness,
    copies_per_device,
    copy_lower_bound,
    rebalance,
)
from policies.moe_staging import stage_layer
from policies.plan import (
    ExpertMigrationStep,
    ExpertMove,
    Explanation,
    MigrationStage,
    Plan,
    PolicyName,
    Reason,
    SetExpertPlacement,
    SolverStatus,
)
from policies.snapshot import (
    ExpertLoad,
    ExpertPlacement,
    Fraction,
    Frozen,
    ModelDeployment,
    NonNegFloat,
    PosInt,
    Snapshot,
)


class MoEConfig(Frozen):
    slack: Fraction = 0.001  # accept this much less balancedness than a from-scratch EPLB plan
    copy_penalty: NonNegFloat = 0.05  # balancedness worth rewriting every slot once (drift rule)
    spare_slots: PosInt = 1  # spare expert buffers per device during a migration
    hierarchical: bool = False  # keep each expert group on one node (gpus_per_node devices)
    gpus_per_node: PosInt = 8
    light_devices: PosInt = 8  # candidate receiving devices per improvement move
    polish_s: NonNegFloat = 0.0  # CP-SAT wall-time budget per plan to cut copies (0 = heuristic only)


class MoEState(Frozen):
    last_rebalance_s: Mapping[str, float] = Field(default_factory=dict)  # deployment -> snapshot.now


def plan_moe(
    snapshot: Snapshot,
    config: MoEConfig | None = None,
    state: MoEState | None = None,
    *,
    clock: Callable[[], float] | None = None,
) -> Plan:
    """Plan expert placements for every MoE deployment that reports expert loads.

    ``clock`` (seconds, e.g. ``time.perf_counter``) only measures solve time for the explanation.
    """
    config = config or MoEConfig()
    state = state or MoEState()
    loads = {x.deployment: x for x in snapshot.expert_loads}
    placements = {x.deployment: x for x in snapshot.expert_placements}
    actions: list[SetExpertPlacement] = []
    reasons: list[Reason] = []
    summaries: list[str] = []
    metrics: dict[str, float] = {}
    # only deployments that still exist: a deleted one's entry would ride along in every State forever
    names = {d.name for d in snapshot.deployments}
    last = {k: v for k, v in state.last_rebalance_s.items() if k in names}
    solve_s = 0.0
    for dep in snapshot.deployments:
        if dep.model.moe is None or dep.moe_elasticity is None or dep.name not in loads:
            continue
        t0 = clock() if clock else 0.0
        decision = _plan_deployment(snapshot, dep, loads[dep.name], placements.get(dep.name), config, last)
        solve_s += (clock() - t0) if clock else 0.0
        reasons.append(decision.reason)
        summaries.append(decision.summary)
        for k, v in decision.metrics.items():
            metrics[f"{dep.name}.{k}"] = v
        if decision.action is not None:
            actions.append(decision.action)
            last[dep.name] = snapshot.now
    reason = _overall_reason(reasons)
    summary = "; ".join(summaries) if summaries else "no MoE deployment reports expert loads"
    return Plan(
        policy=PolicyName.MOE,
        actions=tuple(actions),
        explanation=Explanation(
            reason=reason,
            summary=summary,
            objective=metrics.get(f"{actions[0].deployment}.balancedness_after") if actions else None,
            solver_status=SolverStatus.HEURISTIC if actions else SolverStatus.NOT_RUN,
            solve_ms=solve_s * 1000.0,
            fallback="copy-aware re-pack" if any(k.endswith(".fallback_layers") and v for k, v in metrics.items())
            else None,
            metrics=metrics,
        ),
        state=MoEState(last_rebalance_s=last).model_dump(),
    )


class _Decision(Frozen):
    reason: Reason
    summary: str
    action: SetExpertPlacement | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


def _overall_reason(reasons: list[Reason]) -> Reason:
    for r in (Reason.BAD_INPUT, Reason.DEVICE_FAILED, Reason.SCALE_EVENT, Reason.LOAD_DRIFT, Reason.STABILISING):
        if r in reasons:
            return r
    return Reason.NO_CHANGE


def _plan_deployment(
    snapshot: Snapshot,
    dep: ModelDeployment,
    load: ExpertLoad,
    placement: ExpertPlacement | None,
    config: MoEConfig,
    last: Mapping[str, float],
) -> _Decision:
    moe = dep.model.moe
    el = dep.moe_elasticity
    assert moe is not None and el is not None
    w = np.asarray(load.loads, dtype=np.float64)
    if w.shape != (moe.moe_layers, moe.experts):
        return _Decision(
            reason=Reason.BAD_INPUT,
            summary=f"{dep.name}: expert loads are {w.shape}, model has {moe.moe_layers} x {moe.experts}",
        )
    devices = min(max(dep.parallelism.ep, el.min_ep), el.max_ep)
    per = el.slots_per_device
    hierarchy = (moe.expert_groups, config.gpus_per_node) if config.hierarchical else None
    if devices * per < moe.experts:
        return _Decision(
            reason=Reason.BAD_INPUT,
            summary=f"{dep.name}: {devices} devices x {per} slots cannot hold {moe.experts} experts",
        )
    if placement is None:
        # first placement: every slot is empty, so repair + improve build it from scratch
        current = np.full((moe.moe_layers, devices, per), EMPTY, dtype=np.int64)
        first = rebalance(w, current, slack=config.slack, light_devices=config.light_devices, revert=False)
        return _emit(dep, w, current, first.slots, [*range(devices)], 0, config, Reason.SCALE_EVENT,
                     f"{dep.name}: initial placement on {devices} devices")
    cur = np.asarray(placement.phy2log, dtype=np.int64)
    if cur.shape != (moe.moe_layers, placement.devices * placement.slots_per_device):
        return _Decision(reason=Reason.BAD_INPUT, summary=f"{dep.name}: placement shape {cur.shape} does not match")
    if cur.size and (cur.min() < EMPTY or cur.max() >= moe.experts):
        return _Decision(
            reason=Reason.BAD_INPUT, summary=f"{dep.name}: placement names experts outside 0..{moe.experts - 1}"
        )
    cur = cur.reshape(moe.moe_layers, placement.devices, placement.slots_per_device)
    failed = set(placement.failed_devices)
    survivors = [g for g in range(placement.devices) if g not in failed][:devices]
    origin: list[int | None] = [*survivors, *([None] * (devices - len(survivors)))]
    if per < placement.slots_per_device:
        per = placement.slots_per_device  # slots never shrink under a running group
    if failed:
        reason, what = Reason.DEVICE_FAILED, f"devices {sorted(failed)} failed"
    elif devices != placement.devices or per != placement.slots_per_device:
        reason, what = Reason.SCALE_EVENT, f"EP group {placement.devices} -> {devices} devices x {per} slots"
    else:
        reason, what = Reason.LOAD_DRIFT, "expert load drifted"
    res = rebalance(
        w, cur, device_origin=origin, slots_per_device=per, slack=config.slack,
        restore_cap=config.spare_slots, light_devices=config.light_devices, hierarchy=hierarchy,
        polish_s=config.polish_s,
    )
    if reason is Reason.LOAD_DRIFT:
        before = float(balancedness(w, res.carried).mean())
        after = float(balancedness(w, res.slots).mean())
        copies = int(copies_per_device(res.carried, res.slots, moe.experts).sum())
        total = moe.moe_layers * devices * per
        net = after - before - config.copy_penalty * copies / total
        since = snapshot.now - last.get(dep.name, float("-inf"))
        figures = {"balancedness_before": before, "balancedness_after": after, "copies": float(copies), "net_gain": net}
        if net < el.rebalance_threshold:
            return _Decision(
                reason=Reason.NO_CHANGE, metrics=figures,
                summary=f"{dep.name}: balancedness {before:.4f} -> {after:.4f} for {copies} copies is not worth it "
                f"(net {net:.4f} < threshold {el.rebalance_threshold})",
            )
        if since < el.min_interval_s:
            return _Decision(
                reason=Reason.STABILISING, metrics=figures,
                summary=f"{dep.name}: worth a rebalance but only {since:.0f} s since the last "
                f"(min {el.min_interval_s:.0f} s)",
            )
    return _emit(dep, w, res.carried, res.slots, origin, placement.version + 1, config, reason,
                 f"{dep.name}: {what}", fallback_layers=len(res.fallback_layers),
                 reference=float(res.reference.mean()))


def _emit(
    dep: ModelDeployment,
    w: np.ndarray,
    carried: np.ndarray,
    target: np.ndarray,
    origin: list[int | None],
    version: int,
    config: MoEConfig,
    reason: Reason,
    what: str,
    fallback_layers: int = 0,
    reference: float | None = None,
) -> _Decision:
    moe = dep.model.moe
    assert moe is not None
    layers, devices, per = target.shape
    copy_moves: list[list[ExpertMove]] = []
    switch_moves: list[list[ExpertMove]] = []
    free_moves: list[list[ExpertMove]] = []
    final = np.empty_like(target)
    within = True
    for layer in range(layers):
        staged = stage_layer(carried[layer], target[layer], config.spare_slots)
        final[layer] = staged.final
        within = within and staged.within_budget
        for i, rnd in enumerate(staged.rounds):
            while len(copy_moves) <= i:
                copy_moves.append([])
                switch_moves.append([])
                free_moves.append([])
            for g, k, e in rnd.copies:
                move = ExpertMove(layer=layer, device=g, slot=g * per + k, expert=e)
                copy_moves[i].append(move)
                switch_moves[i].append(move)
            for g, k, e in rnd.frees:
                free_moves[i].append(ExpertMove(layer=layer, device=g, slot=g * per + k, expert=e))
    steps: list[ExpertMigrationStep] = []
    for i in range(len(copy_moves)):
        steps.append(ExpertMigrationStep(stage=MigrationStage.COPY, moves=tuple(copy_moves[i])))
        steps.append(ExpertMigrationStep(stage=MigrationStage.SWITCH, moves=tuple(switch_moves[i])))
        if free_moves[i]:
            steps.append(ExpertMigrationStep(stage=MigrationStage.FREE, moves=tuple(free_moves[i])))
    per_dev = copies_per_device(carried, final, moe.experts)
    copies = int(per_dev.sum())
    lb = int(copy_lower_bound(carried, moe.experts).sum())
    b = balancedness(w, final)
    identity = origin == list(range(len(origin)))
    action = SetExpertPlacement(
        deployment=dep.name,
        version=version,
        devices=devices,
        slots_per_device=per,
        phy2log=tuple(tuple(int(x) for x in row) for row in final.reshape(layers, devices * per)),
        steps=tuple(steps),
        copies=copies,
        bytes_moved=copies * moe.bytes_per_expert,
        device_origin=() if identity else tuple(-1 if o is None else o for o in origin),
    )
    figures = {
        "balancedness_after": float(b.mean()),
        "balancedness_worst": float(b.min()),
        "copies": float(copies),
        "copies_lower_bound": float(lb),
        "max_copies_into_device": float(per_dev.sum(0).max()),
        "rounds": float(len(copy_moves)),
        "within_memory_budget": 1.0 if within else 0.0,
        "fallback_layers": float(fallback_layers),
        **({"balancedness_reference": reference} if reference is not None else {}),
    }
    summary = (
        f"{what}: {copies} expert copies (lower bound {lb}) in {len(copy_moves)} staged rounds, "
        f"balancedness {b.mean():.4f} (worst layer {b.min():.4f})"
    )
    if not within:
        summary += "; a round exceeds the spare-memory budget"
    if fallback_layers:
        summary += f"; {fallback_layers} layers re-packed from scratch (local moves stalled)"
    return _Decision(reason=reason, summary=summary, action=action, metrics=figures)
