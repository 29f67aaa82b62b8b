"""The routing benchmark's simulator and its equal-SLO comparison, on synthetic inputs (no data files)."""

from __future__ import annotations

import random

import pytest

from benchmarks.routing import Server, at_attainment, simulate
from policies.routing import DEFAULT_CLASSES


def arrivals(rate: float, seconds: float, seed: int = 0) -> list[tuple[float, int, int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while t < seconds:
        t += rng.expovariate(rate)
        out.append((t, 1000, 200))
    return out


LABELS = [(random.Random(i).random(), float(i % 3 == 0), 1.0) for i in range(500)]  # score, small ok, large ok
LARGE = Server(out_tok_s=2000.0, in_tok_s=10000.0, replicas=1)  # 0.2 s per request: 5 req/s
SMALL = Server(out_tok_s=8000.0, in_tok_s=40000.0, replicas=1)  # 20 req/s


def fixed(share: float) -> object:
    return lambda now, o, i, serving: share


def test_methods_see_the_large_models_queue_and_ttft() -> None:
    arr = arrivals(8.0, 120.0)  # 1.6x the large model's capacity: its queue grows every period
    seen: list[dict[str, float]] = []

    def watch(now: float, o: float, i: float, serving: dict[str, float]) -> float:
        seen.append(serving)
        return 0.0

    simulate(arr, LABELS, lambda t: LARGE, SMALL, 2.0, 10.0, watch, DEFAULT_CLASSES)
    assert seen[0] == {"queue_depth": 0.0, "requests_per_s": 0.0, "ttft_p99_ms": 0.0}  # nothing seen yet
    queues = [s["queue_depth"] for s in seen[1:]]
    assert queues[-1] > queues[0] and queues[-1] > 100  # ~3 more requests/s than it serves
    assert seen[-1]["ttft_p99_ms"] > 2000.0  # and the period's p99 shows it
    assert seen[-1]["requests_per_s"] == pytest.approx(8.0, rel=0.4)


def test_fixed_share_routes_that_share_and_relieves_the_queue() -> None:
    arr = arrivals(8.0, 300.0)  # 1.6x the large model's capacity
    large_only = simulate(arr, LABELS, lambda t: LARGE, SMALL, 2.0, 10.0, fixed(0.0), DEFAULT_CLASSES)
    half = simulate(arr, LABELS, lambda t: LARGE, SMALL, 2.0, 10.0, fixed(0.5), DEFAULT_CLASSES)
    assert large_only.large_calls == large_only.n
    assert half.large_calls / half.n == pytest.approx(0.5, abs=0.05)
    assert half.met_slo / half.n > 0.9 > large_only.met_slo / large_only.n
    # the fallback answers fewer of these correctly, so quality drops with the share
    assert half.correct < large_only.correct


def test_at_attainment_interpolates_between_grid_points() -> None:
    grid = [(0.0, {"slo_attainment": 0.5, "quality_recovered": 1.0}),
            (0.5, {"slo_attainment": 0.9, "quality_recovered": 0.8}),
            (1.0, {"slo_attainment": 1.0, "quality_recovered": 0.0})]
    m = at_attainment(grid, 0.7)
    assert m["share"] == pytest.approx(0.25)
    assert m["quality_recovered"] == pytest.approx(0.9)
    assert m["slo_attainment"] == pytest.approx(0.7)
    assert at_attainment(grid, 0.4)["share"] == 0.0
    assert at_attainment(grid, 1.5)["share"] == 1.0  # unreachable: the best the grid has
