"""Incremental expert re-placement for MoE layers: numpy arrays in, numpy arrays out.

The engine splits an expert's tokens evenly over its replicas, so a device's load is the sum of
``load[e] / replicas[e]`` over the experts it holds, and balancedness = mean / max device load.
EPLB recomputes a placement from scratch, which rewrites almost every slot on any change. Here
the current placement is the starting point:

1. *carry over*: surviving devices keep their experts (new devices and new slots start empty; a
   second replica of an expert on one device counts as an empty slot);
2. *count repair*: when an expert's per-replica load alone exceeds the target max device load,
   surplus replicas of other experts are freed so it can gain replicas (few slots per device);
3. *repair*: experts lost with removed or failed devices are restored first, then empty slots are
   filled, each choice scored exactly over all devices;
4. *improve*: one-copy moves (give an expert of the hottest device a new replica in place of a
   redundant replica on a light device) and two-copy swaps with any device, ranked by load above
   the target removed per copy, all layers advanced together, until the layer reaches its target
   or no move helps;
5. *revert*: greedily undo changes that are no longer needed to stay at the target;
6. *re-pack*: a layer still short of its target is packed EPLB-style from scratch, but keeping a
   replica where its expert already is whenever that fits under the target (or EPLB relabelled,
   whichever meets the target with fewer copies); optional CP-SAT polish: :mod:`policies.moe_polish`.

The target is a from-scratch reference (EPLB on the same loads) minus a small slack, so we trade a
negligible balance difference for far fewer copies. Device sets are returned; slot positions are
fixed by :mod:`policies.moe_staging`, which keeps unchanged experts in their slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from ortools.graph.python import linear_sum_assignment

from policies.baselines.eplb import rebalance_experts
from policies.moe_polish import polish_layer, sets_to_slots

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

EMPTY = -1


# -- measures -----------------------------------------------------------------------------------
def incidence(slots: IntArray, experts: int) -> BoolArray:
    """``[L, G, S]`` slot table -> ``[L, G, E]``: expert e has a replica on device g."""
    num_layers, devices, _ = slots.shape
    m = np.zeros((num_layers, devices, experts + 1), dtype=bool)
    li = np.arange(num_layers)[:, None, None]
    gi = np.arange(devices)[None, :, None]
    m[li, gi, np.where(slots < 0, experts, slots)] = True
    return m[:, :, :experts]


def per_replica_load(loads: FloatArray, counts: IntArray) -> FloatArray:
    """Load each replica of an expert carries; 0 for an expert with no replica."""
    return np.where(counts > 0, loads / np.maximum(counts, 1), 0.0)


def device_loads(loads: FloatArray, slots: IntArray) -> FloatArray:
    """``[L, G]`` device loads of a placement given as ``[L, G, S]`` slots (duplicates count twice)."""
    num_layers, devices, per = slots.shape
    experts = loads.shape[1]
    if num_layers == 0:
        return np.zeros((0, devices))
    flat = slots.reshape(num_layers, devices * per)
    counts = np.zeros((num_layers, experts + 1), dtype=np.int64)
    np.add.at(counts, (np.arange(num_layers)[:, None], np.where(flat < 0, experts, flat)), 1)
    p = np.concatenate([per_replica_load(loads, counts[:, :experts]), np.zeros((num_layers, 1))], axis=1)
    rep = np.take_along_axis(p, np.where(flat < 0, experts, flat), axis=1)
    out: FloatArray = rep.reshape(num_layers, devices, per).sum(-1)
    return out


def balancedness(loads: FloatArray, slots: IntArray) -> FloatArray:
    """Per layer mean / max device load (1.0 is perfect); 0 when an expert with load is unplaced."""
    d = device_loads(loads, slots)
    b = d.mean(-1) / np.maximum(d.max(-1), 1e-300)
    placed = incidence(slots, loads.shape[1]).any(axis=1)
    lost = ((~placed) & (loads > 0)).any(-1)
    return np.where(lost, 0.0, np.where(d.max(-1) > 0, b, 1.0))


def copies_per_device(before: IntArray, after: IntArray, experts: int) -> IntArray:
    """``[L, G]`` experts each device must receive to go from ``before`` to ``after`` (same shape)."""
    out: IntArray = (incidence(after, experts) & ~incidence(before, experts)).sum(-1).astype(np.int64)
    return out


def carry_over(
    current: IntArray, device_origin: Sequence[int | None], slots_per_device: int
) -> IntArray:
    """The current placement in the new group's shape: survivors keep their experts, the rest is empty.

    ``device_origin[g]`` is the old device index of new device g (None for a fresh device).
    Slots per device may only grow (a device keeps everything it holds). A duplicate of an expert
    on one device (EPLB can produce them) is dropped to an empty slot: we never keep two.
    """
    num_layers, old_devices, old_slots = current.shape
    if slots_per_device < old_slots:
        raise ValueError(f"slots per device may not shrink ({old_slots} -> {slots_per_device})")
    out = np.full((num_layers, len(device_origin), slots_per_device), EMPTY, dtype=np.int64)
    for g, origin in enumerate(device_origin):
        if origin is not None:
            if not 0 <= origin < old_devices:
                raise ValueError(f"device_origin[{g}] = {origin} is not a current device")
            out[:, g, :old_slots] = current[:, origin, :]
    # a second replica of an expert on the same device adds nothing: its slot counts as empty
    srt = np.sort(out, axis=-1)
    if ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any():
        for layer, g in zip(*np.nonzero(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(-1)), strict=True):
            seen: set[int] = set()
            for k, e in enumerate(out[layer, g]):
                if e >= 0 and int(e) in seen:
                    out[layer, g, k] = EMPTY
                seen.add(int(e))
    return out


def copy_lower_bound(carried: IntArray, experts: int) -> IntArray:
    """Per layer, copies any valid placement of the new group needs, whatever its balance.

    Every empty slot of the new group must receive an expert (one copy each), and every expert with
    no replica left on a surviving device must be copied somewhere (one copy each); a copy can serve
    both, so the bound is ``max(empty slots, lost experts)``.
    """
    empty = (carried < 0).sum(axis=(1, 2))
    lost = (~incidence(carried, experts).any(axis=1)).sum(-1)
    out: IntArray = np.maximum(empty, lost).astype(np.int64)
    return out


# -- the reference ------------------------------------------------------------------------------
def eplb_reference(
    loads: FloatArray, devices: int, slots_per_device: int, groups: int = 1, nodes: int = 1
) -> IntArray:
    """EPLB's from-scratch placement as ``[L, G, S]`` (hierarchical when groups % nodes == 0)."""
    phy2log, _, _ = rebalance_experts(loads, devices * slots_per_device, groups, nodes, devices)
    return phy2log.reshape(loads.shape[0], devices, slots_per_device)


