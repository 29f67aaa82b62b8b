"""The load side of a cluster run: what the scenario's requests do to the replicas the cluster runs.

``wattplane simulate --cluster`` lets the real controller place replicas (kwok pods), cap GPUs (node
agents over gRPC) and route (a router stand-in receiving its tables). This module closes the loop
the way real engines would: each tick it serves the scenario's arrivals with the capacity of the
replicas that are *Running in the cluster*, under the power limits the *agents' devices* hold, with
the fallback share in the *router's table* — then drives every node agent's simulated GPUs with the
resulting utilisation and hands each agent the serving telemetry its engines would export.

The serving model is the in-memory simulator's (``engine.py`` docstring: capacity from
``policies.profiles`` and the power model's throughput fraction, fluid queue, M/M/1 p99 TTFT pooled
over replicas, TPOT 0.6-1.4x median ITL). Latency and SLO figures of a cluster run therefore come
from this model applied to measured capacity; the run's report says so per metric.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from agents.sources import DeviceSample
from agents.sources.simulated import SimulatedSource
from policies import power_model
from policies.profiles import Profile, default_table
from policies.routing import DEFAULT_CLASSES, relative_quality, shares_for_total
from protos.wattplane.v1 import agent_pb2 as pb
from wattplane.simulate.engine import (
    MAX_QUEUE_S,
    P99_WAIT_FACTOR,
    RHO_SMOOTHING_S,
    TPOT_LOW,
    TPOT_SLOPE,
    serving_rates,
)
from wattplane.simulate.load import LoadSeries
from wattplane.simulate.scenario import Scenario


@dataclass(frozen=True)
class PodView:
    """A serving pod as the cluster shows it."""

    name: str
    node: str
    deployment: int
    pool: int
    gpus: int
    running: bool
    warm: bool = True  # Running for ``replica_startup_s`` (simulated): weights loaded, it serves


class ScenarioSource(SimulatedSource):
    """A node's simulated GPUs whose load the live fleet sets; remembers its last readings."""

    def __init__(self, fleet: LiveFleet, node: str, pool: int) -> None:
        spec = fleet.scenario.pools[pool].accelerator
        super().__init__(spec, gpus=fleet.scenario.pools[pool].gpus_per_node,
                         load=lambda _t, i: fleet.gpu_load(node, i), node_name=node)
        self.last_power: list[float] = []

    def sample(self) -> list[DeviceSample]:
        out = super().sample()
        self.last_power = [s.power_w for s in out]
        return out

    def limits_w(self) -> list[float]:
        """The power limits the devices hold now (a read of the device settings, no sample)."""
        return list(self._limits)


class LiveScraper:
    """Stands in for the agent's engine scraper: the serving telemetry of the node's replicas."""

    def __init__(self, fleet: LiveFleet, node: str) -> None:
        self.fleet, self.node = fleet, node
        self.errors = 0

    async def scrape(self) -> list[pb.ReplicaSample]:
        return self.fleet.replica_samples(self.node)

    def prefill_by_gpu(self, replicas: Sequence[pb.ReplicaSample], devices: Sequence[int]) -> dict[int, float]:
        """Each device's prompt share, as the engine on it would export it (idle devices: none)."""
        del replicas
        loads = {i: self.fleet.gpu_load(self.node, i) for i in devices}
        return {i: pf for i, (pf, busy) in loads.items() if busy > 0}


@dataclass
class Series:
    """Per-tick records (one tick = ``tick_s`` wall seconds = ``tick_s * time_scale`` simulated)."""

    t: list[float] = field(default_factory=list)
    span: list[float] = field(default_factory=list)
    power: list[list[float]] = field(default_factory=list)  # per domain (+ outside any domain), agents' readings
    requests: list[list[float]] = field(default_factory=list)  # after routing
    met: list[list[float]] = field(default_factory=list)
    ttft: list[list[float]] = field(default_factory=list)
    tpot: list[list[float]] = field(default_factory=list)
    served: list[list[float]] = field(default_factory=list)  # output tokens/s
    demand: list[list[float]] = field(default_factory=list)
    share: list[list[float]] = field(default_factory=list)
    ready: list[list[float]] = field(default_factory=list)  # per deployment x pool
    caps: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)  # $/h of the GPUs Running pods hold
    guard_nodes: list[float] = field(default_factory=list)


