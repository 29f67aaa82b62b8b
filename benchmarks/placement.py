"""``wattplane bench placement``: our placement vs greedy cheapest-first vs the best homogeneous fleet.

Cases:

* ``trace-*``: demand curves from the Azure LLM conversation trace (2023-11-16, ~1 h, 19,366
  requests), one curve per deployment: the trace's per-window token rates, time-shifted by a
  per-deployment offset (so peaks do not coincide) and scaled per deployment (volume and, for
  "summarise"-style deployments, 3x the input and 0.5x the output tokens). Every cycle the
  forecast (``policies.forecast``) sees the last window's rates, each method plans, and the plan
  serves the next window. Metrics: ``cost_per_hour`` (mean $/h of replicas + power),
  ``slo_attainment`` (share of demanded output tokens served within the capacity at SLO),
  ``replica_changes_per_hour``, ``solve_ms_p50`` / ``solve_ms_p99``.
* ``scale-*``: a random fleet of 1,000 deployments x 20 pools x 10,000 GPUs with power domains
  and a current placement; ``solve_s`` (model building included) and ``gap`` (objective vs our
  best proven bound; for greedy, vs the same bound).

The fleet: five GPU types (B200, H100, A100, L40S, L4 at list-like $/GPU-hour), pools of
8-GPU nodes, power domains at 85% of nameplate. The homogeneous baseline gets a fleet of one GPU
type sized to fit (unlimited devices, no power domains), the best type by cost at full demand
coverage; greedy and ours share the heterogeneous fleet.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.common import Case
from policies.baselines.greedy import greedy_replicas
from policies.baselines.homogeneous import best_homogeneous
from policies.forecast import ForecastConfig, ForecastState, forecast_demand
from policies.placement import PlacementConfig, optimise
from policies.placement_instance import Instance, IntArray, build_instance, evaluate
from policies.profiles import REFERENCE_GPUS, default_table
from policies.snapshot import (
    AcceleratorSpec,
    Demand,
    ModelDeployment,
    ModelShape,
    MoEShape,
    Parallelism,
    Pool,
    PowerDomain,
    ReplicaSet,
    ServingTelemetry,
    Snapshot,
)
from wattplane.datasets import Request, data_file, load_azure_trace

TRACE = "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"

# GPU type -> (spec, $ per device-hour). Prices are round figures in the range of 2025 public
# on-demand GPU cloud list prices; what matters here is their order and rough ratios.
GPU_TYPES: dict[str, tuple[AcceleratorSpec, float]] = {
    "B200": (REFERENCE_GPUS["b200"], 5.50),
    "H100": (REFERENCE_GPUS["h100"], 3.00),
    "A100": (REFERENCE_GPUS["a100"], 1.80),
    "L40S": (REFERENCE_GPUS["l40s"], 1.00),
    "L4": (REFERENCE_GPUS["l4"], 0.50),
}

# model shapes served: (name, total B, active B, TP, MoE shape or None)
MODELS: list[tuple[str, float, float, int, MoEShape | None]] = [
    ("llama-3.1-8b", 8, 8, 1, None),
    ("qwen3-32b", 32, 32, 2, None),
    ("llama-3.1-70b", 70, 70, 4, None),
    ("qwen3-30b-a3b", 30, 3, 1, MoEShape(moe_layers=48, experts=128, top_k=8, bytes_per_expert=9_437_184)),
    ("qwen3-235b-a22b", 235, 22, 8, MoEShape(moe_layers=94, experts=128, top_k=8, bytes_per_expert=18_874_368)),
]
KINDS = {"chat": (1.0, 1.0), "summarise": (3.0, 0.5)}  # input, output token multipliers


def make_pools(
    n_pools: int, n_gpus: int, with_domains: bool = True
) -> tuple[tuple[Pool, ...], tuple[PowerDomain, ...]]:
    """``n_pools`` pools cycling over the GPU types, ``n_gpus`` devices in total, 8-GPU nodes."""
    names = list(GPU_TYPES)
    per_pool_nodes = max(1, n_gpus // 8 // n_pools)
    pools = []
    n_domains = max(1, n_pools // 5)
    for i in range(n_pools):
        spec, price = GPU_TYPES[names[i % len(names)]]
        pools.append(Pool(name=f"{names[i % len(names)].lower()}-{i // len(names)}", accelerator=spec,
                          gpus_per_node=8, cost_per_device_hour=price, max_nodes=per_pool_nodes,
                          power_domain=f"row-{i % n_domains}" if with_domains else None))
    domains = []
    if with_domains:
        for d in range(n_domains):
            nameplate = sum(p.accelerator.tdp_w * 8 * (p.max_nodes or 0) for p in pools if p.power_domain == f"row-{d}")
            domains.append(PowerDomain(name=f"row-{d}", budget_w=0.85 * nameplate, safety_margin=0.0))
    return tuple(pools), tuple(domains)


def make_deployments(n: int, rng: np.random.Generator) -> tuple[ModelDeployment, ...]:
    out = []
    for i in range(n):
        name, total, active, tp, moe = MODELS[int(rng.integers(len(MODELS)))]
        out.append(ModelDeployment(
            name=f"d{i:04d}-{name}", model=ModelShape(name=name, params_b=total, active_params_b=active, moe=moe),
            parallelism=Parallelism(tp=tp), min_replicas=1, max_replicas=200,
        ))
    return tuple(out)


# -- scale case -----------------------------------------------------------------------------------


def scale_snapshot(n_dep: int, n_pools: int, n_gpus: int, seed: int) -> Snapshot:
    """A random fleet at ~60% of its GPUs, with a current placement made for slightly different demand."""
    rng = np.random.default_rng(seed)
    pools, domains = make_pools(n_pools, n_gpus)
    deps = make_deployments(n_dep, rng)
    table = default_table()
    # size demand so the fleet is ~60% busy if every deployment ran on H100
    h100 = GPU_TYPES["H100"][0]
    weights = rng.lognormal(0.0, 1.0, n_dep)
    per_dev = []
    for d in deps:
        prof = table.for_deployment(d, h100)
        assert prof is not None
        per_dev.append(prof.tokens_per_s_capacity(5.0) / d.parallelism.devices)
    per_dev_arr = np.array(per_dev)
    gpus_each = 0.6 * n_gpus * weights / weights.sum()
    out_tps = gpus_each * per_dev_arr * 0.8
    demand = tuple(Demand(deployment=d.name, output_tokens_per_s=float(o), input_tokens_per_s=float(5 * o))
                   for d, o in zip(deps, out_tps, strict=True))
    snap = Snapshot(pools=pools, power_domains=domains, deployments=deps, demand=demand)
    # current placement: greedy for demand perturbed by +-20%
    prev = snap.model_copy(update={"demand": tuple(
        dm.model_copy(update={"output_tokens_per_s": dm.output_tokens_per_s * f,
                               "input_tokens_per_s": dm.input_tokens_per_s * f})
        for dm, f in zip(demand, rng.uniform(0.8, 1.2, n_dep), strict=True))})
    inst = build_instance(prev, table, PlacementConfig().instance_params())
    r = greedy_replicas(inst)
    replicas = tuple(ReplicaSet(deployment=inst.deployments[int(inst.pair_m[k])], pool=inst.pools[int(inst.pair_p[k])],
                                replicas=int(r[k]), ready=int(r[k])) for k in np.flatnonzero(r))
    return snap.model_copy(update={"replicas": replicas})


def run_scale(n_dep: int, n_pools: int, n_gpus: int, seed: int, config: PlacementConfig) -> Case:
    snap = scale_snapshot(n_dep, n_pools, n_gpus, seed)
    table = default_table()
    t0, c0 = time.perf_counter(), time.process_time()
    inst = build_instance(snap, table, config.instance_params())
    sol = optimise(inst, config)
    solve_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    g = greedy_replicas(inst)
    greedy_s = time.perf_counter() - t1
    g_obj = evaluate(inst, g).objective
    return Case(
        name=f"scale-{n_dep}x{n_pools}x{n_gpus}",
        params={"deployments": n_dep, "pools": n_pools, "gpus": n_gpus, "pairs": inst.n_pairs, "seed": seed},
        methods={
            "wattplane": {"solve_s": round(solve_s, 4), "solve_cpu_s": round(cpu_s, 4),
                          "gap": round(_gap(sol.objective, sol.bound), 5),
                          "gap_vs_lp": round(_gap(sol.objective, sol.lp_bound), 5),
                          "cost_per_hour": round(evaluate(inst, sol.r).cost_per_hour, 2),
                          "replica_changes": float(evaluate(inst, sol.r).changes)},
            "greedy": {"solve_s": round(greedy_s, 4), "gap": round(_gap(g_obj, sol.bound), 5),
                       "cost_per_hour": round(evaluate(inst, g).cost_per_hour, 2),
                       "replica_changes": float(evaluate(inst, g).changes)},
        },
    )


def _gap(objective: float, bound: float) -> float:
    return abs(objective - bound) / max(abs(objective), 1e-9)


# -- trace cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Per-window demand of one deployment: tokens/s in and out, requests/s."""

    inp: np.ndarray
    out: np.ndarray
    rps: np.ndarray