# -- the search ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RebalanceResult:
    """Our placement per layer as device sets in slot form ``[L, G, S]``, plus what it cost."""

    slots: IntArray  # [L, G, S] new placement (positions of kept experts unchanged)
    carried: IntArray  # [L, G, S] the current placement in the new shape (what the plan starts from)
    target: FloatArray  # [L] balancedness we aimed for
    reference: FloatArray  # [L] balancedness of the from-scratch reference
    fallback_layers: IntArray  # layers where the reference (relabelled) was used instead of ours
    steps: int  # improvement rounds run
    polished_layers: int = 0  # layers where the CP-SAT polish found fewer copies


def _state(slots: IntArray, experts: int) -> tuple[BoolArray, IntArray]:
    m = incidence(slots, experts)
    return m, m.sum(1).astype(np.int64)


def _score(d: FloatArray) -> FloatArray:
    """Max device load, ties broken by the sum of squares (spreads load off near-max devices)."""
    mean = np.maximum(d.mean(-1, keepdims=True), 1e-300)
    out: FloatArray = d.max(-1) + 1e-7 * (d * d).sum(-1) / mean[..., 0]
    return out


def _free_for_counts(w: FloatArray, slots: IntArray, target_max: float) -> IntArray | None:
    """Free surplus replicas so every expert can get the replicas its load needs; in place.

    An expert whose per-replica load exceeds ``target_max`` keeps every device holding it above
    the target whatever the placement, and one-copy moves cannot fix that when all redundant
    replicas belong to other hot experts (few slots per device, e.g. EP144 x 2). Returns the
    replica count each expert needs (for the fill), or None when nothing had to change.
    """
    devices, per = slots.shape
    experts = w.shape[0]
    need = np.minimum(np.maximum(1, np.ceil(w / max(target_max, 1e-300) - 1e-9)), devices).astype(np.int64)
    if int(need.sum()) > devices * per:
        return None
    m = incidence(slots[None], experts)[0]
    cnt = m.sum(0)
    deficit = int(np.maximum(need - cnt, 0).sum())
    if deficit == 0:
        return None
    d = (m * per_replica_load(w, cnt)).sum(-1)
    for _ in range(deficit - int((slots < 0).sum())):
        surplus = np.flatnonzero((cnt > need) & (cnt >= 2))
        if surplus.size == 0:
            break
        e = int(surplus[np.argmin(w[surplus] / (cnt[surplus] - 1))])
        holders = np.flatnonzero((slots == e).any(-1))
        g = int(holders[np.argmax(d[holders])])
        slots[g, int(np.flatnonzero(slots[g] == e)[0])] = EMPTY
        cnt[e] -= 1
        d = (incidence(slots[None], experts)[0] * per_replica_load(w, cnt)).sum(-1)
    return need


