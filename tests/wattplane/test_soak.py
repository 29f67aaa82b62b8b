"""The soak's measuring parts (growth, drift, histogram quantiles, metrics parsing, chaos records) and the
simulator leaks it found (pod cache keyed by replicas long gone, an unbounded power-model memo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from wattplane.simulate import engine
from wattplane.simulate.engine import Simulation
from wattplane.simulate.load import generate_load
from wattplane.soak.churn import histogram_quantile, parse_metrics
from wattplane.soak.command import chaos_record
from wattplane.soak.probe import drift, growth, proc_status, windows, write_chaos_records
from wattplane.soak.sim import analyse, series_bytes_per_step


def test_growth_finds_a_steady_leak_and_not_a_warm_up() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(0, 24 * 3600, 60.0)
    noise = rng.normal(0, 2.0, len(t))
    warm = 200 + 80 * (1 - np.exp(-t / 900)) + noise  # fills in the first hour, then flat
    leak = warm + 3.0 * t / 3600  # 3 MiB per hour on top
    flat, leaking = growth("rss", "MiB", t, warm, 3600), growth("rss", "MiB", t, leak, 3600)
    assert abs(flat.slope_per_h) < 0.3
    assert leaking.slope_per_h == pytest.approx(3.0, abs=0.3)
    assert leaking.growth == pytest.approx(flat.growth + 3.0 * 23, abs=3)


def test_windows_shrink_to_a_quarter_of_a_short_run() -> None:
    first, last = windows([0, 10, 20, 30, 40, 50, 60, 70, 80], 3600)
    assert first.tolist() == [True, True, True] + [False] * 6
    assert last.tolist() == [False] * 6 + [True, True, True]


def test_drift_compares_the_first_and_last_window() -> None:
    t = np.arange(0, 7200, 60.0)
    v = np.where(t < 3600, 100.0, 250.0)
    d = drift("lat", "ms", t, v, 1800)
    assert (d.first_p50, d.last_p50, d.p50_ratio, d.mean_ratio) == (100.0, 250.0, 2.5, 2.5)


def test_histogram_quantile_matches_the_observations() -> None:
    reg = CollectorRegistry()
    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    h = Histogram("wattplane_reconcile_duration_seconds", "x", ["kind"], registry=reg, buckets=buckets)
    g = Gauge("wattplane_replicas", "x", ["namespace", "deployment"], registry=reg)
    g.labels("soak-1", "md-1").set(2)
    g.labels("other", "md-2").set(1)
    before = parse_metrics(generate_latest(reg).decode())
    rng = np.random.default_rng(0)
    obs = rng.uniform(0.01, 0.025, 900).tolist() + rng.uniform(0.5, 1.0, 100).tolist()
    for i, x in enumerate(obs):
        h.labels("md" if i % 2 else "pool").observe(x)  # kinds are summed
    after = parse_metrics(generate_latest(reg).decode(), naming="soak-1")
    assert after.naming == 1 and before.naming == 0
    assert after.values["wattplane_reconcile_duration_seconds_count"] == 1000
    assert set(after.by_kind) == {"md", "pool"} and after.by_kind["md"][float("inf")] == 500
    p50 = histogram_quantile(0.5, before.buckets, after.buckets)
    p99 = histogram_quantile(0.99, before.buckets, after.buckets)
    assert 0.01 <= p50 <= 0.025 and p50 == pytest.approx(float(np.percentile(obs, 50)), abs=0.003)
    assert 0.5 <= p99 <= 1.0
    assert np.isnan(histogram_quantile(0.5, after.buckets, after.buckets))  # nothing observed in between


def test_proc_status_reads_this_process() -> None:
    s = proc_status()
    assert s["rss_mib"] > 10 and s["threads"] >= 1


def test_chaos_records_go_to_the_env_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "chaos.jsonl"
    monkeypatch.setenv("WATTPLANE_CHAOS_RESULTS", str(out))
    ok = chaos_record("soak", {"failures": [], "data_lost": 0, "time_to_converge_s": 4.2})
    bad = chaos_record("soak", {"failures": ["RSS grew"]})
    write_chaos_records([ok, bad])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["tried"], x["survived"], x["data_lost"]) for x in lines] == [(1, True, 0), (1, False, 0)]
    assert lines[1]["detail"]["failures"] == ["RSS grew"]
    assert lines[0]["time_to_converge_s"] == 4.2
    monkeypatch.delenv("WATTPLANE_CHAOS_RESULTS")
    assert write_chaos_records([ok]) is None


def test_analyse_subtracts_the_series_kept_by_design_and_flags_a_leak() -> None:
    steps, n_dep = 7200, 2
    series = {"a": np.zeros((3, steps)), "b": np.zeros(steps), "budget_w": np.zeros(4)}
    per_step = series_bytes_per_step(series, n_dep, steps)
    assert per_step == 4 * 8 + 2 * n_dep * 8
    by_design = per_step * 3600 / 2**20
    rows = [{"t": t, "rss_mib": 300 + by_design * t / 3600, "threads": 2, "pipeline_cpu_ms": 50.0,
             "period_cpu_s": 0.1} for t in np.arange(60, steps, 60.0)]
    cycles = [{"t": r["t"], "snapshot_ms": 5.0, "pipeline_ms": 50.0} for r in rows]
    clean = analyse(rows, cycles, series, n_dep, steps, 1.0, 1800, 4.0, 1.5)
    assert clean["failures"] == [] and abs(clean["memory"]["rss_minus_series"]["slope_per_h"]) < 1e-6
    for r in rows:
        r["rss_mib"] += 10 * r["t"] / 3600
        r["pipeline_cpu_ms"] = 50.0 if r["t"] < 3600 else 120.0
    leaky = analyse(rows, cycles, series, n_dep, steps, 1.0, 1800, 4.0, 1.5)
    assert len(leaky["failures"]) == 2
    assert "RSS" in leaky["failures"][0] and "pipeline CPU" in leaky["failures"][1]


def test_simulator_caches_stay_bounded_by_the_live_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.simulate import scale_scenario

    monkeypatch.setattr(engine, "POWER_CACHE_MAX", 50)
    sc = scale_scenario(240, 1200.0)  # 30 nodes, placement every 2 min, a burst: replicas come and go
    cfg = sc.policy_sets(None)["wattplane"]
    stages = {k: v.model_copy(update={"method": "off"}) if k.value in ("moe", "rescheduling") else v
              for k, v in cfg.stages.items()}
    live_at_snapshot: list[set[int]] = []
    sim: Simulation | None = None

    def on_snapshot(_s: object) -> None:
        assert sim is not None
        live_at_snapshot.append(set(sim.fleet.replicas))

    sim = Simulation(sc, cfg.model_copy(update={"stages": stages}), generate_load(sc, 0), 0, on_snapshot=on_snapshot)
    sim.run()
    ever = set().union(*live_at_snapshot)
    assert len(ever) > len(live_at_snapshot[-1]), "the run should have removed some replicas"
    # the pod cache holds exactly the replicas alive at the last snapshot, none removed before it
    assert {rid for rid, _ in sim._pod_cache} == live_at_snapshot[-1]
    assert 0 < len(sim._power_cache) <= 50
