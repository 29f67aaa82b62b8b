"""Staged expert migration that keeps serving: copy, then switch, then free, in rounds.

ElasticMoE's zero-downtime idea: a device loads new expert weights into spare memory while the
old map serves, the new map is published atomically, and only then are old copies freed. With
``spare`` spare expert buffers per device, a round copies at most ``spare`` replacements into each
device (filling empty slots needs no spare buffer), so a device never holds more than
``slots + spare`` experts. Every published map keeps every expert placed: a replacement that
removes an expert's last replica is only taken in the round that also adds it elsewhere.

The first round also restores experts lost with removed or failed devices and fills new slots;
after its switch the group runs in its new shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Round:
    """One copy/switch/free round of one layer: (device, slot, expert) triples."""

    copies: tuple[tuple[int, int, int], ...]  # expert copied into spare memory for (device, slot)
    frees: tuple[tuple[int, int, int], ...]  # old expert whose memory is released at (device, slot)


@dataclass(frozen=True)
class LayerStaging:
    final: IntArray  # [G, S] final slots (kept experts never move slot)
    rounds: tuple[Round, ...]
    peak_resident: IntArray  # [G] most experts resident on each device during any round
    within_budget: bool


def _chain(
    start: int,
    forced_add: int | None,
    adds: list[list[int]],
    removes: list[list[int]],
    after: dict[int, int],
    used: list[int],
    spare: int,
) -> list[tuple[int, int | None, int]] | None:
    """Replacements ``(device, add, remove)`` starting at ``start`` that keep every expert placed.

    A removal of an expert's last replica is only allowed together with an add of that expert on
    another device in the same round; following those adds either ends at a safe removal or
    closes a cycle (each device adds what the previous one removes), which is valid as a whole.
    """
    chain: list[tuple[int, int | None, int]] = []
    pos: dict[int, int] = {}
    dev, need = start, forced_add
    for _ in range(len(adds) + 1):
        rems = removes[dev]
        if not rems:
            return None
        safe = [a for a in rems if after.get(a, 0) >= 2]
        if safe:
            chain.append((dev, need, max(safe, key=lambda x: (after[x], -x))))
            return chain
        a = rems[0]
        chain.append((dev, need, a))
        pos[dev] = len(chain) - 1
        adders = [h for h in range(len(adds)) if a in adds[h]]
        for h in adders:
            if h in pos:
                j = pos[h]
                cycle = chain[j:]
                cycle[0] = (h, a, cycle[0][2])
                return cycle
        adders = [h for h in adders if used[h] < spare and removes[h]]
        if not adders:
            return None
        dev, need = adders[0], a
    return None


def _take(
    chain: list[tuple[int, int | None, int]],
    adds: list[list[int]],
    removes: list[list[int]],
    after: dict[int, int],
    used: list[int],
    chosen: list[tuple[int, int, int]],
) -> None:
    """Commit a chain to the round: counts, pending work and per-device budget use."""
    for dev, add, a in chain:
        b = add if add is not None else min(adds[dev], key=lambda x: (after.get(x, 0), x))
        used[dev] += 1
        after[b] = after.get(b, 0) + 1
        after[a] -= 1
        adds[dev].remove(b)
        removes[dev].remove(a)
        chosen.append((dev, b, a))


def stage_layer(carried: IntArray, target: IntArray, spare: int) -> LayerStaging:
    """Plan the rounds from ``carried`` (``[G, S]``, -1 empty) to the device sets of ``target``."""
    if spare < 1:
        raise ValueError("a staged migration needs at least one spare expert buffer per device")
    devices, per = carried.shape
    slots = carried.copy()
    want = [set(int(e) for e in row if e >= 0) for row in target]
    have = [set(int(e) for e in row if e >= 0) for row in slots]
    if any(len(have[g] - want[g]) > len(want[g] - have[g]) for g in range(devices)):
        raise ValueError("a device would lose slots: slots per device may not shrink")
    adds = [sorted(want[g] - have[g]) for g in range(devices)]
    removes = [sorted(have[g] - want[g]) for g in range(devices)]
    after: dict[int, int] = {}
    for g in range(devices):
        for e in have[g]:
            after[e] = after.get(e, 0) + 1
    peak = np.array([len(h) for h in have], dtype=np.int64)
    rounds: list[Round] = []
    within = True
    first = True
    while any(adds):
        copies: list[tuple[int, int, int]] = []
        frees: list[tuple[int, int, int]] = []
        # fill empty slots first (no spare memory needed), lost experts first
        for g in range(devices):
            empty = [k for k in range(per) if slots[g, k] < 0]
            fill = sorted(adds[g], key=lambda e: (after.get(e, 0) > 0, e))
            for k, e in zip(empty, fill, strict=False):
                slots[g, k] = e
                copies.append((g, k, e))
                adds[g].remove(e)
                after[e] = after.get(e, 0) + 1
        used = [0] * devices
        chosen: list[tuple[int, int, int]] = []

        if first:
            # experts lost with removed/failed devices come back at the first switch, budget or not
            for g in range(devices):
                for e in [x for x in adds[g] if after.get(x, 0) == 0]:
                    if e in adds[g] and after.get(e, 0) == 0:
                        found = _chain(g, e, adds, removes, after, used, devices * per)
                        if found is None:
                            raise ValueError(f"expert {e} cannot be restored on device {g}")
                        _take(found, adds, removes, after, used, chosen)
        progress = True
        while progress:
            progress = False
            for g in range(devices):
                while used[g] < spare and adds[g]:
                    found = _chain(g, None, adds, removes, after, used, spare)
                    if found is None:
                        break
                    _take(found, adds, removes, after, used, chosen)
                    progress = True
        resident = np.array([int((slots[g] >= 0).sum()) for g in range(devices)], dtype=np.int64)
        for g, b, a in chosen:
            k = int(np.flatnonzero(slots[g] == a)[0])
            copies.append((g, k, b))
            frees.append((g, k, a))
            resident[g] += 1
            slots[g, k] = b
        peak = np.maximum(peak, resident)
        if not copies:
            raise ValueError("no safe migration round exists (inconsistent target)")
        rounds.append(Round(copies=tuple(copies), frees=tuple(frees)))
        first = False
    within = within and bool((peak <= per + spare).all())
    return LayerStaging(final=slots, rounds=tuple(rounds), peak_resident=peak, within_budget=within)