def _excess(d: FloatArray, cap: FloatArray) -> FloatArray:
    """Total load above the target max device load ``cap`` (broadcast over d's last axis)."""
    out: FloatArray = np.maximum(d - cap[..., None], 0.0).sum(-1)
    return out


def _repair_layer(
    w: FloatArray,
    slots: IntArray,
    allowed: BoolArray,
    restore_cap: int,
    need: IntArray | None = None,
    target_max: float | None = None,
    fill_devices: int = 1,
) -> None:
    """Restore lost experts, then fill empty slots (experts short of ``need`` first); in place."""
    devices, _ = slots.shape
    experts = w.shape[0]
    restored_by_replacement = np.zeros(devices, dtype=np.int64)
    while True:
        m = incidence(slots[None], experts)[0]
        cnt = m.sum(0)
        p = per_replica_load(w, cnt)
        d = (m * p).sum(-1)
        free = (slots < 0).sum(-1)
        lost = np.flatnonzero(cnt == 0)
        if lost.size:
            e = int(lost[np.argmax(w[lost])])
            ok = (free > 0) & allowed[e]
            if not ok.any() and (free > 0).any():
                ok = free > 0  # the allowed node is full: restoring beats locality
            if ok.any():
                g = int(np.flatnonzero(ok)[np.argmin(d[ok])])
                slots[g, int(np.flatnonzero(slots[g] < 0)[0])] = e
                continue
            # no free slot: replace a redundant replica (its expert keeps another one)
            cand_ok = (cnt[slots] >= 2) & allowed[e][:, None] & (restored_by_replacement < restore_cap)[:, None]
            if not cand_ok.any():
                cand_ok = cnt[slots] >= 2
            if not cand_ok.any():
                raise ValueError("cannot restore a lost expert: no redundant replica to replace")
            v = slots
            dv = w[v] / np.maximum(cnt[v] - 1, 1) - p[v]  # [G, S] load increase on v's other holders
            newd = d[None, None, :] + m.T[v] * dv[:, :, None]  # [G, S, G]
            gi = np.arange(devices)
            newd[gi, :, gi] = d[:, None] - p[v] + w[e]  # the device that swaps v for e
            score = np.where(cand_ok, _score(newd), np.inf)
            gk = np.unravel_index(int(np.argmin(score)), score.shape)
            slots[int(gk[0]), int(gk[1])] = e
            restored_by_replacement[int(gk[0])] += 1
            continue
        if not free.any():
            return
        # fill one empty slot: the (device with room, expert) pair that best lowers the target excess
        # (or the max), the device chosen jointly so fresh devices are packed, not just topped up
        pa_new = w / (cnt + 1)
        da = pa_new - p
        base = d[None, :] + m.T * da[:, None]  # [E, G] every device's load if expert e gains a replica
        best: tuple[float, int, int] | None = None
        for g in np.flatnonzero(free > 0)[np.argsort(d[free > 0], kind="stable")][:fill_devices]:
            g = int(g)
            newd = base.copy()
            newd[:, g] += pa_new
            ok = (~m[g]) & allowed[:, g]
            if need is not None and (ok & (cnt < need)).any():
                ok = ok & (cnt < need)
            if not ok.any():
                ok = ~m[g]
            if not ok.any():
                continue
            fill_score = _score(newd)
            if target_max is not None:
                fill_score = 1e-3 * fill_score + _excess(newd, np.full(newd.shape[0], target_max))
            score = np.where(ok, fill_score, np.inf)
            e = int(np.argmin(score))
            if best is None or float(score[e]) < best[0]:
                best = (float(score[e]), g, e)
        if best is None:
            raise ValueError(f"no free slot can take another expert; too many slots for {experts} experts")
        _, g, e = best
        slots[g, int(np.flatnonzero(slots[g] < 0)[0])] = e