def trace_curves(requests: tuple[Request, ...], deps: tuple[ModelDeployment, ...], window_s: float,
                 rng: np.random.Generator, target_out_tps: float) -> list[Curve]:
    """Each deployment's demand: the trace rotated by a random offset, scaled to a lognormal volume."""
    t = np.array([r.t for r in requests])
    tin = np.array([r.input_tokens for r in requests], dtype=np.float64)
    tout = np.array([r.output_tokens for r in requests], dtype=np.float64)
    span = float(t.max()) + 1e-6
    n_w = int(span // window_s)
    volumes = rng.lognormal(0.0, 1.0, len(deps))
    volumes *= target_out_tps / volumes.sum()
    base_out = tout.sum() / span
    curves = []
    for d, vol in zip(deps, volumes, strict=True):
        shift = rng.uniform(0, span)
        tt = (t + shift) % span
        idx = np.minimum((tt // window_s).astype(np.int64), n_w - 1)
        kin, kout = KINDS["summarise" if rng.random() < 0.3 else "chat"]
        scale = vol / base_out
        inp = np.bincount(idx, weights=tin, minlength=n_w) / window_s * scale * kin
        out = np.bincount(idx, weights=tout, minlength=n_w) / window_s * scale * kout
        rps = np.bincount(idx, minlength=n_w) / window_s * scale
        curves.append(Curve(inp, out, rps))
        del d
    return curves


@dataclass
class Run:
    cost: list[float]
    served: float = 0.0
    demanded: float = 0.0
    changes: int = 0
    solve_ms: list[float] | None = None


Planner = Callable[[Snapshot, Instance], IntArray]


def simulate(snap0: Snapshot, curves: list[Curve], window_s: float, planner: Planner,
             params_unlimited: bool = False) -> Run:
    """Cycle per window: forecast from the last window, plan, serve the next window."""
    table = default_table()
    config = PlacementConfig()
    fstate = ForecastState()
    replicas: tuple[ReplicaSet, ...] = ()
    run = Run(cost=[], solve_ms=[])
    n_w = len(curves[0].out)
    names = [d.name for d in snap0.deployments]
    for w in range(n_w - 1):
        serving = tuple(ServingTelemetry(deployment=n, input_tokens_per_s=float(c.inp[w]),
                                         output_tokens_per_s=float(c.out[w]), requests_per_s=float(c.rps[w]))
                        for n, c in zip(names, curves, strict=True))
        snap = snap0.model_copy(update={"now": (w + 1) * window_s, "serving": serving, "replicas": replicas})
        fc = forecast_demand(snap, ForecastConfig(), fstate)
        fstate = fc.state
        snap = snap.model_copy(update={"demand": fc.demand})
        inst = build_instance(snap, table, config.instance_params(params_unlimited))
        t0 = time.perf_counter()
        r = planner(snap, inst)
        assert run.solve_ms is not None
        run.solve_ms.append((time.perf_counter() - t0) * 1000)
        run.changes += int(np.abs(r - inst.r0).sum())
        run.cost.append(float(inst.cost @ r))
        replicas = tuple(ReplicaSet(deployment=inst.deployments[int(inst.pair_m[k])],
                                    pool=inst.pools[int(inst.pair_p[k])], replicas=int(r[k]))
                         for k in np.flatnonzero(r))
        # serve window w+1 with these replicas: capacity at SLO for the actual token mix
        actual = tuple(Demand(deployment=n, input_tokens_per_s=float(c.inp[w + 1]),
                              output_tokens_per_s=float(c.out[w + 1])) for n, c in zip(names, curves, strict=True))
        real = build_instance(snap.model_copy(update={"demand": actual, "replicas": replicas}), table,
                              config.instance_params(params_unlimited))
        cover = np.bincount(real.pair_m, weights=real.cap * real.r0, minlength=len(names))
        out = real.demand_out
        run.served += float(np.minimum(cover, out).sum())
        run.demanded += float(out.sum())
    return run


def metrics(run: Run, window_s: float) -> dict[str, float]:
    hours = len(run.cost) * window_s / 3600
    ms = np.array(run.solve_ms or [0.0])
    return {
        "cost_per_hour": round(float(np.mean(run.cost)), 2),
        "slo_attainment": round(run.served / max(run.demanded, 1e-9), 5),
        "replica_changes_per_hour": round(run.changes / hours, 1),
        "solve_ms_p50": round(float(np.percentile(ms, 50)), 2),
        "solve_ms_p99": round(float(np.percentile(ms, 99)), 2),
    }


def trace_case(name: str, requests: tuple[Request, ...], n_dep: int, n_pools: int, nodes_per_pool: int,
               window_s: float, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    pools, domains = make_pools(n_pools, n_pools * nodes_per_pool * 8)
    deps = make_deployments(n_dep, rng)
    # demand sized so the fleet runs at roughly half its devices at the trace's mean
    target = 0.10 * n_pools * nodes_per_pool * 8 * 1000.0 / 4
    curves = trace_curves(requests, deps, window_s, rng, target)
    snap0 = Snapshot(pools=pools, power_domains=domains, deployments=deps)
    config = PlacementConfig()

    def ours(snap: Snapshot, inst: Instance) -> IntArray:
        return optimise(inst, config).r

    def greedy(snap: Snapshot, inst: Instance) -> IntArray:
        return greedy_replicas(inst)

    methods = {"wattplane": metrics(simulate(snap0, curves, window_s, ours), window_s),
               "greedy": metrics(simulate(snap0, curves, window_s, greedy), window_s)}
    # the best homogeneous fleet: the cheapest GPU type on which every deployment fits
    table = default_table()
    per_type: dict[str, dict[str, float]] = {}
    for acc in sorted({p.accelerator.model for p in pools}):
        spec = next(p.accelerator for p in pools if p.accelerator.model == acc)
        if any(table.for_deployment(d, spec) is None for d in deps):
            continue

        def homog(snap: Snapshot, inst: Instance, acc: str = acc) -> IntArray:
            _, r = best_homogeneous(inst, lambda sub: optimise(sub, PlacementConfig(cpsat_max_pairs=0)).r,
                                    restrict_to=[acc])
            return r

        per_type[acc] = metrics(simulate(snap0, curves, window_s, homog, params_unlimited=True), window_s)
    best_acc = min(per_type, key=lambda a: (per_type[a]["cost_per_hour"], a))
    methods["homogeneous"] = per_type[best_acc]
    return Case(name=name, params={"deployments": n_dep, "pools": n_pools, "gpus": n_pools * nodes_per_pool * 8,
                                   "window_s": window_s, "cycles": len(curves[0].out) - 1, "seed": seed,
                                   "homogeneous_gpu": best_acc, "trace": TRACE,
                                   "homogeneous_by_gpu": {a: m["cost_per_hour"] for a, m in per_type.items()}},
                methods=methods)


# -- entry points ---------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default=None, help="request arrivals CSV (Azure trace columns); default: data dir")
    parser.add_argument("--scale-deployments", type=int, default=1000)
    parser.add_argument("--scale-pools", type=int, default=20)
    parser.add_argument("--scale-gpus", type=int, default=10000)


def run(args: argparse.Namespace) -> list[Case]:
    path = args.trace or data_file(TRACE, args.data_dir)
    requests = load_azure_trace(path)
    seed = int(args.seed)
    cases = []
    if args.quick:
        cases.append(trace_case("trace-azure-conv-10dep", requests, 10, 5, 4, 300.0, seed))
        cases.append(run_scale(args.scale_deployments, args.scale_pools, args.scale_gpus, seed, PlacementConfig()))
    else:
        cases.append(trace_case("trace-azure-conv-40dep", requests, 40, 10, 8, 120.0, seed))
        for s in (seed, seed + 1, seed + 2):
            cases.append(run_scale(args.scale_deployments, args.scale_pools, args.scale_gpus, s, PlacementConfig()))
    return cases


__all__ = ["configure", "run"]
