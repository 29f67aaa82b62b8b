"""The discrete-time fleet simulation: load in, policy pipeline on a period, physics every step.

Every ``step_s`` the simulator serves each deployment's arrivals with the capacity of its ready
replicas and computes latency and power; every ``control_period_s`` it builds a
:class:`~policies.snapshot.Snapshot` of the fleet (nodes, pods, per-GPU telemetry, serving
telemetry, expert loads), runs :func:`policies.pipeline.run_pipeline` — the same function the
controller runs — and applies the plans through the fleet's ports.

The serving model (fluid, per deployment; documented so results can be judged):

* capacity of a replica: ``Profile.tokens_per_s_capacity(input_share)`` output tokens/s from
  :mod:`policies.profiles` (prefill and decode share the replica's time), times the slowest GPU's
  ``throughput_fraction`` under its power cap (:mod:`policies.power_model`), times, for MoE
  models, ``0.5 + 0.5 * balancedness`` of the current expert placement under the current expert
  loads (half of a step waits for the hottest device);
* a queue carries output tokens that exceeded capacity into the next step (dropped after 60 s);
* ``rho`` = offered load (EWMA over 20 s: the queueing formula already accounts for Poisson
  noise, so per-second counts would count it twice) / capacity;
  TTFT p99 = ``ttft_base * (1 + 4.6 * rho / (1 - rho) / sqrt(n))`` + queue wait, where
  4.6 = -ln(0.01) is the M/M/1 p99 waiting factor and ``sqrt(n)`` the pooling gain of ``n``
  ready replicas; TPOT p99 = ``tpot_base * (0.6 + 0.8 * rho) / decode_speed`` with
  ``tpot_base`` the profile's median ITL at calibration load: 0.6x near idle (small batches),
  1.4x — a p99/median ratio typical of continuous batching — as the batch fills;
* a step meets its SLO when both p99s are within the deployment's SLO; SLO attainment is the share
  of requests that arrived in steps that met it;
* quality: each addressed request of a routed deployment counts the expected answer quality of
  its routing share relative to the large model alone (:func:`policies.routing.relative_quality`
  over the router's score bands); ``quality`` is the mean over all addressed requests;
* power per GPU: :func:`policies.power_model.gpu_power_w` with the deployment's utilisation
  (served / capacity) and prompt-phase share; idle GPUs draw idle power, background pods half load;
* the node agents' local guard (``agents/guard.py``) is emulated per node when a power stage runs:
  a node above its share of the domain budget is scaled to ``share * (1 - margin)`` within the
  step and its replicas slow down accordingly on the next (``guard_node_s`` counts node-seconds
  held). Shares are the controller's (:func:`policies.power.node_shares` on the nodes' last
  draws, every ``SHARE_PERIOD_S`` as its PowerDomain pass), so the guard engages where it would
  on a cluster. Scenario ``agent_guard: false`` turns it off to see the controller's caps alone.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

from agents.guard import GuardConfig
from policies import power_model
from policies.pipeline import OFF, PipelineConfig, PipelineState, Stage, run_pipeline
from policies.plan import Plan
from policies.power import node_shares_array
from policies.profiles import (
    TPOT_P99_IDLE,
    TPOT_P99_SLOPE,
    TTFT_P99_WAIT_FACTOR,
    Profile,
    ProfileTable,
    default_table,
)
from policies.routing import DEFAULT_CLASSES, relative_quality, shares_for_total
from policies.snapshot import (
    ExpertLoad,
    ExpertPlacement,
    GPUTelemetry,
    Node,
    Pod,
    Pool,
    PowerDomain,
    PriorityClass,
    ReplicaSet,
    ServingTelemetry,
    Snapshot,
)
from wattplane.simulate.fleet import ApplyReport, Replica, SimulatedFleet, apply_plan
from wattplane.simulate.load import LoadSeries
from wattplane.simulate.scenario import Scenario

MAX_QUEUE_S = 60.0  # queued work older than this is dropped (clients time out)
P99_WAIT_FACTOR = TTFT_P99_WAIT_FACTOR  # the latency model is policies.profiles' (one model for plan and sim)
MOE_EXPERT_SHARE = 0.5
RHO_SMOOTHING_S = 20.0  # utilisation in the latency formulas: EWMA of offered load over ~20 s
TPOT_LOW, TPOT_SLOPE = TPOT_P99_IDLE, TPOT_P99_SLOPE  # TPOT p99 = median ITL x (0.6 + 0.8 rho)
POWER_CACHE_MAX = 100_000  # memoised power-model calls (~20 MB at most)
# the controller hands out node shares on every PowerDomain pass, this often
# (controller.reconciler.controller.POWER_STATUS_PERIOD_S; importing it would load the kubernetes client)
SHARE_PERIOD_S = 2.0
# seconds of each node's draws the controller's hub keeps: HubConfig.history reports, one per
# agents.agent.AgentConfig.report_interval_s
DRAWS_KEPT_S = 8.0


@dataclass
class SimResult:
    """Everything a run produced: summary metrics, time series, and per-cycle records."""

    policy_set: str
    methods: dict[str, str]
    metrics: dict[str, float]
    series: dict[str, np.ndarray]  # name -> [steps] or [k, steps]
    series_labels: dict[str, list[str]]
    cycles: list[dict[str, Any]] = field(default_factory=list)
    invariant_violations: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    per_deployment: dict[str, dict[str, float]] = field(default_factory=dict)


class Simulation:
    def __init__(self, scenario: Scenario, pipeline: PipelineConfig, load: LoadSeries, seed: int,
                 policy_set: str = "wattplane", profiles: ProfileTable | None = None,
                 progress: Callable[[float], None] | None = None, check_invariants: bool = True,
                 on_snapshot: Callable[[Snapshot], None] | None = None, base_dir: Path | None = None,
                 data_dir: str | None = None,
                 on_cycle: Callable[[float, PipelineState], None] | None = None) -> None:
        self.scenario = scenario
        self.on_cycle = on_cycle  # after each pipeline run: (sim time, the state carried on); soak probes
        self.pipeline = pipeline
        self.load = load
        self.policy_set = policy_set
        self.rng = np.random.default_rng(seed + 7919)
        self.fleet = SimulatedFleet(scenario, np.random.default_rng(seed + 104729))
        self.table = profiles or default_table()
        self.progress = progress
        self.check_invariants = check_invariants
        self.on_snapshot = on_snapshot  # e.g. dump each cycle's snapshot (design §7)
        self.base_dir, self.data_dir = base_dir, data_dir  # where relative / data: paths resolve
        self.domains = [d.domain() for d in scenario.deployments]
        # profile per (deployment, pool); None when its weights do not fit there
        self.profiles: list[list[Profile | None]] = [
            [self.table.for_deployment(d, p.accelerator) for p in scenario.pools] for d in self.domains
        ]
        rates = serving_rates(self.profiles, load)
        self.input_share, self.mean_out = rates.input_share, rates.mean_out
        self.base_cap, self.prefill_fraction = rates.base_cap, rates.prefill_fraction
        self.priority = [d.priority for d in self.domains]
        self._power_cache: dict[tuple[int, float, float, float], float] = {}
        self._quality_cache: dict[float, float] = {}
        self._thr_cache: dict[tuple[int, float, float], float] = {}
        self._moe_init()
        self._static: tuple[tuple[Pool, ...], tuple[PowerDomain, ...]] | None = None
        self._guard_init()
        self._nodes: tuple[Node, ...] = ()
        self._nodes_key = b""
        self._pod_cache: dict[tuple[int, bytes], list[Pod]] = {}
        self._tele_key: np.ndarray | None = None  # last cycle's per-GPU readings (see _telemetry)
        # (groups it was built for, power of non-serving groups, serving groups (i, pool, role, cap, prefill))
        self._group_static: tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, float, float]]] | None = None
        self._tele_objs: list[GPUTelemetry] = []

    # -- MoE expert load (synthetic: Zipf skew, lognormal drift, shifts of the hot set) ---------
    def _moe_init(self) -> None:
        self.moe_loads: dict[int, np.ndarray] = {}
        for i, d in enumerate(self.domains):
            shape = d.model.moe
            if shape is None:
                continue
            ranks = np.arange(1, shape.experts + 1, dtype=float)
            base = ranks ** -self.scenario.moe_load.zipf_s
            loads = np.stack([self.rng.permutation(base) for _ in range(shape.moe_layers)])
            self.moe_loads[i] = loads / loads.sum(axis=1, keepdims=True)
            devices = d.parallelism.ep if d.parallelism.ep > 1 else d.parallelism.devices
            spd = d.moe_elasticity.slots_per_device if d.moe_elasticity else 1
            spd = max(spd, math.ceil(shape.experts / devices))
            phy = np.tile(np.arange(devices * spd) % shape.experts, (shape.moe_layers, 1))
            self.fleet.placements[i] = (0, phy, spd)
        self._shifts = sorted(self.scenario.moe_load.shift_at_s)

    def _moe_drift(self, now: float, dt: float) -> None:
        shift = bool(self._shifts) and self._shifts[0] <= now
        while self._shifts and self._shifts[0] <= now:
            self._shifts.pop(0)
        sigma = self.scenario.moe_load.drift * math.sqrt(max(dt, 0.0) / max(self.scenario.control_period_s, 1e-9))
        for i, loads in self.moe_loads.items():
            if shift:
                loads = np.stack([self.rng.permutation(row) for row in loads])
            loads = loads * np.exp(self.rng.normal(0.0, sigma, loads.shape))
            self.moe_loads[i] = loads / loads.sum(axis=1, keepdims=True)

    def balancedness(self, dep: int) -> float:
        """Mean over layers of (mean device load / max device load) for the current placement."""
        if dep not in self.moe_loads or dep not in self.fleet.placements:
            return 1.0
        loads = self.moe_loads[dep]
        _, phy, spd = self.fleet.placements[dep]
        n_layers, n_experts = loads.shape
        if phy.shape[0] != n_layers or phy.shape[1] % spd:
            return 1.0
        valid = phy >= 0
        rows = np.broadcast_to(np.arange(n_layers)[:, None], phy.shape)
        counts = np.zeros((n_layers, n_experts))
        np.add.at(counts, (rows[valid], phy[valid]), 1.0)
        safe = np.where(valid, phy, 0)
        slot = np.where(valid, loads[rows, safe] / np.maximum(counts[rows, safe], 1.0), 0.0)
        device = slot.reshape(n_layers, -1, spd).sum(axis=2)
        bal = device.mean(axis=1) / np.maximum(device.max(axis=1), 1e-12)
        bal = bal * (1 - np.where(counts == 0, loads, 0.0).sum(axis=1))  # unplaced experts' load is not served
        return float(np.clip(bal, 0.0, 1.0).mean())

    # -- the agent-local power guard (agents/guard.py), at node level ---------------------------
    def _guard_init(self) -> None:
        """The guard runs on every node agent whenever the controller hands out node shares, i.e.
        when a power stage runs. Shares come from :meth:`_set_shares` on the controller's cadence;
        until the first ones (or while every pass finds the domain over budget) a guard has none."""
        f = self.fleet
        self.guard = (self.scenario.agent_guard and bool(f.domains)
                      and self.pipeline.setting(Stage.POWER).method != OFF)
        n_dom = len(f.domains)
        self.gpu_dom_idx = np.where(f.gpu_domain >= 0, f.gpu_domain, n_dom)
        self.node_dom = f.gpu_domain[f.node_first] if len(f.node_first) else np.zeros(0, dtype=np.int64)
        self.node_share = np.full(len(f.node_names), np.inf)
        # what each agent's hello reports and the controller sums as the node's peak: its devices' max limits
        max_w = np.array([p.accelerator.max_power_w for p in self.scenario.pools])
        self.node_peak = np.bincount(f.gpu_node, weights=max_w[f.gpu_pool], minlength=len(f.node_names))
        self.node_draw = np.zeros(len(f.node_names))  # each node's measured draw on the last step (what it reports)
        self.node_held = np.zeros(len(f.node_names), dtype=bool)  # its guard capped it on the last step
        kept = max(1, math.ceil(DRAWS_KEPT_S / self.scenario.step_s))
        self.draw_ring = np.zeros((kept, len(f.node_names)))  # each node's draws the hub still holds, by step
        self.draw_steps = 0  # steps recorded in draw_ring
        self.guard_margin = GuardConfig().margin

    def _set_shares(self) -> None:
        """Each node's share of its domain budget, by the controller's own rule
        (:func:`policies.power.node_shares`, here its array form for thousands of nodes) on the inputs
        its PowerDomain pass reads: each node's latest reported draw (none for a failed node: its
        agent is silent), its highest draw in the hub's ring buffer, whether its guard is capping it,
        the sum of its devices' max power limits, the domain's budget. None (the domain over budget)
        keeps the last shares, as does a silent node."""
        f = self.fleet
        kept = min(self.draw_steps, len(self.draw_ring))
        highs = self.draw_ring[:kept].max(axis=0) if kept else np.full(len(f.node_names), np.nan)
        draws = np.where(f.node_ready, self.node_draw, np.nan)
        for d, dom in enumerate(f.domains):
            members = np.nonzero(self.node_dom == d)[0]
            if not len(members):
                continue
            shares = node_shares_array(dom.budget_w, draws[members], self.node_peak[members], highs[members],
                                       self.node_held[members])
            if shares is not None:
                self.node_share[members] = np.where(np.isnan(shares), self.node_share[members], shares)

    def _agent_guard(self, group_power: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """A node over its share (:meth:`_set_shares`) is capped to ``share * (1 - margin)`` within
        the step (the guard acts within a second), devices scaled in proportion to their draw as
        ``agents/guard.py`` does; capped phases slow down with :func:`policies.power_model.phase_speed`'s
        exponent. Returns the per-deployment speed for the next step, the per-GPU power scale, power per domain and the
        number of nodes the guard held; keeps each node's resulting draw (what its agent reports) in ``node_draw``.
        """
        f = self.fleet
        gpu_p = group_power[self.gpu_group]
        node_p = np.bincount(f.gpu_node, weights=gpu_p, minlength=len(f.node_names))
        over = node_p > self.node_share
        n_dep = len(self.domains)
        self.node_held = over
        if not over.any():
            self._reported(node_p)
            dom = np.bincount(self.gpu_dom_idx, weights=gpu_p, minlength=len(f.domains) + 1)
            return np.ones(n_dep), np.ones(len(gpu_p)), dom, 0
        node_scale = np.where(over, self.node_share * (1 - self.guard_margin) / np.maximum(node_p, 1e-9), 1.0)
        self._reported(node_p * node_scale)
        scale = node_scale[f.gpu_node]
        gpu_p = gpu_p * scale
        dom = np.bincount(self.gpu_dom_idx, weights=gpu_p, minlength=len(f.domains) + 1)
        serving = self.gpu_role >= 0
        speed = scale[serving] ** power_model.CAP_SPEED_EXPONENT
        counts = np.bincount(self.gpu_role[serving], minlength=n_dep)
        dep_speed = np.bincount(self.gpu_role[serving], weights=speed, minlength=n_dep) / np.maximum(counts, 1)
        return np.where(counts > 0, dep_speed, 1.0), scale, dom, int(over.sum())

    def _reported(self, node_draw: np.ndarray) -> None:
        """What each node's agent reports this step: its draw, kept in the hub's ring buffer."""
        self.node_draw = node_draw
        self.draw_ring[self.draw_steps % len(self.draw_ring)] = node_draw
        self.draw_steps += 1

    def _routed_quality(self, share: float) -> float:
        """Expected answer quality relative to the large model alone when ``share`` of its
        requests (the easiest, by the router's score bands) go to the fallback: what a fallback
        share costs, so SLO gains bought by routing are not free in the report."""
        key = round(share, 4)
        q = self._quality_cache.get(key)
        if q is None:
            q = relative_quality(DEFAULT_CLASSES, shares_for_total(DEFAULT_CLASSES, key))
            self._quality_cache[key] = q
        return q

    # -- capacity and power ---------------------------------------------------------------------
    def _thr(self, pool: int, cap: float, pf: float) -> float:
        key = (pool, cap, round(pf, 2))
        v = self._thr_cache.get(key)
        if v is None:
            spec = self.fleet.spec(pool)
            v = power_model.throughput_fraction(spec, None if math.isnan(cap) else cap, key[2], 1.0)
            self._thr_cache[key] = v
        return v

    def _power(self, pool: int, pf: float, u: float, cap: float) -> float:
        key = (pool, round(pf, 2), round(u, 2), cap)
        v = self._power_cache.get(key)
        if v is None:
            spec = self.fleet.spec(pool)
            v = power_model.gpu_power_w(spec, key[1], key[2], None if math.isnan(cap) else cap)
            if len(self._power_cache) >= POWER_CACHE_MAX:  # caps take many values over a long run: stay bounded
                self._power_cache.clear()
            self._power_cache[key] = v
        return v

    def _refresh(self, now: float) -> None:
        """Recompute per-deployment capacity and the GPU power groups after any change."""
        f = self.fleet
        n_dep = len(self.domains)
        cap = np.zeros(n_dep)
        ready = np.zeros((n_dep, len(f.pools)), dtype=np.int64)
        starting = np.zeros_like(ready)
        ttft_w = np.zeros(n_dep)
        tpot_w = np.zeros(n_dep)
        moe = np.array([MOE_EXPERT_SHARE * self.balancedness(d) + (1 - MOE_EXPERT_SHARE) if d in self.moe_loads
                        else 1.0 for d in range(n_dep)])
        self.moe_factor = moe
        next_ready = math.inf
        capq = np.where(np.isnan(f.cap), -1.0, np.round(f.cap, 0))
        for r in f.replicas.values():
            if r.ready_at > now:
                starting[r.deployment, r.pool] += 1
                next_ready = min(next_ready, r.ready_at)
                continue
            ready[r.deployment, r.pool] += 1
            prof = self.profiles[r.deployment][r.pool]
            if prof is None:
                continue
            pf = float(self.prefill_fraction[r.deployment, r.pool])
            thr = min(self._thr(r.pool, np.nan if c < 0 else c, pf) for c in set(capq[r.gpus].tolist()))
            c = self.base_cap[r.deployment, r.pool] * thr * moe[r.deployment]
            cap[r.deployment] += c
            ttft_w[r.deployment] += c * prof.ttft_ms / max(thr, 1e-6)
            tpot_w[r.deployment] += c * prof.tpot_ms / max(thr, 1e-6)
        self.capacity = cap
        self.ready = ready
        self.starting = starting
        self.n_ready = ready.sum(axis=1)
        self.ttft_base = np.where(cap > 0, ttft_w / np.maximum(cap, 1e-9), np.inf)
        self.tpot_base = np.where(cap > 0, tpot_w / np.maximum(cap, 1e-9), np.inf)
        self.next_ready = next_ready
        # power groups: (pool, role, cap) where role = deployment, -1 idle, -2 background, -3 failed
        # a starting replica's GPUs draw idle power while weights load (but are paid for)
        role = np.full(len(f.owner), -1, dtype=np.int64)
        for r in f.replicas.values():
            if r.ready_at <= now:
                role[r.gpus] = r.deployment
        role = np.where((role == -1) & (f.bg_milli > 0), -2, role)
        role = np.where(~f.node_ready[f.gpu_node], -3, role)
        self.gpu_role = role
        n_dom = len(f.domains)  # column n_dom collects GPUs outside any power domain
        key = np.stack([f.gpu_pool, role, capq.astype(np.int64), np.where(f.gpu_domain >= 0, f.gpu_domain, n_dom)],
                       axis=1) if len(role) else np.zeros((0, 4), dtype=np.int64)
        uniq, inverse = np.unique(key, axis=0, return_inverse=True)
        self.gpu_group = inverse.reshape(-1)
        self.groups = uniq
        counts = np.zeros((len(uniq), n_dom + 1))
        np.add.at(counts, (np.arange(len(uniq)), uniq[:, 3]), np.bincount(self.gpu_group, minlength=len(uniq)))
        self.group_counts = counts
        self.version_seen = f.version

    def _group_power(self, util: np.ndarray) -> np.ndarray:
        """Power per GPU group at these utilisations; only serving groups depend on them (every step)."""
        if self._group_static is None or self._group_static[0] is not self.groups:
            base = np.zeros(len(self.groups))
            serving = []
            for i, (pool, role, capi, _dom) in enumerate(self.groups.tolist()):
                cap = np.nan if capi < 0 else float(capi)
                if role >= 0:
                    serving.append((i, pool, role, cap, float(self.prefill_fraction[role, pool])))
                elif role == -2:
                    base[i] = self._power(pool, 0.05, 0.5, cap)
                elif role == -1:
                    base[i] = self._power(pool, 0.0, 0.0, cap)
            self._group_static = (self.groups, base, serving)
        _, base, serving = self._group_static
        out = base.copy()
        u_all = util.tolist()
        power = self._power
        for i, pool, role, cap, pf in serving:
            u = u_all[role]
            out[i] = power(pool, pf * u, u, cap)
        return out

    # -- snapshot ---------------------------------------------------------------------------------
    def build_snapshot(self, now: float, window: dict[str, np.ndarray], gpu_power: np.ndarray,
                       gpu_util: np.ndarray) -> Snapshot:
        """The fleet as the controller's snapshot builder would see it (per-GPU telemetry included).

        Built for 10,000 GPUs every cycle, so the per-object path skips pydantic's field
        processing (:func:`_fast`): every value here comes from already-validated scenario data
        or from the simulator's own arrays, and the enclosing :class:`Snapshot` still runs its
        cross-reference checks. Static parts (pools, domains, nodes while none fails) are cached.
        """
        f = self.fleet
        sc = self.scenario
        static = self._static_parts()
        ready_key = f.node_ready.tobytes()
        if self._nodes_key != ready_key:
            self._nodes = tuple(
                _fast(Node, name=name, pool=self._node_pool_name[i], accelerator_model=self._node_acc[i],
                      gpus=self._node_gpus[i], cpu_milli=128_000, memory_mib=1_048_576, numa_nodes=2,
                      ready=ready, schedulable=True, power_domain=self._node_domain[i], labels={})
                for i, (name, ready) in enumerate(zip(f.node_names, f.node_ready.tolist(), strict=True))
            )
            self._nodes_key = ready_key
        replicas = tuple(
            ReplicaSet(deployment=self.domains[d].name, pool=sc.pools[p].name, replicas=int(f.desired[d, p]),
                       ready=int(self.ready[d, p]))
            for d in range(len(self.domains)) for p in range(len(sc.pools))
            if f.desired[d, p] or self.ready[d, p]
        )
        pods: list[Pod] = []
        live: dict[tuple[int, bytes], list[Pod]] = {}
        for r in sorted(f.replicas.values(), key=lambda r: r.id):
            key = (r.id, r.gpus.tobytes())
            cached = self._pod_cache.get(key)
            if cached is None:
                cached = self._replica_pods(r)
            live[key] = cached
            pods.extend(cached)
        self._pod_cache = live  # only live replicas: ids are never reused, so removed ones' pods would pile up
        placed = np.zeros_like(f.desired)
        for r in f.replicas.values():
            placed[r.deployment, r.pool] += 1
        missing = np.maximum(f.desired - placed, 0)  # f.pending() for every (deployment, pool) in one pass
        for d, p in zip(*(a.tolist() for a in np.nonzero(missing)), strict=True):
            for k in range(int(missing[d, p])):
                dep = self.domains[d]
                pods.append(_fast(
                    Pod, name=f"{dep.name}-{sc.pools[p].name}-pending-{k}", node=None,
                    cpu_milli=8000 * dep.parallelism.devices, memory_mib=65536 * dep.parallelism.devices,
                    num_gpu=dep.parallelism.devices, gpu_milli=1000, gpu_indices=(),
                    gpu_model=sc.pools[p].accelerator.model, priority=dep.priority, deployment=dep.name,
                    pdb=None, movable=True, numa=None))
        for bg in sorted(f.background.values(), key=lambda b: b.name):
            pods.append(_fast(
                Pod, name=bg.name, node=f.node_names[bg.node], cpu_milli=bg.cpu_milli, memory_mib=bg.memory_mib,
                num_gpu=len(bg.gpus), gpu_milli=bg.milli, gpu_indices=tuple(f.gpu_local[bg.gpus].tolist()),
                gpu_model=None, priority=PriorityClass.BEST_EFFORT, deployment=None, pdb=None, movable=True,
                numa=None))
        util = np.clip(gpu_util, 0.0, 1.0)
        serving_gpu = self.gpu_role >= 0
        # prompt-phase share of the interval, as an engine reports it: the deployment's share x utilisation
        prefill = np.where(serving_gpu, self.prefill_fraction[np.maximum(self.gpu_role, 0), f.gpu_pool] * util, 0.0)
        telemetry = self._telemetry(gpu_power, util, prefill)
        serving = tuple(
            ServingTelemetry(deployment=d.name, requests_per_s=float(window["requests"][i]),
                             input_tokens_per_s=float(window["input"][i]),
                             output_tokens_per_s=float(window["output"][i]),
                             queue_depth=float(window["queue"][i]),
                             ttft_p99_ms=float(min(window["ttft"][i], 1e9)),
                             tpot_p99_ms=float(min(window["tpot"][i], 1e9)))
            for i, d in enumerate(self.domains)
        )
        expert_loads = []
        placements = []
        for i, loads in self.moe_loads.items():
            tokens = float(window["input"][i] + window["output"][i])
            shape = self.domains[i].model.moe
            assert shape is not None
            scaled = loads * max(tokens, 1.0) * shape.top_k
            expert_loads.append(ExpertLoad(deployment=self.domains[i].name,
                                           loads=tuple(tuple(row) for row in scaled.tolist())))
            version, phy, spd = f.placements[i]
            placements.append(ExpertPlacement(deployment=self.domains[i].name, version=version,
                                              devices=phy.shape[1] // spd, slots_per_device=spd,
                                              phy2log=tuple(tuple(row) for row in phy.tolist())))
        return Snapshot(now=now, pools=static[0], nodes=self._nodes, power_domains=static[1],
                        deployments=tuple(self.domains), replicas=replicas, pods=tuple(pods),
                        gpu_telemetry=telemetry, serving=serving, expert_loads=tuple(expert_loads),
                        expert_placements=tuple(placements))

    def _telemetry(self, power: np.ndarray, util: np.ndarray, prefill: np.ndarray) -> tuple[GPUTelemetry, ...]:
        """Per-GPU readings; a GPU whose reading is unchanged since the last cycle keeps its object.

        The snapshot's largest part at scale (one object per GPU per cycle): idle and capped-alike
        GPUs repeat their readings, and the rest are built with one dict and no field processing
        (what :func:`_fast` does, minus its per-call generality).
        """
        f = self.fleet
        key = np.stack([power, util, np.where(np.isnan(f.cap), -1.0, f.cap), self.gpu_role.astype(float), prefill])
        objs = self._tele_objs
        if self._tele_key is None or self._tele_key.shape != key.shape:
            changed = np.arange(key.shape[1])
            objs = [None] * key.shape[1]  # type: ignore[list-item]
        else:
            changed = np.nonzero((key != self._tele_key).any(axis=0))[0]
        dep_names = [d.name for d in self.domains]
        new, setattr_, fields = GPUTelemetry.__new__, object.__setattr__, _TELEMETRY_FIELDS
        nodes, local = self._gpu_node_name, self._gpu_local
        best_effort = PriorityClass.BEST_EFFORT
        for g, pw, ut, cap, ro, pf in zip(changed.tolist(), power[changed].tolist(), util[changed].tolist(),
                                          f.cap[changed].tolist(), self.gpu_role[changed].tolist(),
                                          prefill[changed].tolist(), strict=True):
            obj = new(GPUTelemetry)
            setattr_(obj, "__dict__", {
                "node": nodes[g], "index": local[g], "power_w": pw, "utilisation": ut, "memory_used_gib": 0.0,
                "sm_clock_mhz": 0.0, "temperature_c": 0.0, "power_limit_w": None if cap != cap else cap,
                "energy_j": 0.0, "deployment": dep_names[ro] if ro >= 0 else None,
                "priority": self.priority[ro] if ro >= 0 else (best_effort if ro == -2 else None),
                "prefill_fraction": pf})
            setattr_(obj, "__pydantic_fields_set__", set(fields))
            setattr_(obj, "__pydantic_extra__", None)
            setattr_(obj, "__pydantic_private__", None)
            objs[g] = obj
        self._tele_key, self._tele_objs = key, objs
        return tuple(objs)

    def _static_parts(self) -> tuple[tuple[Pool, ...], tuple[PowerDomain, ...]]:
        if self._static is None:
            f, sc = self.fleet, self.scenario
            pools = tuple(Pool(name=p.name, accelerator=p.accelerator, gpus_per_node=p.gpus_per_node,
                               cost_per_device_hour=p.cost_per_device_hour, power_domain=p.power_domain,
                               min_nodes=p.nodes, max_nodes=p.nodes) for p in sc.pools)
            node_pool = [sc.pools[int(i)] for i in f.node_pool.tolist()]
            self._node_pool_name = [p.name for p in node_pool]
            self._node_acc = [p.accelerator.model for p in node_pool]
            self._node_gpus = [p.gpus_per_node for p in node_pool]
            self._node_domain = [p.power_domain for p in node_pool]
            domains = tuple(
                PowerDomain(name=d.name, budget_w=d.budget_w, safety_margin=d.safety_margin, thresholds=d.thresholds,
                            nodes=tuple(n for n, dom in zip(f.node_names, self._node_domain, strict=True)
                                        if dom == d.name))
                for d in sc.power_domains
            )
            self._gpu_node_name = [f.node_names[i] for i in f.gpu_node.tolist()]
            self._gpu_local = f.gpu_local.tolist()
            self._static = (pools, domains)
        return self._static

    def _replica_pods(self, r: Replica) -> list[Pod]:
        f, sc = self.fleet, self.scenario
        dep = self.domains[r.deployment]
        nodes_of = f.gpu_node[r.gpus]
        out = []
        for k, node in enumerate(dict.fromkeys(nodes_of.tolist())):
            idx = tuple(f.gpu_local[r.gpus[nodes_of == node]].tolist())
            out.append(_fast(
                Pod, name=f"{r.name}-{k}", node=f.node_names[node], cpu_milli=8000 * len(idx),
                memory_mib=65536 * len(idx), num_gpu=len(idx), gpu_milli=1000, gpu_indices=idx,
                gpu_model=sc.pools[r.pool].accelerator.model, priority=dep.priority, deployment=dep.name,
                pdb=None, movable=len(r.gpus) <= sc.pools[r.pool].gpus_per_node, numa=None))
        return out

    def _trace_pods(self) -> list[tuple[int, int, int, int]] | None:
        """Background pods from ``background.pods_csv`` (Alibaba GPU trace), in creation order."""
        spec = self.scenario.background
        if spec.pods_csv is None:
            return None
        from wattplane.datasets import data_file, load_alibaba_pods
        from wattplane.simulate.load import resolve_path

        pods = load_alibaba_pods(resolve_path(spec.pods_csv, self.base_dir, self.data_dir, data_file))
        gpu_pods = sorted((p for p in pods if p.pod.num_gpu > 0), key=lambda p: (p.creation_time, p.pod.name))
        if spec.count:
            gpu_pods = gpu_pods[: spec.count]
        return [(min(p.pod.num_gpu, 8), p.pod.gpu_milli if p.pod.num_gpu == 1 else 1000, p.pod.cpu_milli,
                 p.pod.memory_mib) for p in gpu_pods]

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> SimResult:
        sc = self.scenario
        f = self.fleet
        dt = sc.step_s
        steps = self.load.steps
        n_dep = len(self.domains)
        n_dom = len(f.domains)
        for i, d in enumerate(sc.deployments):
            for pool, n in d.initial_replicas.items():
                f.desired[i, f.pool_index[pool]] = n
        f.reconcile_replicas(0.0)
        f.seed_background(self._trace_pods())
        self._refresh(0.0)
        budgets = np.array([d.budget_w for d in f.domains])
        faults = sorted(sc.faults, key=lambda x: x.at_s)
        churn = sc.background.churn_per_hour
        # series
        s_power = np.zeros((n_dom + 1, steps))
        s_ttft = np.zeros((n_dep, steps))
        s_tpot = np.zeros((n_dep, steps))
        s_demand = np.zeros((n_dep, steps))
        s_served = np.zeros((n_dep, steps))
        s_share = np.zeros((n_dep, steps))
        s_ready = np.zeros((n_dep * len(f.pools), steps))
        s_caps = np.zeros(steps)
        s_cost = np.zeros(steps)
        s_met = np.zeros((n_dep, steps))
        s_requests = np.zeros((n_dep, steps))
        backlog = np.zeros(n_dep)
        guard_speed = np.ones(n_dep)  # capacity multiplier from the agent guard (1: not engaged)
        gpu_scale = np.ones(len(f.owner))  # per-GPU power scale the guard imposed on the last step
        guard_node_s = 0.0
        offered = self.load.output_tokens[:, 0] / dt  # smoothed offered load (tokens/s), see RHO_SMOOTHING_S
        alpha = 1.0 - math.exp(-dt / RHO_SMOOTHING_S)
        dropped = np.zeros(n_dep)
        quality_loss = 0.0  # addressed requests x quality given up by routing them to a fallback
        total = ApplyReport()
        state = PipelineState()
        cycles: list[dict[str, Any]] = []
        unavailable: set[str] = set()
        violations: list[str] = []
        fallback_plans = 0
        plans_total = 0
        cost_rate = np.array([p.cost_per_device_hour for p in sc.pools])
        win_start = 0
        last_util = np.zeros(n_dep)
        last_group_power = self._group_power(last_util)
        period_steps = max(1, round(sc.control_period_s / dt))
        next_shares_at = 0.0
        report_every = max(1, steps // 100)
        for s in range(steps):
            now = s * dt
            while faults and faults[0].at_s <= now:
                fault = faults.pop(0)
                f.fail_node(fault.node, fault.kind == "fail")
            if s > 0 and s % period_steps == 0:
                self._moe_drift(now, sc.control_period_s)
                if churn > 0:
                    f.finish_background(churn * sc.control_period_s / 3600.0)
                if now >= self.next_ready:
                    f.reconcile_replicas(now)
                if f.version != self.version_seen or now >= self.next_ready:
                    self._refresh(now)
                    last_group_power = self._group_power(last_util)
                window = self._window(win_start, s, s_requests, s_demand, backlog, s_ttft, s_tpot)
                gpu_power = last_group_power[self.gpu_group] * gpu_scale
                gpu_util = np.where(self.gpu_role >= 0, last_util[np.maximum(self.gpu_role, 0)],
                                    np.where(self.gpu_role == -2, 0.5, 0.0))
                t0 = time.perf_counter()
                snapshot = self.build_snapshot(now, window, gpu_power, gpu_util)
                t1 = time.perf_counter()
                if self.on_snapshot is not None:
                    self.on_snapshot(snapshot)
                result = run_pipeline(snapshot, self.pipeline, state, clock=time.perf_counter)
                t2 = time.perf_counter()
                state = result.state
                if self.on_cycle is not None:
                    self.on_cycle(now, state)
                unavailable.update(result.unavailable)
                report = ApplyReport()
                for plan in result.plans:
                    apply_plan(f, plan, now, report)
                    plans_total += 1
                    fallback_plans += int(plan.explanation.fallback is not None)
                _add(total, report)
                cycles.append(_cycle_record(now, result.plans, result.ran, (t1 - t0) * 1000, (t2 - t1) * 1000,
                                            report, result.stage_ms))
                win_start = s
                if self.check_invariants:
                    violations.extend(f"t={now:.0f}s: {p}" for p in f.check())
            elif f.version != self.version_seen or now >= self.next_ready:
                if now >= self.next_ready:
                    f.reconcile_replicas(now)  # replacements ready: make-before-break removals go now
                self._refresh(now)
            if self.guard and s > 0 and now >= next_shares_at:  # the controller's PowerDomain pass
                self._set_shares()
                next_shares_at = now + SHARE_PERIOD_S
            # -- serve this step's arrivals
            req = self.load.requests[:, s].copy()
            inp = self.load.input_tokens[:, s].copy()
            out = self.load.output_tokens[:, s].copy()
            s_requests[:, s] = req
            s_demand[:, s] = out / dt
            share = np.zeros(n_dep)
            for dep, (fb, sh) in f.routing.items():
                share[dep] = sh
                quality_loss += float(self.load.requests[dep, s]) * (1.0 - self._routed_quality(sh))
                for arr in (req, inp, out):
                    moved = arr[dep] * sh
                    arr[dep] -= moved
                    arr[fb] += moved
            s_share[:, s] = share
            capacity = self.capacity * guard_speed  # the agent guard's slowdown, from the last step
            cap_tokens = capacity * dt
            work = out + backlog
            served = np.minimum(work, cap_tokens)
            backlog = work - served
            over = np.maximum(backlog - capacity * MAX_QUEUE_S, 0.0)
            dropped += over
            backlog -= over
            util = np.where(cap_tokens > 0, served / np.maximum(cap_tokens, 1e-12), 0.0)
            offered = offered + alpha * (out / dt - offered)
            rho = np.where(capacity > 0, offered / np.maximum(capacity, 1e-12),
                           np.where(offered > 0, np.inf, 0.0))
            rho_c = np.minimum(rho, 0.99)
            wait_ms = np.where(capacity > 0, backlog / np.maximum(capacity, 1e-12) * 1000, np.inf)
            ttft = self.ttft_base / guard_speed * (1 + P99_WAIT_FACTOR * rho_c / (1 - rho_c)
                                 / np.sqrt(np.maximum(self.n_ready, 1)))
            ttft = ttft + np.where(backlog > 0, wait_ms, 0.0)
            ttft = np.where(out > 0, ttft, np.where(capacity > 0, self.ttft_base, 0.0))
            tpot = np.where(capacity > 0, self.tpot_base * (TPOT_LOW + TPOT_SLOPE * rho_c), np.inf)
            tpot = np.where(out > 0, tpot, np.where(capacity > 0, self.tpot_base, 0.0))
            slo_ttft = np.array([d.slo.ttft_p99_ms for d in self.domains])
            slo_tpot = np.array([d.slo.tpot_p99_ms for d in self.domains])
            met = (ttft <= slo_ttft) & (tpot <= slo_tpot) & (rho <= 1.0)
            s_ttft[:, s] = ttft
            s_tpot[:, s] = tpot
            s_served[:, s] = served / dt
            s_met[:, s] = np.where(met, req, 0.0)
            s_requests[:, s] = req  # after routing: what each deployment actually received
            last_util = util
            last_group_power = self._group_power(util)
            if self.guard:
                guard_speed, gpu_scale, dom_power, engaged = self._agent_guard(last_group_power)
                s_power[:, s] = dom_power
                guard_node_s += engaged * dt
            else:
                s_power[:, s] = last_group_power @ self.group_counts if len(self.groups) else 0.0
            s_ready[:, s] = self.ready.reshape(-1)
            s_caps[s] = float(np.count_nonzero(~np.isnan(f.cap)))
            held = (f.owner >= 0)
            s_cost[s] = float((cost_rate[f.gpu_pool[held]]).sum()) if held.any() else 0.0
            if self.progress is not None and s % report_every == 0:
                self.progress(s / steps)
        if self.progress is not None:
            self.progress(1.0)
        metrics = self._metrics(s_power, budgets, s_requests, s_met, s_ttft, s_tpot, s_served, s_cost,
                                self.load, total, cycles, dropped, fallback_plans, plans_total)
        metrics["guard_node_s"] = guard_node_s
        addressed = float(self.load.requests.sum())
        metrics["quality"] = 1.0 - quality_loss / addressed if addressed else 1.0
        dep_names = [d.name for d in self.domains]
        per_dep = {name: deployment_metrics(s_met[i], s_requests[i], s_ttft[i], s_tpot[i],
                                            float(s_served[i].sum() * dt))
                   for i, name in enumerate(dep_names)}
        series = {"power_w": s_power[:n_dom], "budget_w": budgets, "ttft_p99_ms": s_ttft, "tpot_p99_ms": s_tpot,
                  "demand_tokens_per_s": s_demand, "served_tokens_per_s": s_served, "fallback_share": s_share,
                  "ready_replicas": s_ready, "capped_gpus": s_caps, "cost_per_hour": s_cost,
                  "fleet_power_w": s_power.sum(axis=0)}
        labels = {"power_w": [d.name for d in f.domains], "budget_w": [d.name for d in f.domains],
                  "ttft_p99_ms": dep_names, "tpot_p99_ms": dep_names, "demand_tokens_per_s": dep_names,
                  "served_tokens_per_s": dep_names, "fallback_share": dep_names,
                  "ready_replicas": [f"{d}@{p.name}" for d in dep_names for p in f.pools]}
        return SimResult(self.policy_set, self.pipeline.methods(), metrics, series, labels, cycles, violations,
                         sorted(unavailable), per_dep)

    def _window(self, start: int, end: int, requests: np.ndarray, demand: np.ndarray, backlog: np.ndarray,
                ttft: np.ndarray, tpot: np.ndarray) -> dict[str, np.ndarray]:
        """Serving telemetry over the last control period: addressed (pre-routing) load, p99s, queue."""
        dt = self.scenario.step_s
        span = max(end - start, 1) * dt
        sl = slice(start, max(end, start + 1))
        return {
            "requests": self.load.requests[:, sl].sum(axis=1) / span,
            "input": self.load.input_tokens[:, sl].sum(axis=1) / span,
            "output": self.load.output_tokens[:, sl].sum(axis=1) / span,
            "queue": backlog / np.maximum(self.mean_out, 1.0),
            "ttft": ttft[:, sl].max(axis=1) if end > start else np.zeros(len(backlog)),
            "tpot": tpot[:, sl].max(axis=1) if end > start else np.zeros(len(backlog)),
        }

    def _metrics(self, power: np.ndarray, budgets: np.ndarray, requests: np.ndarray, met: np.ndarray,
                 ttft: np.ndarray, tpot: np.ndarray, served: np.ndarray, cost: np.ndarray, load: LoadSeries,
                 total: ApplyReport, cycles: list[dict[str, Any]], dropped: np.ndarray, fallback_plans: int,
                 plans_total: int) -> dict[str, float]:
        dt = self.scenario.step_s
        n_dom = len(budgets)
        energy_j = float(power.sum() * dt)
        tokens = float(served.sum() * dt)
        hours = load.steps * dt / 3600.0
        over = (power[:n_dom] > budgets[:, None] * (1 + 1e-9)).sum() * dt if n_dom else 0.0
        solve = np.array([c["pipeline_ms"] for c in cycles]) if cycles else np.zeros(1)
        addressed = float(load.requests.sum())
        routed = float((load.requests - np.maximum(requests, 0)).clip(min=0).sum())
        cost_total = float(cost.sum() * dt / 3600.0)
        return {
            **serving_metrics(met, requests, ttft, tpot, cost_total, hours, tokens, energy_j),
            "over_budget_s": float(over),
            "caps_applied": float(total.caps_set),
            "migrations": float(total.migrations),
            "migrations_rejected": float(total.migrations_rejected),
            "expert_copies": float(total.expert_copies),
            "replica_changes": float(total.replica_changes),
            "fallback_share": routed / addressed if addressed else 0.0,
            "solver_ms_p99": float(np.percentile(solve, 99)),
            "solver_ms_p50": float(np.percentile(solve, 50)),
            "snapshot_ms_p99": float(np.percentile([c["snapshot_ms"] for c in cycles] or [0.0], 99)),
            "policy_fallback_share": fallback_plans / plans_total if plans_total else 0.0,
            "output_tokens": tokens,
            "requests": addressed,
            "dropped_share": float(dropped.sum() / max(load.output_tokens.sum(), 1.0)),
            "cycles": float(len(cycles)),
        }


_M = TypeVar("_M", bound=BaseModel)
_TELEMETRY_FIELDS = frozenset(GPUTelemetry.model_fields)


_DEFAULTS: dict[type[BaseModel], dict[str, Any]] = {}


@dataclass(frozen=True)
class ServingRates:
    """What the load and the profiles say each (deployment, pool) replica serves: shared by the
    in-memory engine and the cluster run's serving model, so both serve with one model."""

    input_share: np.ndarray  # prompt tokens per output token, per deployment
    mean_out: np.ndarray  # output tokens per request, per deployment
    base_cap: np.ndarray  # output tokens/s one replica serves at the deployment's prompt mix, [dep, pool]
    prefill_fraction: np.ndarray  # share of a replica's busy time in the prompt phase, [dep, pool]


def serving_rates(profiles: list[list[Profile | None]], load: LoadSeries) -> ServingRates:
    n_dep, n_pool = len(profiles), len(profiles[0]) if profiles else 0
    req, inp, out = (a.sum(axis=1) for a in (load.requests, load.input_tokens, load.output_tokens))
    input_share = np.where(out > 0, inp / np.maximum(out, 1), 5.5)  # Azure conversation trace means
    mean_out = np.where(req > 0, out / np.maximum(req, 1), 211.0)
    base_cap = np.zeros((n_dep, n_pool))
    prefill = np.zeros((n_dep, n_pool))
    for d in range(n_dep):
        for p in range(n_pool):
            prof = profiles[d][p]
            if prof is None:
                continue
            base_cap[d, p] = prof.tokens_per_s_capacity(float(input_share[d]))
            t_in, t_out = input_share[d] / prof.input_tokens_per_s, 1.0 / prof.output_tokens_per_s
            prefill[d, p] = t_in / (t_in + t_out)
    return ServingRates(input_share, mean_out, base_cap, prefill)


def _fast(cls: type[_M], **values: Any) -> _M:
    """Build a model from trusted values without pydantic's per-field processing.

    ``model_construct`` costs ~40 us per object; this a few. Fields the caller leaves out take
    their declared defaults (so a field added to the domain model later does not break this).
    """
    defaults = _DEFAULTS.get(cls)
    if defaults is None:
        defaults = {name: f.get_default(call_default_factory=True) for name, f in cls.model_fields.items()
                    if not f.is_required()}
        _DEFAULTS[cls] = defaults
    fields_set = set(values)
    if len(values) < len(cls.model_fields):
        values = {**defaults, **values}
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", fields_set)
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


def serving_metrics(met: np.ndarray, requests: np.ndarray, ttft: np.ndarray, tpot: np.ndarray, cost_total: float,
                    hours: float, tokens: float, energy_j: float) -> dict[str, float]:
    """The serving figures of a run (in memory or on a cluster), from per-step series [deployment, step]."""
    total = float(requests.sum())
    weights = requests.reshape(-1)
    return {
        "slo_attainment": float(met.sum() / total) if total else 1.0,
        "ttft_p99_ms": _weighted_quantile(np.minimum(ttft, 1e7).reshape(-1), weights, 0.99),
        "tpot_p99_ms": _weighted_quantile(np.minimum(tpot, 1e7).reshape(-1), weights, 0.99),
        "cost_per_hour": cost_total / hours if hours else 0.0,
        "cost_per_million_tokens": cost_total / (tokens / 1e6) if tokens else 0.0,
        "energy_kwh": energy_j / 3.6e6,
        "tokens_per_joule": tokens / energy_j if energy_j else 0.0,
    }


def deployment_metrics(met: np.ndarray, requests: np.ndarray, ttft: np.ndarray, tpot: np.ndarray,
                       output_tokens: float) -> dict[str, float]:
    """One deployment's figures from its per-step series."""
    total = float(requests.sum())
    return {
        "slo_attainment": float(met.sum() / total) if total else 1.0,
        "ttft_p99_ms": _weighted_quantile(np.minimum(ttft, 1e7), requests, 0.99),
        "tpot_p99_ms": _weighted_quantile(np.minimum(tpot, 1e7), requests, 0.99),
        "requests": total,
        "output_tokens": output_tokens,
    }


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    mask = weights > 0
    if not mask.any():
        return 0.0
    v, w = values[mask], weights[mask]
    order = np.argsort(v)
    cw = np.cumsum(w[order])
    idx = int(np.searchsorted(cw, q * cw[-1]))
    return float(v[order][min(idx, len(v) - 1)])


def _add(total: ApplyReport, r: ApplyReport) -> None:
    for k in vars(r):
        setattr(total, k, getattr(total, k) + getattr(r, k))


def _cycle_record(now: float, plans: tuple[Plan, ...], ran: tuple[str, ...], snapshot_ms: float,
                  pipeline_ms: float, report: ApplyReport, stage_ms: dict[str, float]) -> dict[str, Any]:
    return {
        "t": now, "ran": list(ran), "snapshot_ms": snapshot_ms, "pipeline_ms": pipeline_ms, "stage_ms": stage_ms,
        "plans": [{"policy": p.policy.value, "actions": len(p.actions), "reason": p.explanation.reason.value,
                   "summary": p.explanation.summary, "solver_status": p.explanation.solver_status.value,
                   "solve_ms": p.explanation.solve_ms, "fallback": p.explanation.fallback} for p in plans],
        **{k: v for k, v in vars(report).items()},
    }


def progress_bar(label: str) -> Callable[[float], None]:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""
    if not sys.stderr.isatty():
        return lambda _x: None

    def show(x: float) -> None:
        n = int(30 * x)
        sys.stderr.write(f"\r{label} [{'#' * n}{'.' * (30 - n)}] {100 * x:5.1f}%")
        if x >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


__all__ = ["SimResult", "Simulation", "progress_bar"]