def _improve_step(
    w: FloatArray, slots: IntArray, allowed: BoolArray, layers: IntArray, light: int, cap: FloatArray | None = None
) -> tuple[IntArray, IntArray]:
    """One move per layer in ``layers``; returns ``(moved_layers, copies_spent)`` and edits ``slots``.

    With ``cap`` (target max device load per layer in ``layers``) moves are ranked by how much load
    above the target they remove per copy (max load breaks ties); without it, by the max load.
    """
    sl = slots[layers]  # [L, G, S]
    wl = w[layers]
    num_layers, devices, per = sl.shape
    experts = w.shape[1]
    m, cnt = _state(sl, experts)
    p = per_replica_load(wl, cnt)
    li = np.arange(num_layers)
    d = np.einsum("lge,le->lg", m, p)
    s0 = _score(d)
    wx = 0.0 if cap is None else 1.0  # weight of the excess term
    capl = np.zeros(num_layers) if cap is None else cap
    s0 = s0 * (1e-3 if cap is not None else 1.0) + wx * _excess(d, capl)
    gstar = np.argmax(d, -1)
    a = sl[li, gstar]  # [L, Sa] experts on the hottest device
    pa, ca = p[li[:, None], a], cnt[li[:, None], a]
    pa_new = wl[li[:, None], a] / (ca + 1)
    da = pa_new - pa  # change of a's per-replica load when it gains a replica (<= 0)
    ma = m[li[:, None], :, a]  # [L, Sa, G] devices holding a
    # replicate: a gets a new replica on device hr in place of a redundant replica vr there; one copy.
    # Candidates (hr, vr): the `4 * light` redundant replicas on the lightest devices.
    n_red = min(4 * light, devices * per)
    flat_ok = (cnt[li[:, None], sl.reshape(num_layers, -1)] >= 2) & (
        np.repeat(np.arange(devices), per)[None, :] != gstar[:, None]
    )
    key = np.where(flat_ok, np.repeat(d, per, axis=1), np.inf)
    pick = np.argsort(key, -1, kind="stable")[:, :n_red]  # [L, R] flat slot indices
    pick_ok = np.take_along_axis(flat_ok, pick, -1)  # [L, R]
    hr = pick // per  # [L, R]
    vr = np.take_along_axis(sl.reshape(num_layers, -1), pick, -1)  # [L, R]
    cv = cnt[li[:, None], vr]
    pv = p[li[:, None], vr]
    pv_new = np.where(cv >= 2, wl[li[:, None], vr] / np.maximum(cv - 1, 1), 0.0)
    dv = np.where(cv >= 2, pv_new - pv, 0.0)  # change of v's per-replica load (>= 0)
    mv = m[li[:, None], :, vr]  # [L, R, G] devices holding v
    onehot = np.zeros((num_layers, n_red, devices))
    onehot[li[:, None], np.arange(n_red)[None, :], hr] = 1.0
    swap_in = pa_new[:, :, None] - pv_new[:, None, :]  # [L, Sa, R] on hr: D + dv + swap_in = D - pv + pa_new
    newd = (
        d[:, None, None, :]
        + ma[:, :, None, :] * da[:, :, None, None]
        + mv[:, None, :, :] * dv[:, None, :, None]
        + onehot[:, None, :, :] * swap_in[..., None]
    )  # [L, Sa, R, G]
    a_on_h = m[li[:, None, None], hr[:, None, :], a[:, :, None]]  # [L, Sa, R]
    ok_r = (~a_on_h) & pick_ok[:, None, :] & allowed[layers[:, None, None], a[:, :, None], hr[:, None, :]]
    base_r = _score(newd) * (1e-3 if cap is not None else 1.0) + wx * _excess(newd, capl[:, None, None])
    score_r = np.where(ok_r, base_r, np.inf).reshape(num_layers, -1)
    best_r = np.argmin(score_r, -1)
    gain_r = s0 - score_r[li, best_r]
    # swap: a (on g*) and b (on any other device h) trade places; two copies
    light_all = np.argsort(np.where(np.arange(devices)[None, :] == gstar[:, None], np.inf, d), -1, kind="stable")
    k_swap = devices - 1  # a swap is scored without a per-device sweep, so every partner is affordable
    h = light_all[:, :k_swap]
    v = sl[li[:, None], h]
    pv = p[li[:, None, None], v]
    a_on_h = m[li[:, None, None], h[:, None, :], a[:, :, None]]
    top3 = np.argsort(-d, -1, kind="stable")[:, :3]
    other = np.full((num_layers, k_swap), -np.inf)
    for j in range(min(3, devices)):
        cand = top3[:, j][:, None]
        use = (cand != gstar[:, None]) & (cand != h) & np.isneginf(other)
        other = np.where(use, d[li, top3[:, j]][:, None], other)
    other = np.where(np.isneginf(other), 0.0, other)
    pb = pv  # [L, K, Sb]
    new_star = d[li, gstar][:, None, None, None] - pa[:, :, None, None] + pb[:, None]  # [L, Sa, K, Sb]
    new_h = d[li[:, None], h][:, None, :, None] - pb[:, None] + pa[:, :, None, None]
    mx = np.maximum(np.maximum(new_star, new_h), other[:, None, :, None])
    sumsq = (d * d).sum(-1)[:, None, None, None] - d[li, gstar][:, None, None, None] ** 2
    sumsq = sumsq - (d[li[:, None], h] ** 2)[:, None, :, None] + new_star**2 + new_h**2
    score_x = mx + 1e-7 * sumsq / np.maximum(d.mean(-1), 1e-300)[:, None, None, None]
    if cap is not None:
        c4 = capl[:, None, None, None]
        ex = _excess(d, capl)[:, None, None, None] - np.maximum(d[li, gstar] - capl, 0.0)[:, None, None, None]
        ex = ex - np.maximum(d[li[:, None], h] - capl[:, None], 0.0)[:, None, :, None]
        ex = ex + np.maximum(new_star - c4, 0.0) + np.maximum(new_h - c4, 0.0)
        score_x = 1e-3 * score_x + ex
    b_on_star = m[li[:, None, None], gstar[:, None, None], v]  # [L, K, Sb]
    ok_x = (
        (~a_on_h)[..., None]
        & (~b_on_star)[:, None]
        & allowed[layers[:, None, None], a[:, :, None], h[:, None, :]][..., None]
        & allowed[layers[:, None, None, None], v[:, None], gstar[:, None, None, None]]
    )
    score_x = np.where(ok_x, score_x, np.inf).reshape(num_layers, -1)
    best_x = np.argmin(score_x, -1)
    gain_x = (s0 - score_x[li, best_x]) / 2.0
    eps = 1e-12 * np.maximum(d.mean(-1), 1e-300)
    use_r = (gain_r >= gain_x) & (gain_r > eps)
    use_x = (~use_r) & (gain_x > eps)
    moved = use_r | use_x
    spent = np.zeros(num_layers, dtype=np.int64)
    for i in np.flatnonzero(use_r):
        sa, r = np.unravel_index(int(best_r[i]), (per, n_red))
        slots[layers[i], hr[i, r], pick[i, r] % per] = a[i, sa]
        spent[i] = 1
    for i in np.flatnonzero(use_x):
        sa, k, sb = np.unravel_index(int(best_x[i]), (per, k_swap, per))
        b = v[i, k, sb]
        slots[layers[i], h[i, k], sb] = a[i, sa]
        slots[layers[i], gstar[i], sa] = b
        spent[i] = 2
    return layers[moved], spent[moved]


