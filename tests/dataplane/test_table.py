"""The router's table handling, without Ray: versions, staleness, share -> threshold."""

from __future__ import annotations

import random

from controller.dataplane.standin import LatencyModel
from controller.dataplane.table import MIN_SCORES, RouteReason, RoutingTable, TableHolder, table_from_action
from policies.plan import SetRoutingShare


def table(version: int, share: float = 0.5, threshold: float = 0.0, ttl: float = 10.0) -> RoutingTable:
    return RoutingTable(version=version, deployment="big", fallback="small", threshold=threshold,
                        fallback_share=share, ttl_s=ttl)


def test_missing_and_stale_tables_mean_large_only() -> None:
    h = TableHolder()
    assert h.decide(-5.0, now=0.0) == (False, RouteReason.NO_TABLE)
    h.offer(table(1, ttl=10.0), now=0.0)
    assert h.decide(-5.0, now=5.0) == (True, RouteReason.BELOW_THRESHOLD)
    assert h.decide(-5.0, now=10.5) == (False, RouteReason.STALE_TABLE)
    h.offer(table(1, ttl=10.0), now=10.6)  # re-push of the same version refreshes the TTL
    assert h.decide(-5.0, now=11.0)[1] == RouteReason.BELOW_THRESHOLD


def test_older_versions_are_refused() -> None:
    h = TableHolder()
    assert h.offer(table(3), now=0.0)
    assert not h.offer(table(2), now=1.0)
    assert h.table is not None and h.table.version == 3
    assert h.offer(table(4), now=2.0)


def test_share_applies_to_live_score_distribution() -> None:
    rng = random.Random(0)
    h = TableHolder()
    h.offer(table(1, share=0.3, threshold=100.0), now=0.0)  # a threshold from another score scale
    decisions = [h.decide(rng.gauss(5.0, 1.0), now=1.0)[0] for _ in range(3000)]
    warm = decisions[MIN_SCORES * 4:]
    assert abs(sum(warm) / len(warm) - 0.3) < 0.05
    h.offer(table(2, share=0.0), now=2.0)
    assert not any(h.decide(rng.gauss(5.0, 1.0), now=2.0)[0] for _ in range(200))
    h.offer(table(3, share=1.0), now=3.0)
    assert all(h.decide(rng.gauss(5.0, 1.0), now=3.0)[0] for _ in range(200))


def test_table_from_action_keeps_version_and_share() -> None:
    a = SetRoutingShare(deployment="big", fallback="small", threshold=0.1, fallback_share=0.25, version=7)
    t = table_from_action(a, ttl_s=3.0)
    assert (t.version, t.fallback_share, t.threshold, t.ttl_s) == (7, 0.25, 0.1, 3.0)


def test_standin_capacity_matches_profile() -> None:
    m = LatencyModel("m", out_tok_s=1000.0, in_tok_s=4000.0, slots=8, time_scale=2.0)
    # one replica serves 1 / (scale * (O/out + P/in)) requests/s, whatever the slot count
    assert abs(m.requests_per_s(400, 100) - 1 / (2.0 * (0.1 + 0.1))) < 1e-9


def test_share_zero_and_one_hold_before_warm_up() -> None:
    h = TableHolder()
    h.offer(table(1, share=0.0, threshold=100.0), now=0.0)  # a threshold that would route everything
    assert h.decide(5.0, now=0.0) == (False, RouteReason.ABOVE_THRESHOLD)
    h.offer(table(2, share=1.0, threshold=-100.0), now=0.0)
    assert h.decide(5.0, now=0.0) == (True, RouteReason.BELOW_THRESHOLD)
