"""Simulation soak: the 10,000-GPU scale fleet for many simulated hours, watched for leaks and drift.

The run is ``benchmarks/simulate.py``'s scale case (every stage on) stretched to ``hours``. At
every control cycle it samples this process's RSS and threads, the CPU time of the pipeline and of
the whole control period, the size of the policies' State as it round-trips (JSON bytes per
stage), and the size of every container the simulator keeps (caches, replica and routing tables);
the cycle's wall latency comes from the simulator's own cycle records.

Memory the simulator may grow by design: its per-step result series (``[rows, steps]`` float64
arrays) are allocated for the whole run up front with ``np.zeros``. With 4 KiB pages the kernel maps
them only as they are written, so RSS rises by ``rows x 8`` bytes per simulated step without any
leak; with transparent huge pages (numpy asks for them on large arrays) the first column's writes
already map nearly all of it (numpy does so only for arrays of 4 MiB and more, so it depends on
the run's length). Which one happens is measured after the run (:func:`lazy_share`: arrays of the
same shapes, first column written, RSS before and after) and only that share of the series'
growth is subtracted; the verdict applies to what is left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from policies.pipeline import PipelineState
from policies.snapshot import Snapshot
from wattplane.simulate.engine import Simulation
from wattplane.simulate.load import generate_load
from wattplane.soak.probe import drift, growth, proc_status

HOUR_S = 3600.0


class SimProbe:
    """The simulation's per-cycle hooks: samples taken between the snapshot and the pipeline and after it."""

    def __init__(self, state_every: int = 10, rows_file: str | None = None) -> None:
        self.sim: Simulation | None = None
        if rows_file:
            Path(rows_file).parent.mkdir(parents=True, exist_ok=True)
        self.rows_file = open(rows_file, "a") if rows_file else None  # noqa: SIM115 - a long run's samples as they come
        self.state_every = state_every
        self.rows: list[dict[str, Any]] = []
        self._cpu_snapshot = 0.0
        self._cpu_last_cycle: float | None = None
        self._wall_last_cycle: float | None = None

    def on_snapshot(self, _snapshot: Snapshot) -> None:
        self._cpu_snapshot = time.process_time()

    def on_cycle(self, now: float, state: PipelineState) -> None:
        cpu = time.process_time()
        wall = time.perf_counter()
        row: dict[str, Any] = {"t": now, "pipeline_cpu_ms": (cpu - self._cpu_snapshot) * 1000, **proc_status()}
        if self._cpu_last_cycle is not None and self._wall_last_cycle is not None:
            row["period_cpu_s"] = cpu - self._cpu_last_cycle
            row["period_wall_s"] = wall - self._wall_last_cycle
        self._cpu_last_cycle, self._wall_last_cycle = cpu, wall
        if len(self.rows) % self.state_every == 0:
            row["state_bytes"] = {k: len(PipelineState(states={k: v}).model_dump_json())
                                  for k, v in state.states.items()}
            row["state_bytes"]["last_run"] = len(PipelineState(last_run=state.last_run).model_dump_json())
            row["containers"] = containers(self.sim) if self.sim is not None else {}
        self.rows.append(row)
        if self.rows_file is not None:
            self.rows_file.write(json.dumps(row) + "\n")
            self.rows_file.flush()


def containers(sim: Simulation) -> dict[str, int]:
    """Length of every dict/list/set the simulator and its fleet hold: a cache or table that grows with
    time (rather than with the fleet) shows up here."""
    out: dict[str, int] = {}
    for prefix, obj in (("sim", sim), ("fleet", sim.fleet)):
        for name, value in vars(obj).items():
            if isinstance(value, (dict, list, set, tuple)) and not isinstance(value, str):
                out[f"{prefix}.{name}"] = len(value)
    return out