def _revert_layer(w: FloatArray, slots: IntArray, carried: IntArray, target: float) -> None:
    """Undo changed slots one at a time while the layer stays at or above ``target``; in place."""
    experts = w.shape[0]
    improved = True
    while improved:
        improved = False
        m_new = incidence(slots[None], experts)[0]
        m_old = incidence(carried[None], experts)[0]
        cnt = m_new.sum(0)
        for g in range(slots.shape[0]):
            added = [int(e) for e in slots[g] if e >= 0 and not m_old[g, e] and cnt[e] >= 2]
            removed = [int(e) for e in carried[g] if e >= 0 and not m_new[g, e]]
            for b in added:
                for a in removed:
                    trial = slots.copy()
                    trial[g, int(np.flatnonzero(trial[g] == b)[0])] = a
                    if balancedness(w[None], trial[None])[0] >= target:
                        slots[:] = trial
                        improved = True
                        break
                if improved:
                    break
            if improved:
                break


def sticky_pack(
    w: FloatArray, counts: IntArray, carried: IntArray, allowed: BoolArray, load_cap: float
) -> IntArray | None:
    """EPLB-style packing (heaviest replica first, into the lightest device with room) that keeps a
    replica on a device that already holds its expert whenever that stays under ``load_cap``.

    Used where local moves stall (few slots per device: balance then needs chains of swaps). Returns
    ``[G, S]`` slots, or None when the packing would have to put an expert twice on a device.
    """
    devices, per = carried.shape
    held = incidence(carried[None], w.shape[0])[0]  # [G, E]
    counts = np.minimum(np.maximum(counts, 1), devices).astype(np.int64)
    while int(counts.sum()) < devices * per:  # fill every slot: replicate the heaviest per-replica load
        e = int(np.argmax(np.where(counts < devices, w / counts, -np.inf)))
        counts[e] += 1
    if int(counts.sum()) > devices * per:
        return None
    p = per_replica_load(w, counts)
    items = [(float(p[e]), int(e)) for e in range(w.shape[0]) for _ in range(int(counts[e]))]
    items.sort(key=lambda t: (-t[0], t[1]))
    load = np.zeros(devices)
    fill = np.zeros(devices, dtype=np.int64)
    has = np.zeros(held.shape, dtype=bool)
    sets: list[set[int]] = [set() for _ in range(devices)]
    for pe, e in items:
        room = (fill < per) & ~has[:, e] & allowed[e]
        if not room.any():
            room = (fill < per) & ~has[:, e]
            if not room.any():
                return None
        sticky = room & held[:, e] & (load + pe <= load_cap)
        pool = sticky if sticky.any() else room
        g = int(np.flatnonzero(pool)[np.argmin(load[pool])])
        load[g] += pe
        fill[g] += 1
        has[g, e] = True
        sets[g].add(e)
    return sets_to_slots(carried, sets)


