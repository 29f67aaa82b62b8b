"""MoE expert redistribution: placement invariants, staged migrations, failures, the decision rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.moe import MoEConfig, MoEState, plan_moe
from policies.moe_core import (
    balancedness,
    carry_over,
    copies_per_device,
    copy_lower_bound,
    eplb_reference,
    rebalance,
)
from policies.moe_staging import stage_layer
from policies.plan import MigrationStage, Reason, SetExpertPlacement
from policies.snapshot import (
    ExpertLoad,
    ExpertPlacement,
    ModelDeployment,
    ModelShape,
    MoEElasticity,
    MoEShape,
    Parallelism,
    Snapshot,
)

LAYERS, EXPERTS, DEVICES, SLOTS = 4, 32, 8, 5


def loads(seed: int, layers: int = LAYERS, experts: int = EXPERTS, sigma: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(0.0, sigma, size=(layers, experts)) * 1000


def drifted(w: np.ndarray, seed: int, sigma: float = 0.3) -> np.ndarray:
    return w * np.random.default_rng(seed).lognormal(0.0, sigma, size=w.shape)


def assert_valid(slots: np.ndarray, experts: int) -> None:
    """Every slot filled, every expert placed, no expert twice on one device."""
    assert (slots >= 0).all()
    for layer in slots:
        assert set(layer.ravel().tolist()) == set(range(experts))
        for row in layer:
            assert len(set(row.tolist())) == len(row)


# -- rebalance ----------------------------------------------------------------------------------
def test_drift_keeps_balance_with_fewer_copies_than_eplb() -> None:
    w0 = loads(1)
    start = eplb_reference(w0, DEVICES, SLOTS)
    w1 = drifted(w0, 2)
    res = rebalance(w1, start, slack=0.002)
    assert_valid(res.slots, EXPERTS)
    b = balancedness(w1, res.slots)
    assert (b >= res.reference - 0.002 - 1e-9).all()
    assert (b > balancedness(w1, start)).all() or (balancedness(w1, start) >= res.target).all()
    ours = copies_per_device(res.carried, res.slots, EXPERTS).sum()
    eplb = copies_per_device(res.carried, eplb_reference(w1, DEVICES, SLOTS), EXPERTS).sum()
    assert ours < eplb


def test_no_drift_needs_no_copies() -> None:
    """Re-planning our own placement on the same loads changes nothing (EPLB's can hold duplicates)."""
    w = loads(3)
    ours = rebalance(w, eplb_reference(w, DEVICES, SLOTS)).slots
    res = rebalance(w, ours)
    assert copies_per_device(res.carried, res.slots, EXPERTS).sum() == 0


@pytest.mark.parametrize("new_devices", [10, 12, 7, 6])
def test_scale_events_restore_and_fill(new_devices: int) -> None:
    w = loads(4)
    start = eplb_reference(w, DEVICES, SLOTS)
    origin: list[int | None] = [*range(min(DEVICES, new_devices)), *([None] * max(0, new_devices - DEVICES))]
    per = max(SLOTS, -(-DEVICES * SLOTS // new_devices))
    res = rebalance(w, start, device_origin=origin, slots_per_device=per)
    assert res.slots.shape == (LAYERS, new_devices, per)
    assert_valid(res.slots, EXPERTS)
    copies = copies_per_device(res.carried, res.slots, EXPERTS).sum(-1)
    lb = copy_lower_bound(res.carried, EXPERTS)
    assert (copies >= lb).all()
    assert (balancedness(w, res.slots) >= res.target - 1e-9).all()


def test_failed_device_experts_are_restored() -> None:
    w = loads(5)
    start = eplb_reference(w, DEVICES, SLOTS)
    origin: list[int | None] = [g for g in range(DEVICES) if g != 3]
    res = rebalance(w, start, device_origin=origin)
    assert_valid(res.slots, EXPERTS)
    carried = carry_over(start, origin, SLOTS)
    lost = [e for e in range(EXPERTS) if not (carried[0] == e).any()]
    assert lost, "the test needs an expert that lived only on the failed device"
    assert all((res.slots[0] == e).any() for e in lost)


def test_hierarchical_keeps_replicas_on_their_groups_node() -> None:
    w = loads(6, experts=32)
    start = eplb_reference(w, DEVICES, SLOTS, groups=4, nodes=2)
    res = rebalance(drifted(w, 7), start, hierarchy=(4, 4))
    assert_valid(res.slots, EXPERTS)
    for layer in range(LAYERS):
        if layer in res.fallback_layers:
            continue
        for node in range(2):
            groups = {int(e) // 8 for e in res.slots[layer, node * 4 : (node + 1) * 4].ravel()}
            assert len(groups) == 2


# -- staging ------------------------------------------------------------------------------------
def replay(carried: np.ndarray, target: np.ndarray, spare: int) -> None:
    staged = stage_layer(carried, target, spare)
    devices, per = carried.shape
    cur = carried.copy()
    experts = set(int(e) for e in target.ravel())
    for rnd in staged.rounds:
        for g in range(devices):
            resident = int((cur[g] >= 0).sum()) + sum(1 for gg, k, _ in rnd.copies if gg == g and cur[g, k] >= 0)
            assert resident <= per + spare or not staged.within_budget
        for g, k, e in rnd.copies:
            cur[g, k] = e
        for g, k, e in rnd.frees:
            assert cur[g, k] != e  # the freed copy was replaced at the switch
        # the map published at this switch keeps every expert and never duplicates one on a device
        assert set(int(e) for e in cur.ravel() if e >= 0) >= experts
        for row in cur:
            vals = [int(x) for x in row if x >= 0]
            assert len(vals) == len(set(vals))
    assert [set(r.tolist()) for r in cur] == [set(r.tolist()) for r in target]
    assert (cur == staged.final).all()


def test_staging_respects_memory_and_keeps_experts() -> None:
    w0 = loads(8)
    start = eplb_reference(w0, DEVICES, SLOTS)
    res = rebalance(drifted(w0, 9, 0.6), start)
    for layer in range(LAYERS):
        staged = stage_layer(res.carried[layer], res.slots[layer], 1)
        assert staged.within_budget
        assert (staged.peak_resident <= SLOTS + 1).all()
        replay(res.carried[layer], res.slots[layer], 1)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    devices=st.integers(2, 6),
    per=st.integers(2, 4),
    spare=st.integers(1, 2),
)
def test_staging_any_permutation(seed: int, devices: int, per: int, spare: int) -> None:
    """From any valid placement to any other: every round keeps all experts and the budget."""
    rng = np.random.default_rng(seed)
    experts = devices * per - rng.integers(0, devices)
    experts = max(experts, per)

    def random_placement() -> np.ndarray:
        while True:
            pool = [*range(experts), *rng.integers(0, experts, size=devices * per - experts).tolist()]
            rng.shuffle(pool)
            slots = np.array(pool, dtype=np.int64).reshape(devices, per)
            if all(len(set(r.tolist())) == per for r in slots):
                return slots

    a, b = random_placement(), random_placement()
    staged = stage_layer(a, b, spare)
    replay(a, b, spare)
    assert staged.within_budget


# -- the policy ---------------------------------------------------------------------------------
def snapshot(
    w: np.ndarray, placement: np.ndarray | None, *, ep: int = DEVICES, now: float = 1000.0,
    failed: tuple[int, ...] = (), per: int = SLOTS,
) -> Snapshot:
    dep = ModelDeployment(
        name="ds",
        model=ModelShape(
            name="toy-moe", params_b=10, active_params_b=1,
            moe=MoEShape(moe_layers=w.shape[0], experts=w.shape[1], top_k=2, bytes_per_expert=1000),
        ),
        parallelism=Parallelism(ep=ep),
        moe_elasticity=MoEElasticity(min_ep=2, max_ep=16, slots_per_device=per, rebalance_threshold=0.02,
                                     min_interval_s=300),
    )
    placements = ()
    if placement is not None:
        layers, devices, slots = placement.shape
        placements = (
            ExpertPlacement(
                deployment="ds", version=3, devices=devices, slots_per_device=slots,
                phy2log=tuple(tuple(int(x) for x in r) for r in placement.reshape(layers, -1)),
                failed_devices=failed,
            ),
        )
    return Snapshot(
        now=now, deployments=(dep,),
        expert_loads=(ExpertLoad(deployment="ds", loads=tuple(tuple(float(x) for x in r) for r in w)),),
        expert_placements=placements,
    )


def only_action(plan_actions: tuple[object, ...]) -> SetExpertPlacement:
    assert len(plan_actions) == 1
    action = plan_actions[0]
    assert isinstance(action, SetExpertPlacement)
    return action


def test_policy_rebalances_on_drift_with_staged_steps() -> None:
    w0 = loads(10)
    start = eplb_reference(w0, DEVICES, SLOTS)
    w1 = drifted(w0, 11, 0.8)
    plan = plan_moe(snapshot(w1, start), MoEConfig(), MoEState())
    assert plan.explanation.reason is Reason.LOAD_DRIFT
    action = only_action(plan.actions)
    assert action.version == 4 and action.copies > 0 and action.bytes_moved == action.copies * 1000
    stages = [s.stage for s in action.steps]
    assert stages[0] is MigrationStage.COPY and stages[1] is MigrationStage.SWITCH
    new = np.array(action.phy2log).reshape(LAYERS, DEVICES, SLOTS)
    assert_valid(new, EXPERTS)
    assert balancedness(w1, new).mean() > balancedness(w1, start).mean()
    # same input, same plan; the state says when we rebalanced
    again = plan_moe(snapshot(w1, start), MoEConfig(), MoEState())
    assert again.id == plan.id
    assert MoEState.model_validate(plan.state).last_rebalance_s["ds"] == 1000.0


def test_policy_waits_min_interval_and_ignores_small_gains() -> None:
    w0 = loads(12)
    start = rebalance(w0, eplb_reference(w0, DEVICES, SLOTS)).slots
    recent = MoEState(last_rebalance_s={"ds": 900.0})
    plan = plan_moe(snapshot(drifted(w0, 13, 0.8), start), MoEConfig(), recent)
    assert plan.actions == () and plan.explanation.reason is Reason.STABILISING
    calm = plan_moe(snapshot(w0, start), MoEConfig(), MoEState())
    assert calm.actions == () and calm.explanation.reason is Reason.NO_CHANGE


def test_policy_scale_up_and_failure() -> None:
    w = loads(14)
    start = eplb_reference(w, DEVICES, SLOTS)
    up = plan_moe(snapshot(w, start, ep=10), MoEConfig(), MoEState(last_rebalance_s={"ds": 999.0}))
    assert up.explanation.reason is Reason.SCALE_EVENT
    action = only_action(up.actions)
    assert action.devices == 10 and action.device_origin == (*range(8), -1, -1)
    assert action.copies >= up.explanation.metrics["ds.copies_lower_bound"] >= 2 * SLOTS
    assert_valid(np.array(action.phy2log).reshape(LAYERS, 10, SLOTS), EXPERTS)

    down = plan_moe(snapshot(w, start, ep=7, failed=(2,)), MoEConfig(), MoEState())
    assert down.explanation.reason is Reason.DEVICE_FAILED
    action = only_action(down.actions)
    assert action.device_origin == (0, 1, 3, 4, 5, 6, 7)
    new = np.array(action.phy2log).reshape(LAYERS, 7, SLOTS)
    assert_valid(new, EXPERTS)
    first_switch = next(s for s in action.steps if s.stage is MigrationStage.SWITCH)
    restored = {(m.layer, m.expert) for m in first_switch.moves}
    carried = carry_over(start, [0, 1, 3, 4, 5, 6, 7], SLOTS)
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            if not (carried[layer] == e).any():
                assert (layer, e) in restored  # lost experts come back at the first switch


def test_policy_bad_input_is_explained() -> None:
    w = loads(15)
    plan = plan_moe(snapshot(w[:, :10], eplb_reference(w, DEVICES, SLOTS)), MoEConfig(), MoEState())
    assert plan.actions == () and plan.explanation.reason is Reason.BAD_INPUT
    assert "outside" in plan.explanation.summary


def test_initial_placement_without_current() -> None:
    w = loads(16)
    plan = plan_moe(snapshot(w, None), MoEConfig(), MoEState())
    action = only_action(plan.actions)
    assert action.version == 0 and action.devices == DEVICES
    new = np.array(action.phy2log).reshape(LAYERS, DEVICES, SLOTS)
    assert set(new.ravel().tolist()) == set(range(EXPERTS))


def test_polish_never_worse_and_valid() -> None:
    w0 = loads(17)
    start = rebalance(w0, eplb_reference(w0, DEVICES, SLOTS)).slots
    origin: list[int | None] = [*range(DEVICES), None]
    plain = rebalance(w0, start, device_origin=origin)
    polished = rebalance(w0, start, device_origin=origin, polish_s=2.0)
    assert_valid(polished.slots, EXPERTS)
    c_plain = copies_per_device(plain.carried, plain.slots, EXPERTS).sum()
    c_pol = copies_per_device(polished.carried, polished.slots, EXPERTS).sum()
    assert c_pol <= c_plain
    assert (balancedness(w0, polished.slots) >= np.minimum(balancedness(w0, plain.slots), plain.target) - 1e-12).all()


def test_two_slots_per_device_matches_reference_balance() -> None:
    """EP144 x 2 style: local moves stall, the copy-aware packing keeps balance and most experts."""
    w0 = loads(18, layers=6, experts=24)
    start = rebalance(w0, eplb_reference(w0, 16, 2)).slots
    w1 = drifted(w0, 19, 0.3)
    res = rebalance(w1, start)
    assert_valid(res.slots, 24)
    b = balancedness(w1, res.slots)
    assert (b >= res.reference - 0.002 - 1e-9).all()
    ours = copies_per_device(res.carried, res.slots, 24).sum()
    eplb = copies_per_device(res.carried, eplb_reference(w1, 16, 2), 24).sum()
    assert ours < eplb


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    experts=st.integers(4, 24),
    devices=st.integers(2, 8),
    extra=st.integers(0, 3),
    fresh=st.integers(0, 3),
    drop=st.integers(0, 2),
)
def test_rebalance_any_group_change(seed: int, experts: int, devices: int, extra: int, fresh: int, drop: int) -> None:
    """Any drift / scale / failure on small random shapes: valid, restores lost experts, copies >= bound."""
    rng = np.random.default_rng(seed)
    per = min(experts, -(-experts // devices) + extra)
    w0 = rng.lognormal(0, 1, size=(2, experts)) * 100
    start = rebalance(w0, np.full((2, devices, per), -1, dtype=np.int64)).slots
    dropped = set(rng.choice(devices, size=min(drop, devices - 1), replace=False).tolist())
    survivors = [g for g in range(devices) if g not in dropped]
    new_devices = len(survivors) + fresh
    new_per = min(experts, max(per, -(-experts // new_devices)))
    origin: list[int | None] = [*survivors, *([None] * fresh)]
    w1 = w0 * rng.lognormal(0, 0.5, size=w0.shape)
    res = rebalance(w1, start, device_origin=origin, slots_per_device=new_per)
    assert_valid(res.slots, experts)
    copies = copies_per_device(res.carried, res.slots, experts).sum(-1)
    assert (copies >= copy_lower_bound(res.carried, experts)).all()
    for layer in range(2):
        staged = stage_layer(res.carried[layer], res.slots[layer], 1)
        assert [set(r.tolist()) for r in staged.final] == [set(r.tolist()) for r in res.slots[layer]]