def run_sim_soak(gpus: int = 10_000, hours: float = 24.0, seed: int = 0, window_h: float = 1.0,
                 max_rss_mib_per_h: float = 4.0, max_latency_drift: float = 1.5,
                 progress: Callable[[float], None] | None = None, rows_file: str | None = None,
                 burst: bool = True, warmup_h: float = 0.0) -> dict[str, Any]:
    """Run the soak and return the report (``failures`` empty when every bound held).

    ``burst=False`` drops the scale case's 1.5x burst: a run of a few hours is then stationary, so
    a fleet grown for the burst (and the allocator's high-water mark after it) is not read as a leak.
    ``warmup_h`` leaves the first hours out of every comparison (a short run's first window is
    otherwise the fleet still filling up, the States still empty).
    """
    from benchmarks.simulate import scale_scenario

    duration = hours * HOUR_S
    scenario = scale_scenario(gpus, duration)
    if not burst and scenario.load.synthetic is not None:
        load_spec = scenario.load.model_copy(update={"synthetic": scenario.load.synthetic.model_copy(
            update={"bursts": ()})})
        scenario = scenario.model_copy(update={"load": load_spec})
    pipeline = scenario.policy_sets(None)["wattplane"]
    rss0 = proc_status()["rss_mib"]
    load = generate_load(scenario, seed)
    probe = SimProbe(rows_file=rows_file)
    t0, c0 = time.perf_counter(), time.process_time()
    sim = Simulation(scenario, pipeline, load, seed, progress=progress, on_snapshot=probe.on_snapshot,
                     on_cycle=probe.on_cycle)
    probe.sim = sim
    result = sim.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    lazy = lazy_share(series_shapes(result.series, len(load.deployments), load.steps))
    warm = warmup_h * HOUR_S
    return analyse([r for r in probe.rows if r["t"] >= warm], [c for c in result.cycles if c["t"] >= warm],
                   result.series, len(load.deployments), load.steps, scenario.step_s,
                   window_h * HOUR_S, max_rss_mib_per_h, max_latency_drift, lazy) | {
        "params": {"gpus": gpus, "nodes": sum(p.nodes for p in scenario.pools),
                   "deployments": len(scenario.deployments),
                   "simulated_hours": hours, "step_s": scenario.step_s, "control_period_s": scenario.control_period_s,
                   "seed": seed, "burst": burst, "warmup_h": warmup_h,
                   "window_h": min(window_h, hours / 4) if hours < 2 * window_h else window_h},
        "run": {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rss_before_load_mib": round(rss0, 1),
                "cycles": len(result.cycles), "slo_attainment": round(result.metrics["slo_attainment"], 4),
                "invariant_violations": len(result.invariant_violations), "unavailable": result.unavailable},
    }


def series_bytes_per_step(series: dict[str, np.ndarray], n_dep: int, steps: int) -> float:
    """Bytes the simulator's per-step result arrays take per simulated step (the ones it returns plus
    its two per-deployment accumulators it does not return: met and received requests)."""
    returned = sum(a.nbytes for a in series.values() if a.ndim and a.shape[-1] == steps)
    return returned / max(steps, 1) + 2 * n_dep * 8


def series_shapes(series: dict[str, np.ndarray], n_dep: int, steps: int) -> list[tuple[int, ...]]:
    """Shapes of the per-step arrays the engine allocates: the ones it returns and its two
    per-deployment accumulators it does not (met and received requests)."""
    return [a.shape for a in series.values() if a.ndim and a.shape[-1] == steps] + [(n_dep, steps)] * 2


def lazy_share(shapes: list[tuple[int, ...]]) -> float:
    """Share of ``np.zeros`` arrays of these shapes that is *not* resident after their first column
    is written: 1 when pages are mapped as written (RSS grows with the run by design), ~0 when
    transparent huge pages map them at the first touch."""
    before = proc_status()["rss_mib"]
    probes = [np.zeros(shape) for shape in shapes]
    for a in probes:
        a[..., 0] = 1.0
    touched = proc_status()["rss_mib"] - before
    size = sum(a.nbytes for a in probes) / 2**20
    del probes
    return float(min(max(1.0 - touched / size, 0.0), 1.0)) if size > 0 else 0.0