class LiveFleet:
    """Scenario load x the cluster's replicas -> per-GPU load for the agents and serving telemetry."""

    def __init__(self, scenario: Scenario, load: LoadSeries, namespace: str) -> None:
        self.scenario, self.load, self.namespace = scenario, load, namespace
        self.deps = [d.domain() for d in scenario.deployments]
        self.dep_index = {d.name: i for i, d in enumerate(self.deps)}
        self.pool_index = {p.name: i for i, p in enumerate(scenario.pools)}
        table = default_table()
        self.profiles: list[list[Profile | None]] = [
            [table.for_deployment(d, p.accelerator) for p in scenario.pools] for d in self.deps]
        n_dep = len(self.deps)
        rates = serving_rates(self.profiles, load)
        self.input_share, self.mean_out = rates.input_share, rates.mean_out
        self.base_cap, self.prefill = rates.base_cap, rates.prefill_fraction
        self.slo_ttft = np.array([d.slo.ttft_p99_ms for d in self.deps])
        self.slo_tpot = np.array([d.slo.tpot_p99_ms for d in self.deps])
        self.fallback = [self.dep_index.get(d.fallback.deployment, -1) if d.fallback else -1 for d in self.deps]
        self._lock = threading.Lock()
        self._gpu_load: dict[str, list[tuple[float, float]]] = {}
        self._samples: dict[str, list[pb.ReplicaSample]] = {}
        self.backlog = np.zeros(n_dep)
        self.offered: np.ndarray | None = None
        self.dropped = 0.0
        self.quality_loss = 0.0
        self.addressed = 0.0  # requests the scenario addressed so far
        self.routed = 0.0  # of which the router sent to a fallback
        self.series = Series()
        self._quality: dict[float, float] = {}

    # -- read by the agents' threads ----------------------------------------------------------------
    def gpu_load(self, node: str, index: int) -> tuple[float, float]:
        loads = self._gpu_load.get(node)
        return loads[index] if loads is not None and index < len(loads) else (0.0, 0.0)

    def replica_samples(self, node: str) -> list[pb.ReplicaSample]:
        with self._lock:
            return list(self._samples.get(node, ()))

    def reset(self) -> None:
        """Forget the warm-up: queues, smoothing, counters and series start again at t=0."""
        self.backlog = np.zeros(len(self.deps))
        self.offered = None
        self.dropped = self.quality_loss = self.addressed = self.routed = 0.0
        self.series = Series()

    # -- one tick ------------------------------------------------------------------------------------
    def step(self, t0: float, t1: float, pods: Sequence[PodView], node_pool: dict[str, int],
             limits: Callable[[str], list[float]], shares: dict[int, float]) -> None:
        """Serve the arrivals of simulated ``[t0, t1)`` with the Running replicas and publish the results.

        ``limits(node)`` are the power limits the node's devices hold; ``shares`` the fallback share in
        force per deployment (the router's table).
        """
        sc = self.scenario
        steps = self.load.steps
        i0, i1 = min(int(t0 // sc.step_s), steps), min(max(int(t1 // sc.step_s), int(t0 // sc.step_s) + 1), steps)
        span = max(t1 - t0, 1e-9)
        addressed = [a[:, i0:i1].sum(axis=1) for a in (self.load.requests, self.load.input_tokens,
                                                       self.load.output_tokens)]
        req, inp, out = (a.copy() for a in addressed)
        share = np.zeros(len(self.deps))
        self.addressed += float(addressed[0].sum())
        for d, sh in shares.items():
            fb = self.fallback[d]
            if fb < 0:
                continue
            share[d] = sh
            self.routed += float(addressed[0][d]) * sh
            self.quality_loss += float(addressed[0][d]) * (1.0 - self._routed_quality(sh))
            for arr in (req, inp, out):
                moved = arr[d] * sh
                arr[d] -= moved
                arr[fb] += moved
        # GPUs of Running pods, in pod-name order per node (the device plugin's allocation order)
        n_dep, n_pool = len(self.deps), len(sc.pools)
        gpus_ready = np.zeros((n_dep, n_pool))
        thr_sum = np.zeros((n_dep, n_pool))
        dep_gpus: dict[str, list[int]] = {}  # node -> deployment per GPU (-1: a replica still starting)
        held = np.zeros(n_dep)  # GPUs of Running pods per deployment, starting ones included
        held_on: dict[str, dict[int, int]] = {}
        for pod in sorted(pods, key=lambda p: p.name):
            if not pod.running or pod.node not in node_pool:
                continue
            used = dep_gpus.setdefault(pod.node, [])
            held[pod.deployment] += pod.gpus
            on_node = held_on.setdefault(pod.node, {})
            on_node[pod.deployment] = on_node.get(pod.deployment, 0) + pod.gpus
            if not pod.warm:  # still loading weights: holds its GPUs (idle draw), serves nothing yet
                used.extend([-1] * pod.gpus)
                continue
            lims = limits(pod.node)
            for _ in range(pod.gpus):
                g = len(used)
                used.append(pod.deployment)
                cap = lims[g] if g < len(lims) else None
                thr_sum[pod.deployment, pod.pool] += self._thr(pod.pool, cap, float(self.prefill[pod.deployment,
                                                                                               pod.pool]))
                gpus_ready[pod.deployment, pod.pool] += 1
        devices = np.array([d.parallelism.devices for d in self.deps], dtype=float)
        ready = np.floor(gpus_ready / devices[:, None])
        thr = np.where(gpus_ready > 0, thr_sum / np.maximum(gpus_ready, 1), 1.0)
        cap_dp = ready * self.base_cap * thr
        capacity = cap_dp.sum(axis=1)
        ttft_w = np.zeros(n_dep)
        tpot_w = np.zeros(n_dep)
        for d in range(n_dep):
            for p in range(n_pool):
                prof = self.profiles[d][p]
                if prof is not None and cap_dp[d, p] > 0:
                    ttft_w[d] += cap_dp[d, p] * prof.ttft_ms / max(thr[d, p], 1e-6)
                    tpot_w[d] += cap_dp[d, p] * prof.tpot_ms / max(thr[d, p], 1e-6)
        ttft_base = np.where(capacity > 0, ttft_w / np.maximum(capacity, 1e-9), np.inf)
        tpot_base = np.where(capacity > 0, tpot_w / np.maximum(capacity, 1e-9), np.inf)
        # the fluid queue and the latency model (engine.py)
        cap_tokens = capacity * span
        work = out + self.backlog
        served = np.minimum(work, cap_tokens)
        self.backlog = work - served
        over = np.maximum(self.backlog - capacity * MAX_QUEUE_S, 0.0)
        self.dropped += float(over.sum())
        self.backlog -= over
        util = np.where(cap_tokens > 0, served / np.maximum(cap_tokens, 1e-12), 0.0)
        alpha = 1.0 - math.exp(-span / RHO_SMOOTHING_S)
        self.offered = out / span if self.offered is None else self.offered + alpha * (out / span - self.offered)
        rho = np.where(capacity > 0, self.offered / np.maximum(capacity, 1e-12),
                       np.where(self.offered > 0, np.inf, 0.0))
        rho_c = np.minimum(rho, 0.99)
        n_ready = np.maximum(ready.sum(axis=1), 1)
        wait_ms = np.where(capacity > 0, self.backlog / np.maximum(capacity, 1e-12) * 1000, np.inf)
        ttft = ttft_base * (1 + P99_WAIT_FACTOR * rho_c / (1 - rho_c) / np.sqrt(n_ready))
        ttft = np.where(self.backlog > 0, ttft + wait_ms, ttft)
        ttft = np.where(out > 0, ttft, np.where(capacity > 0, ttft_base, 0.0))
        tpot = np.where(capacity > 0, tpot_base * (TPOT_LOW + TPOT_SLOPE * rho_c), np.inf)
        tpot = np.where(out > 0, tpot, np.where(capacity > 0, tpot_base, 0.0))
        met = (ttft <= self.slo_ttft) & (tpot <= self.slo_tpot) & (rho <= 1.0)
        # publish: per-GPU load for the agents' devices, per-node serving telemetry for their reports
        gpu_load: dict[str, list[tuple[float, float]]] = {}
        for node, used in dep_gpus.items():
            p = node_pool[node]
            gpu_load[node] = [(float(self.prefill[d, p] * util[d]), float(util[d])) if d >= 0 else (0.0, 0.0)
                              for d in used]
        # every Running pod's engine counts its part of the deployment's requests (a starting engine
        # sees them queue), so a scale-up in progress does not hide the load from the controller
        samples: dict[str, list[pb.ReplicaSample]] = {}
        for node, per_dep in held_on.items():
            for d, n in sorted(per_dep.items()):
                frac = n / max(held[d], 1.0)
                samples.setdefault(node, []).append(pb.ReplicaSample(
                    deployment=f"{self.namespace}/{self.deps[d].name}", replica=f"{node}/{self.deps[d].name}",
                    requests_per_s=float(addressed[0][d] / span * frac),
                    input_tokens_per_s=float(addressed[1][d] / span * frac),
                    output_tokens_per_s=float(addressed[2][d] / span * frac),
                    queue_depth=float(self.backlog[d] / max(self.mean_out[d], 1.0) * frac),
                    ttft_p99_ms=float(min(ttft[d], 1e9)), tpot_p99_ms=float(min(tpot[d], 1e9)),
                    prefill_fraction=float(self.prefill[d].max() * util[d])))
        self._gpu_load = gpu_load
        with self._lock:
            self._samples = samples
        s = self.series
        s.t.append(t0)
        s.span.append(span)
        s.requests.append(req.tolist())
        s.met.append(np.where(met, req, 0.0).tolist())
        s.ttft.append(ttft.tolist())
        s.tpot.append(tpot.tolist())
        s.served.append((served / span).tolist())
        s.demand.append((out / span).tolist())
        s.share.append(share.tolist())
        s.ready.append(ready.reshape(-1).tolist())

    def _thr(self, pool: int, cap: float | None, pf: float) -> float:
        spec = self.scenario.pools[pool].accelerator
        if cap is not None and cap >= spec.max_power_w - 0.5:
            cap = None
        return float(power_model.throughput_fraction(spec, cap, round(pf, 2), 1.0))

    def _routed_quality(self, share: float) -> float:
        key = round(share, 4)
        q = self._quality.get(key)
        if q is None:
            q = relative_quality(DEFAULT_CLASSES, shares_for_total(DEFAULT_CLASSES, key))
            self._quality[key] = q
        return q


__all__ = ["LiveFleet", "LiveScraper", "PodView", "ScenarioSource", "Series"]