def hierarchical_mask(carried: IntArray, experts: int, groups: int, gpus_per_node: int) -> BoolArray | None:
    """``[L, E, G]``: expert e may sit on device g only on the node its group is assigned to.

    Groups keep the node that holds most of their replicas now (greedy by overlap, each node gets
    ``groups / nodes`` groups); returns None when groups do not split evenly over nodes (EPLB then
    falls back to its global policy too).
    """
    num_layers, devices, _ = carried.shape
    if devices % gpus_per_node:
        return None
    nodes = devices // gpus_per_node
    if groups % nodes or experts % groups:
        return None
    per_node = groups // nodes
    group_size = experts // groups
    m = incidence(carried, experts)  # [L, G, E]
    overlap = m.reshape(num_layers, nodes, gpus_per_node, groups, group_size).sum(axis=(2, 4))  # [L, N, Gr]
    mask = np.zeros((num_layers, experts, devices), dtype=bool)
    for layer in range(num_layers):
        taken = np.zeros(nodes, dtype=np.int64)
        node_of = np.full(groups, -1)
        for flat in np.argsort(-overlap[layer].ravel(), kind="stable"):
            n, gr = divmod(int(flat), groups)
            if node_of[gr] < 0 and taken[n] < per_node:
                node_of[gr] = n
                taken[n] += 1
        for gr in range(groups):
            n = int(node_of[gr])
            mask[layer, gr * group_size : (gr + 1) * group_size, n * gpus_per_node : (n + 1) * gpus_per_node] = True
    return mask