def analyse(rows: list[dict[str, Any]], cycles: list[dict[str, Any]], series: dict[str, np.ndarray], n_dep: int,
            steps: int, step_s: float, window_s: float, max_rss_mib_per_h: float,
            max_latency_drift: float, lazy: float = 1.0) -> dict[str, Any]:
    t = [r["t"] for r in rows]
    by_design_mib_per_h = lazy * series_bytes_per_step(series, n_dep, steps) * (HOUR_S / step_s) / 2**20
    rss = growth("rss", "MiB", t, [r["rss_mib"] for r in rows], window_s)
    residual = growth("rss_minus_series", "MiB", t,
                      [r["rss_mib"] - by_design_mib_per_h * r["t"] / HOUR_S for r in rows], window_s)
    threads = growth("threads", "count", t, [r.get("threads", 0.0) for r in rows], window_s)
    ct = [c["t"] for c in cycles]
    lat = drift("cycle_wall_ms", "ms", ct, [c["snapshot_ms"] + c["pipeline_ms"] for c in cycles], window_s)
    pipe_cpu = drift("pipeline_cpu_ms", "ms", t, [r["pipeline_cpu_ms"] for r in rows], window_s)
    prow = [r for r in rows if "period_cpu_s" in r]
    period_cpu = drift("period_cpu_ms", "ms", [r["t"] for r in prow], [1000 * r["period_cpu_s"] for r in prow],
                       window_s)
    sampled = [r for r in rows if "state_bytes" in r]
    state = {k: growth(f"state.{k}", "bytes", [r["t"] for r in sampled], [r["state_bytes"].get(k, 0) for r in sampled],
                       window_s).to_json() for k in sorted({k for r in sampled for k in r["state_bytes"]})}
    conts = {k: growth(k, "items", [r["t"] for r in sampled], [r["containers"].get(k, 0) for r in sampled],
                       window_s).to_json() for k in sorted({k for r in sampled for k in r["containers"]})}
    failures = []
    if residual.slope_per_h > max_rss_mib_per_h:
        failures.append(f"RSS (series excluded) grows {residual.slope_per_h:.2f} MiB per simulated hour "
                        f"> {max_rss_mib_per_h} after warm-up")
    if pipe_cpu.mean_ratio > max_latency_drift:
        failures.append(f"pipeline CPU per cycle: mean last/first {pipe_cpu.mean_ratio:.2f} > {max_latency_drift}")
    if period_cpu.mean_ratio > max_latency_drift:
        failures.append(f"control-period CPU: mean last/first {period_cpu.mean_ratio:.2f} > {max_latency_drift}")
    return {
        "bounds": {"max_rss_mib_per_h": max_rss_mib_per_h, "max_latency_drift": max_latency_drift},
        "memory": {"rss": rss.to_json(), "rss_minus_series": residual.to_json(),
                   "series_by_design_mib_per_h": round(by_design_mib_per_h, 3),
                   "series_lazy_share": round(lazy, 3), "threads": threads.to_json(),
                   "peak_rss_mib": round(max(r["rss_mib"] for r in rows), 1) if rows else 0.0},
        "latency": {"cycle_wall_ms": lat.to_json(), "pipeline_cpu_ms": pipe_cpu.to_json(),
                    "period_cpu_ms": period_cpu.to_json()},
        "state_bytes": state,
        "containers": conts,
        "timeline": [{"t_h": round(r["t"] / HOUR_S, 3), "rss_mib": round(r["rss_mib"], 1),
                      "pipeline_cpu_ms": round(r["pipeline_cpu_ms"], 1)} for r in rows[:: max(1, len(rows) // 48)]],
        "failures": failures,
    }


__all__ = ["SimProbe", "analyse", "containers", "run_sim_soak", "series_bytes_per_step"]
