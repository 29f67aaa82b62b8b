"""``wattplane bench moe``: incremental expert re-placement vs DeepSeek's EPLB.

No real per-expert load traces are public, so loads are synthetic with real model shapes
(DeepSeek-V3 58 x 256 top-8 in 8 groups; Qwen3-235B-A22B 94 x 128 top-8; Mixtral-8x7B 32 x 8
top-2). Expert popularity follows a Zipf, lognormal or power-law skew, capped at 1/top_k (a token
picks k distinct experts, so no expert sees more than 1/k of the assignments), and a batch of
tokens is sampled from it; drift multiplies popularity by lognormal noise between steps.

Every method starts from the same placement (EPLB's global policy on step 0's load) and then
threads its own placement through the steps; scale and failure cases start from that placement too.
Each plan is scored on the load it was made from (``balancedness_*``) and on the
next step's load (``balancedness_next_mean``). Methods: ``wattplane`` (policies.moe_core.rebalance),
``eplb`` (rebalance_experts, global policy: ours is flat too), ``eplb_relabel`` (EPLB's output with
devices optimally relabelled per layer to keep experts in place) and, where EPLB would choose it,
``eplb_hierarchical`` (as DeepSeek calls it: groups packed to nodes of 8 GPUs). ``solve_s`` is wall
time, ``solve_cpu_s`` this process's CPU time (the 2 cores are shared, so wall time is noisy).
Copies are counted per device as experts it must receive (slot order inside a device is free).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.common import Case, Metrics
from policies.baselines.eplb import rebalance_experts
from policies.moe_core import (
    balancedness,
    carry_over,
    copies_per_device,
    copy_lower_bound,
    rebalance,
    relabel_devices,
)


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    experts: int
    top_k: int
    groups: int
    bytes_per_expert: int
    gpus_per_node: int = 8


# bytes per expert: 3 projection matrices (gate, up, down) of hidden x moe_intermediate
DEEPSEEK_V3 = Shape("deepseek-v3", 58, 256, 8, 8, 3 * 7168 * 2048)  # FP8 weights
QWEN3_235B = Shape("qwen3-235b", 94, 128, 8, 1, 3 * 4096 * 1536 * 2)  # BF16
MIXTRAL = Shape("mixtral-8x7b", 32, 8, 2, 1, 3 * 4096 * 14336 * 2)  # BF16


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drift", type=float, default=0.15, help="lognormal sigma of popularity drift per step")
    parser.add_argument("--tokens", type=int, default=131072, help="tokens per load sample (a statistics window)")
    parser.add_argument("--polish-s", type=float, default=0.0, help="CP-SAT polish budget per plan for ours (s)")
    parser.add_argument("--steps", type=int, default=None, help="drift steps (default 3, 2 with --quick)")


# -- synthetic loads ----------------------------------------------------------------------------
def popularity(rng: np.random.Generator, layers: int, experts: int, skew: str) -> np.ndarray:
    if skew == "zipf":
        base = np.arange(1, experts + 1, dtype=np.float64) ** -1.0
        pop = np.stack([rng.permutation(base) for _ in range(layers)])
    elif skew == "lognormal":
        pop = rng.lognormal(0.0, 1.0, size=(layers, experts))
    elif skew == "powerlaw":
        pop = rng.pareto(1.5, size=(layers, experts)) + 1.0
    else:
        raise ValueError(f"unknown skew {skew!r}")
    return pop / pop.sum(-1, keepdims=True)


def cap_share(pop: np.ndarray, top_k: int) -> np.ndarray:
    """Water-fill: no expert may take more than 1/top_k of the assignments."""
    p = pop / pop.sum(-1, keepdims=True)
    cap = 1.0 / top_k
    for _ in range(p.shape[1]):
        over = p > cap
        if not over.any():
            break
        excess = np.where(over, p - cap, 0.0).sum(-1, keepdims=True)
        p = np.where(over, cap, p)
        free = np.where(p < cap, p, 0.0)
        p = p + excess * free / np.maximum(free.sum(-1, keepdims=True), 1e-300)
    return p


def sample_loads(rng: np.random.Generator, pop: np.ndarray, top_k: int, tokens: int) -> np.ndarray:
    p = cap_share(pop, top_k)
    return np.stack([rng.multinomial(tokens * top_k, row) for row in p]).astype(np.float64)


def drift(rng: np.random.Generator, pop: np.ndarray, sigma: float) -> np.ndarray:
    out = pop * np.exp(rng.normal(0.0, sigma, size=pop.shape))
    return out / out.sum(-1, keepdims=True)


# -- methods ------------------------------------------------------------------------------------
def eplb_slots(loads: np.ndarray, shape: Shape, devices: int, per: int, hierarchical: bool = False) -> np.ndarray:
    """EPLB's placement: global policy, or as DeepSeek calls it (hierarchical when groups % nodes == 0)."""
    nodes = max(1, devices // shape.gpus_per_node) if hierarchical else 1
    groups = shape.groups if hierarchical else 1
    phy2log, _, _ = rebalance_experts(loads, devices * per, groups, nodes, devices)
    return phy2log.reshape(loads.shape[0], devices, per)


def score(
    loads: np.ndarray, next_loads: np.ndarray, before: np.ndarray, after: np.ndarray, shape: Shape, seconds: float,
) -> Metrics:
    b = balancedness(loads, after)
    bn = balancedness(next_loads, after)
    per_dev = copies_per_device(before, after, shape.experts)  # [L, G]
    copies = int(per_dev.sum())
    dup = sum(
        int(len(set(row.tolist()) - {-1}) < int((row >= 0).sum())) for layer in after for row in layer
    )
    return {
        "balancedness_mean": float(b.mean()),
        "balancedness_worst": float(b.min()),
        "balancedness_next_mean": float(bn.mean()),
        "copies": float(copies),
        "copies_per_layer": copies / loads.shape[0],
        "bytes_moved": float(copies * shape.bytes_per_expert),
        "max_copies_into_device": float(per_dev.sum(0).max()),
        "devices_with_duplicate_expert": float(dup),
        "solve_s": seconds,
    }


def methods_for(shape: Shape, devices: int) -> tuple[str, ...]:
    """``eplb_hierarchical`` only where EPLB would pick it (groups split evenly over nodes)."""
    nodes = max(1, devices // shape.gpus_per_node)
    hier = shape.groups > 1 and shape.groups % nodes == 0 and devices % nodes == 0
    return ("wattplane", "eplb", "eplb_relabel", *(("eplb_hierarchical",) if hier else ()))


def plan_with(
    method: str, loads: np.ndarray, current: np.ndarray, origin: list[int | None], shape: Shape,
    devices: int, per: int, polish_s: float = 0.0,
) -> tuple[np.ndarray, float, float, float]:
    """One method's placement from ``current``: ``(slots [L, G, S], wall s, cpu s, fallback layers)``."""
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "wattplane":
        res = rebalance(loads, current, device_origin=origin, slots_per_device=per, polish_s=polish_s)
        return res.slots, time.perf_counter() - t0, time.process_time() - c0, float(len(res.fallback_layers))
    e = eplb_slots(loads, shape, devices, per, hierarchical=method == "eplb_hierarchical")
    if method == "eplb_relabel":
        carried = carry_over(current, origin, per)
        e = np.stack([relabel_devices(carried[i], e[i], shape.experts) for i in range(loads.shape[0])])
    return e, time.perf_counter() - t0, time.process_time() - c0, 0.0


def _mean_metrics(rows: list[Metrics]) -> Metrics:
    keys = rows[0].keys()
    agg = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    agg["balancedness_worst"] = float(min(r["balancedness_worst"] for r in rows))
    agg["solve_s"] = float(max(r["solve_s"] for r in rows))  # worst step
    agg["solve_cpu_s"] = float(max(r["solve_cpu_s"] for r in rows))
    agg["max_copies_into_device"] = float(max(r["max_copies_into_device"] for r in rows))
    return agg


# -- cases --------------------------------------------------------------------------------------
def drift_case(
    rng: np.random.Generator, shape: Shape, devices: int, per: int, skew: str, steps: int, args: argparse.Namespace
) -> Case:
    pop = popularity(rng, shape.layers, shape.experts, skew)
    loads = sample_loads(rng, pop, shape.top_k, args.tokens)
    start = eplb_slots(loads, shape, devices, per)
    methods = methods_for(shape, devices)
    current = {m: start for m in methods}
    origin: list[int | None] = list(range(devices))
    rows: dict[str, list[Metrics]] = {m: [] for m in current}
    for _ in range(steps):
        pop = drift(rng, pop, args.drift)
        loads = sample_loads(rng, pop, shape.top_k, args.tokens)
        next_loads = sample_loads(rng, drift(rng, pop, args.drift), shape.top_k, args.tokens)
        for method in methods:
            carried = carry_over(current[method], origin, per)
            slots, secs, cpu, fb = plan_with(method, loads, current[method], origin, shape, devices, per, args.polish_s)
            rows[method].append(score(loads, next_loads, carried, slots, shape, secs))
            rows[method][-1]["fallback_layers"] = fb
            rows[method][-1]["solve_cpu_s"] = cpu
            current[method] = slots
    params: dict[str, Any] = {
        "model": shape.name, "layers": shape.layers, "experts": shape.experts, "devices": devices,
        "slots_per_device": per, "skew": skew, "drift_sigma": args.drift, "steps": steps, "tokens": args.tokens,
        "start": "eplb placement of step 0; each method then threads its own placement",
    }
    name = f"{shape.name}-{devices}gpu-{skew}-drift"
    return Case(name=name, params=params, methods={m: _mean_metrics(r) for m, r in rows.items()})


def event_case(
    rng: np.random.Generator, shape: Shape, devices: int, per: int, skew: str, new_devices: int,
    failed: tuple[int, ...], args: argparse.Namespace,
) -> Case:
    """A scale event (n -> n') or device failure, planned from an EPLB placement of the current load."""
    pop = popularity(rng, shape.layers, shape.experts, skew)
    loads = sample_loads(rng, pop, shape.top_k, args.tokens)
    start = eplb_slots(loads, shape, devices, per)
    survivors = [g for g in range(devices) if g not in failed][:new_devices]
    origin: list[int | None] = [*survivors, *([None] * (new_devices - len(survivors)))]
    new_per = per if failed else max(per, math.ceil(devices * per / new_devices))
    pop = drift(rng, pop, args.drift / 3)
    loads = sample_loads(rng, pop, shape.top_k, args.tokens)
    next_loads = sample_loads(rng, drift(rng, pop, args.drift), shape.top_k, args.tokens)
    carried = carry_over(start, origin, new_per)
    lb = float(copy_lower_bound(carried, shape.experts).sum())
    metrics: dict[str, Metrics] = {}
    for method in methods_for(shape, new_devices):
        slots, secs, cpu, fb = plan_with(method, loads, start, origin, shape, new_devices, new_per, args.polish_s)
        metrics[method] = score(loads, next_loads, carried, slots, shape, secs)
        metrics[method]["fallback_layers"] = fb
        metrics[method]["solve_cpu_s"] = cpu
        metrics[method]["copies_lower_bound"] = lb
    kind = "fail" if failed else "scale"
    name = f"{shape.name}-{devices}gpu-{kind}-{new_devices}" if not failed else f"{shape.name}-{devices}gpu-fail"
    params: dict[str, Any] = {
        "model": shape.name, "layers": shape.layers, "experts": shape.experts, "devices": devices,
        "new_devices": new_devices, "slots_per_device": per, "new_slots_per_device": new_per, "skew": skew,
        "failed_devices": list(failed),
        "copies_lower_bound": "per layer max(empty slots to fill, experts with no surviving replica), summed",
    }
    return Case(name=name, params=params, methods=metrics)


def run(args: argparse.Namespace) -> list[Case]:
    rng = np.random.default_rng(args.seed)
    quick = bool(args.quick)
    steps = args.steps or (2 if quick else 3)
    cases: list[Case] = []
    skews = ("zipf",) if quick else ("zipf", "lognormal", "powerlaw")
    for skew in skews:
        cases.append(drift_case(rng, DEEPSEEK_V3, 32, 9, skew, steps, args))
    if not quick:
        cases.append(drift_case(rng, DEEPSEEK_V3, 64, 5, "lognormal", steps, args))
        cases.append(drift_case(rng, DEEPSEEK_V3, 144, 2, "lognormal", steps, args))
        cases.append(drift_case(rng, QWEN3_235B, 16, 9, "lognormal", steps, args))
    cases.append(drift_case(rng, MIXTRAL, 4, 3, "lognormal", steps, args))
    targets = (36, 28) if quick else (36, 40, 28, 24)
    for new in targets:
        cases.append(event_case(rng, DEEPSEEK_V3, 32, 9, "lognormal", new, (), args))
    cases.append(event_case(rng, DEEPSEEK_V3, 32, 9, "lognormal", 31, (5,), args))
    return cases
