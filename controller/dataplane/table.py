"""The routing table the controller pushes to the router, and the per-request decision.

A table is versioned; the router keeps the highest version it has seen and refuses older ones
(a delayed push must not undo a newer decision). A table expires ``ttl_s`` seconds after it was
received: the controller re-pushes every cycle, so an expired table means the controller is gone
and the router falls back to the safe choice, "large only". No table at all means the same. A
request is never dropped for want of a table.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from policies.plan import SetRoutingShare

DEFAULT_TTL_S = 30.0
SCORE_WINDOW = 2000  # recent difficulty scores kept to turn a share into a threshold
MIN_SCORES = 50  # below this many, use the table's own threshold (calibrated on MMLU)
REFRESH_EVERY = 25  # recompute the quantile threshold every this many requests


class RouteReason(StrEnum):
    """Why a request went where it went (the ``x-wattplane-route-reason`` header and a metric label)."""

    BELOW_THRESHOLD = "below-threshold"  # easy enough for the fallback under the table in force
    ABOVE_THRESHOLD = "above-threshold"
    NO_TABLE = "no-table"
    STALE_TABLE = "stale-table"
    FALLBACK_FAILED = "fallback-failed"  # the fallback errored; served by the large model instead
    LARGE_FAILED = "large-failed"  # the large model errored; served by the fallback instead


class RoutingTable(BaseModel):
    """One deployment's routing: difficulty below ``threshold`` goes to ``fallback``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=0)
    deployment: str = Field(min_length=1)
    fallback: str = Field(min_length=1)
    threshold: float
    fallback_share: float = Field(ge=0, le=1)
    expected_quality: float = Field(ge=0, le=1, default=1.0)
    ttl_s: float = Field(gt=0, default=DEFAULT_TTL_S)


def table_from_action(action: SetRoutingShare, ttl_s: float = DEFAULT_TTL_S) -> RoutingTable:
    return RoutingTable(
        version=action.version, deployment=action.deployment, fallback=action.fallback,
        threshold=action.threshold, fallback_share=action.fallback_share,
        expected_quality=action.expected_quality, ttl_s=ttl_s,
    )


class TableHolder:
    """The router's current table with the (router-local, monotonic) time it arrived.

    The table's ``threshold`` was calibrated on the scorer's training distribution (MMLU); live
    traffic scores differently. What the LP decided is a *share*, so once enough requests have
    been seen the router applies the share as a quantile of its recent scores: the easiest
    ``fallback_share`` of current traffic goes to the fallback, whatever the score scale.
    """

    def __init__(self) -> None:
        self.table: RoutingTable | None = None
        self.received_at: float = 0.0
        self.recent: deque[float] = deque(maxlen=SCORE_WINDOW)
        self._threshold: float | None = None
        self._since_refresh = 0

    def offer(self, table: RoutingTable, now: float) -> bool:
        """Install ``table`` unless an equal-or-newer version is already there; refresh TTL on equal."""
        if self.table is not None and table.version < self.table.version:
            return False
        self.table = table
        self.received_at = now
        self._threshold = None
        return True

    def is_stale(self, now: float) -> bool:
        return self.table is not None and now - self.received_at > self.table.ttl_s

    def threshold(self) -> float:
        """The score below which requests go to the fallback now."""
        table = self.table
        assert table is not None
        if table.fallback_share <= 0.0:
            return float("-inf")  # share 0 means none, whatever the warm-up state
        if table.fallback_share >= 1.0:
            return float("inf")
        if len(self.recent) < MIN_SCORES:
            return table.threshold
        if self._threshold is None or self._since_refresh >= REFRESH_EVERY:
            ordered = sorted(self.recent)
            k = round(table.fallback_share * len(ordered))
            if k <= 0:
                self._threshold = float("-inf")
            elif k >= len(ordered):
                self._threshold = float("inf")
            else:
                # midway between the k-th and (k+1)-th score: k of the window fall below (ties aside)
                lo, hi = ordered[k - 1], ordered[k]
                self._threshold = (lo + hi) / 2 if hi > lo else hi
            self._since_refresh = 0
        return self._threshold

    def decide(self, difficulty: float, now: float) -> tuple[bool, RouteReason]:
        """(use the fallback?, why) for a request of this difficulty."""
        self.recent.append(difficulty)
        self._since_refresh += 1
        if self.table is None:
            return False, RouteReason.NO_TABLE
        if self.is_stale(now):
            return False, RouteReason.STALE_TABLE
        if difficulty < self.threshold():
            return True, RouteReason.BELOW_THRESHOLD
        return False, RouteReason.ABOVE_THRESHOLD
