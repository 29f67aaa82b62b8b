"""The agent-local power guard and the fail-safe: protection that needs no controller.

Guard: when the node's measured GPU power exceeds its share of the power domain, cap every device
so the node fits in ``share * (1 - margin)``, splitting the allowance in proportion to current
draw (busy devices keep more), tightening on every step while still over. It releases only after
power has stayed below ``share * (1 - release)`` for ``hold_s`` (hysteresis against flapping).
It runs every ``period_s`` (default 0.25 s), so it acts well within one second of an overshoot.

Fail-safe: once the controller has been unreachable for ``failsafe_after_s``, the controller's
last caps are kept only if they are safe on their own (their sum fits in the share whatever the
load); otherwise each device is limited to an even split of the share (re-split when the share
changes while it holds). Reconnecting clears it.

Shares are the controller's, but a budget cut must not wait for it: ``scaled_share`` lowers a share
in proportion when the domain budget the agent reads is below the one the share was computed from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agents.limits import Limits, clamp
from agents.sources import DeviceSample


@dataclass
class GuardConfig:
    share_w: float = 0.0  # the node's share of its domain budget; 0 disables guard and fail-safe
    margin: float = 0.03  # target this far below the share when capping
    release: float = 0.10  # release when power is this far below the share ...
    hold_s: float = 5.0  # ... for this long
    period_s: float = 0.25
    failsafe_after_s: float = 10.0
    cut_grace_s: float = 10.0  # a connected controller's time to act on a budget cut before the agent scales


class PowerGuard:
    def __init__(self, config: GuardConfig, limits: Limits) -> None:
        self.config = config
        self.limits = limits
        self.active = False
        self.engagements = 0
        self._below_since: float | None = None
        self._failsafe_share: float | None = None  # the share the fail-safe caps in force were split from

    def step(self, now: float, samples: Sequence[DeviceSample]) -> bool:
        """Update the guard layer from one reading; True when limits changed."""
        share = self.config.share_w
        if share <= 0:
            return False
        measured = sum(s.power_w for s in samples)
        lim = self.limits
        if measured > share:
            target = share * (1.0 - self.config.margin)
            caps = _proportional_caps(samples, lim, target, measured)
            self.active = True
            self._below_since = None
            changed = any(lim.guard_w[s.index] != caps[s.index] for s in samples)
            if changed:
                self.engagements += 1
                for s in samples:
                    lim.guard_w[s.index] = caps[s.index]
            return changed
        if not self.active:
            return False
        if measured < share * (1.0 - self.config.release):
            if self._below_since is None:
                self._below_since = now
            elif now - self._below_since >= self.config.hold_s:
                self.active = False
                self._below_since = None
                lim.guard_w = [None] * len(lim.guard_w)
                return True
        else:
            self._below_since = None
        return False

    def failsafe(self, controller_lost_for_s: float | None) -> bool:
        """Apply or clear the fail-safe layer; True when limits changed."""
        lim = self.limits
        share = self.config.share_w
        lost = controller_lost_for_s is not None and controller_lost_for_s >= self.config.failsafe_after_s
        if not lost or share <= 0:
            if any(c is not None for c in lim.failsafe_w):
                lim.failsafe_w = [None] * len(lim.failsafe_w)
                return True
            return False
        if any(c is not None for c in lim.failsafe_w) and self._failsafe_share == share:
            return False
        self._failsafe_share = share
        last = [
            lim.controller_w[d.index] if lim.controller_w[d.index] is not None else d.max_power_w for d in lim.devices
        ]
        if sum(c for c in last if c is not None) <= share:
            # the last caps hold the share at any load: keep them (and drop a split of an older, larger share)
            if any(c is not None for c in lim.failsafe_w):
                lim.failsafe_w = [None] * len(lim.failsafe_w)
                return True
            return False
        even = share / max(1, len(lim.devices))
        caps: list[float | None] = [clamp(even, d.min_power_w, d.max_power_w) for d in lim.devices]
        changed = caps != lim.failsafe_w
        lim.failsafe_w = caps
        return changed


def scaled_share(share_w: float, share_budget_w: float, budget_w: float | None) -> float:
    """The node's share under a domain budget read after the share was computed: ``share * budget /
    share_budget`` when the budget fell, else the share unchanged. Never raised: a larger budget is for
    the controller to hand out (it knows the other nodes' draw), and a share of unknown basis stays."""
    if share_w <= 0 or share_budget_w <= 0 or budget_w is None or budget_w < 0 or budget_w >= share_budget_w:
        return share_w
    return share_w * budget_w / share_budget_w


def _proportional_caps(
    samples: Sequence[DeviceSample], lim: Limits, target: float, measured: float
) -> dict[int, float]:
    """Split ``target`` W in proportion to each device's draw, within legal ranges; never raise a cap."""
    caps: dict[int, float] = {}
    scale = target / measured if measured > 0 else 0.0
    for s in samples:
        dev = lim.devices[s.index]
        wanted = min(s.power_w * scale, lim.effective_w(s.index))
        caps[s.index] = round(clamp(wanted, dev.min_power_w, dev.max_power_w), 1)
    return caps