def rebalance(
    loads: npt.ArrayLike,
    current: npt.ArrayLike,
    *,
    device_origin: Sequence[int | None] | None = None,
    slots_per_device: int | None = None,
    slack: float = 0.001,
    max_copies_per_layer: int | None = None,
    restore_cap: int = 2,
    light_devices: int = 8,
    hierarchy: tuple[int, int] | None = None,
    revert: bool = True,
    polish_s: float = 0.0,
    objective: str = "excess",
) -> RebalanceResult:
    """Re-place experts of every layer starting from ``current`` (``[L, G, S]``, -1 = empty slot).

    ``device_origin`` maps each device of the new group to its old index (None = fresh; default:
    the same devices). ``hierarchy=(groups, gpus_per_node)`` keeps each expert group on one node.
    The target per layer is the from-scratch reference's balancedness minus ``slack``.
    ``polish_s`` > 0 spends up to that much CP-SAT wall time (split over layers) cutting copies.
    """
    w = np.asarray(loads, dtype=np.float64)
    cur = np.asarray(current, dtype=np.int64)
    num_layers, experts = w.shape
    if cur.ndim != 3 or cur.shape[0] != num_layers:
        raise ValueError(f"current placement must be [layers={num_layers}, devices, slots], got {cur.shape}")
    origin = list(range(cur.shape[1])) if device_origin is None else list(device_origin)
    per = cur.shape[2] if slots_per_device is None else slots_per_device
    devices = len(origin)
    if devices * per < experts:
        raise ValueError(f"{devices} devices x {per} slots cannot hold {experts} experts")
    if per > experts:
        raise ValueError(f"{per} slots per device exceed {experts} experts (no duplicates on a device)")
    carried = carry_over(cur, origin, per)
    groups, gpn = hierarchy if hierarchy is not None else (1, devices)
    mask = hierarchical_mask(carried, experts, groups, gpn) if hierarchy is not None else None
    allowed = mask if mask is not None else np.ones((num_layers, experts, devices), dtype=bool)
    nodes = devices // gpn if mask is not None else 1
    ref_slots = eplb_reference(w, devices, per, groups if mask is not None else 1, nodes)
    reference = balancedness(w, ref_slots)
    target = np.minimum(reference - slack, 1.0)

    slots = carried.copy()
    mean_load = w.sum(-1) / devices
    target_max = mean_load / np.maximum(target, 1e-9)
    for layer in range(num_layers):
        need = _free_for_counts(w[layer], slots[layer], float(mean_load[layer] / max(target[layer], 1e-9)))
        if (slots[layer] < 0).any() or not incidence(slots[layer][None], experts)[0].any(0).all():
            _repair_layer(
                w[layer], slots[layer], allowed[layer], restore_cap, need,
                float(target_max[layer]) if objective == "excess" else None,
            )

    cap = max_copies_per_layer if max_copies_per_layer is not None else devices * per
    spent = copies_per_device(carried, slots, experts).sum(-1)
    active = np.flatnonzero(balancedness(w, slots) < target)
    steps = 0
    while active.size:
        steps += 1
        moved, cost = _improve_step(
            w, slots, allowed, active, light_devices, target_max[active] if objective == "excess" else None
        )
        spent[moved] += cost
        still = balancedness(w[moved], slots[moved]) < target[moved]
        active = moved[still & (spent[moved] < cap)]
    if revert:
        for layer in range(num_layers):
            if balancedness(w[layer][None], slots[layer][None])[0] >= target[layer]:
                _revert_layer(w[layer], slots[layer], carried[layer], float(target[layer]))

    polished = 0
    if polish_s > 0:
        for layer in range(num_layers):
            b_now = balancedness(w[layer][None], slots[layer][None])[0]
            d = device_loads(w[layer][None], slots[layer][None])[0]
            load_cap = max(float(d.max()), float(d.mean()) / max(float(target[layer]), 1e-9))
            pr = polish_layer(w[layer], carried[layer], slots[layer], allowed[layer], load_cap, polish_s / num_layers)
            if pr.sets is None:
                continue
            cand = sets_to_slots(carried[layer], pr.sets)
            if balancedness(w[layer][None], cand[None])[0] >= min(b_now, float(target[layer])):
                slots[layer] = cand
                polished += 1
    # a layer the search could not bring to its target takes the reference (relabelled to keep most
    # experts in place, duplicates repaired) when that balances better
    fallback = np.flatnonzero(balancedness(w, slots) < target)
    used: list[int] = []
    ref_counts = incidence(ref_slots, experts).sum(1)
    for fl in fallback:
        options = []
        fb_cap = float(mean_load[fl] / max(float(target[fl]), 1e-9))
        for counts in (ref_counts[fl], incidence(slots[fl][None], experts)[0].sum(0)):
            packed = sticky_pack(w[fl], counts, carried[fl], allowed[fl], fb_cap)
            if packed is not None:
                options.append(packed)
        relabelled = relabel_devices(carried[fl], ref_slots[fl], experts)
        relabelled = carry_over(relabelled[None], list(range(devices)), per)[0]  # drop same-device duplicates
        _repair_layer(w[fl], relabelled, allowed[fl], restore_cap)
        options.append(relabelled)
        best = slots[fl]
        best_key = (balancedness(w[fl][None], best[None])[0] >= target[fl], 0, balancedness(w[fl][None], best[None])[0])
        for cand in options:
            b = balancedness(w[fl][None], cand[None])[0]
            c = int(copies_per_device(carried[fl][None], cand[None], experts).sum())
            key = (b >= target[fl], -c if b >= target[fl] else 0, b)
            if key > best_key:
                best, best_key = cand, key
        if best is not slots[fl]:
            slots[fl] = best
            used.append(int(fl))
    fallback = np.asarray(used, dtype=np.int64)
    return RebalanceResult(
        slots=slots, carried=carried, target=target, reference=reference, fallback_layers=fallback, steps=steps,
        polished_layers=polished,
    )


def relabel_devices(before: IntArray, after: IntArray, experts: int) -> IntArray:
    """Permute the devices of ``after`` (``[G, S]``) to keep the most experts where ``before`` has them."""
    mb = incidence(before[None], experts)[0].astype(np.int64)
    ma = incidence(after[None], experts)[0].astype(np.int64)
    overlap = ma @ mb.T  # [new g, old position]
    devices = after.shape[0]
    solver = linear_sum_assignment.SimpleLinearSumAssignment()
    for i in range(devices):
        for j in range(devices):
            solver.add_arc_with_cost(i, j, -int(overlap[i, j]))
    if solver.solve() != solver.OPTIMAL:
        return after.copy()
    out = np.empty_like(after)
    for i in range(devices):
        out[solver.right_mate(i)] = after[i]
    return out
