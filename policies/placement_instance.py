"""The placement problem in numbers: one row per allowed (deployment, pool) pair, as numpy arrays.

Our solver, the greedy and homogeneous baselines and the benchmark all read the same
:class:`Instance`, so they optimise and are scored against exactly the same costs, capacities
and budgets. Building it is vectorised per pool where it matters (10,000-GPU fleets).

Modelling choices (kept simple, and written down):

* **Capacity per replica** ``cap`` (output tokens/s at SLO) comes from the profile, mixing prefill
  and decode by the deployment's forecast input/output ratio (:meth:`Profile.tokens_per_s_capacity`).
  A pool whose GPUs are power-capped (``GPUTelemetry.power_limit_w`` below TDP) loses capacity by
  :func:`policies.profiles.cap_throughput_factor` at the pool's mean cap fraction (decode and
  prefill separately).
* **Need** of a deployment = forecast output tokens/s / ``target_utilisation`` (the headroom).
* **SLO-feasibility**: a replica on a pool counts ``cap * min(1, u_slo / target_utilisation)``
  where ``u_slo`` is the highest utilisation at which the profile's p99 TTFT and TPOT stay within
  the deployment's SLO (:func:`policies.profiles.slo_utilisation`); a pool whose profile misses the
  SLO even idle gets no pair (its current replicas drain).
* **Devices per replica** on a pool = TP x PP rounded up to a divisor of ``gpus_per_node``
  (3 -> 4 on 8-GPU nodes), or to whole nodes when wider than a node. Sizes that divide the
  node size always pack into whole nodes when their sum fits, so pool capacity is one
  linear constraint: ``sum(devices * replicas) <= devices available``.
* **Devices available** = ``max_nodes * gpus_per_node`` when the pool autoscales (``max_nodes``
  set), else the GPUs of its ready, schedulable nodes in the snapshot; in both cases minus the
  devices *foreign* pods hold (:func:`foreign_devices`: pods on a node that are not a replica of a
  deployment in the snapshot, i.e. other teams' workloads sharing the pool). A pending foreign pod
  holds nothing yet and is not counted; a fractional one (``gpu_milli < 1000``) holds its whole
  device, since a device partly in use is not free for a whole-GPU replica. Per pair the bound
  ``ub`` is what fits node by node (:meth:`PoolRoom.fits`): a replica of a node or more needs
  nodes no foreign pod touches, a smaller one the free devices of one node. The pool row stays
  one linear sum, so a mix of replica sizes on partly used nodes can still be planned a few
  devices over what packs (the leftover of each node); the scheduler leaves that excess Pending.
* **Cost per replica-hour** = devices x ``cost_per_device_hour`` + devices x power at load (kW)
  x ``power_price_per_kwh``. Preferred pools get a small objective discount (not in reported cost).
* **Power per replica** (W) = devices x (board power at the target utilisation and the forecast
  prompt/token mix, by :func:`policies.power_model.gpu_power_w` under the pool's cap, minus idle
  power), summed per power domain against ``budget_w * (1 - safety_margin)`` minus the idle draw
  of every device present in the domain (idle GPUs draw whether or not a replica runs there:
  leaving that out planned fleets the power stage then had to cap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from policies import power_model
from policies.plan import SetReplicas
from policies.profiles import Profile, ProfileTable, cap_throughput_factor, slo_utilisation
from policies.snapshot import Pool, Snapshot

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class InstanceParams:
    """The knobs of the objective (copied from the placement config so baselines share them)."""

    power_price_per_kwh: float = 0.10
    disruption_weight: float = 0.25  # a replica change costs this many hours of that replica's cost
    preferred_discount: float = 0.05
    shortfall_factor: float = 10.0  # unmet demand costs this many times the dearest capacity
    unlimited_capacity: bool = False  # ignore pool sizes and power budgets (a fleet bought to fit)


@dataclass(frozen=True)
class Instance:
    """Arrays over pairs k = (deployment m, pool p); all money in $/hour."""

    deployments: tuple[str, ...]
    pools: tuple[str, ...]
    domains: tuple[str, ...]
    pair_m: IntArray
    pair_p: IntArray
    cap: FloatArray  # output tokens/s of one replica at SLO (0 for pairs that must drain)
    cost: FloatArray  # $/h of one replica (devices + power)
    obj_cost: FloatArray  # cost minus the preferred-pool discount: what the solver minimises
    dis: FloatArray  # $ penalty per replica added or removed
    dev: IntArray  # devices one replica occupies
    power: FloatArray  # W one replica draws at load
    r0: IntArray  # current replicas
    ub: IntArray  # most replicas this pool can take of this deployment
    need: FloatArray  # per deployment: output tokens/s of capacity required
    demand_out: FloatArray  # per deployment: forecast output tokens/s (before headroom)
    min_r: IntArray
    max_r: IntArray
    short_price: FloatArray  # per deployment: $/h per token/s of unmet need
    pool_devices: FloatArray  # per pool: devices available (inf when unlimited)
    pool_domain: IntArray  # per pool: index into domains, -1 when none
    domain_budget: FloatArray  # per domain: W available to replicas (inf when unlimited)
    pool_accelerator: tuple[str, ...]

    @property
    def n_pairs(self) -> int:
        return int(self.pair_m.shape[0])

    def pairs_of(self, m: int) -> IntArray:
        return np.flatnonzero(self.pair_m == m)

    def restrict_pools(self, keep: Sequence[int]) -> Instance:
        """The same instance with only pairs in pools ``keep`` (others must drain to zero)."""
        mask = np.isin(self.pair_p, np.asarray(keep, dtype=np.int64))
        return _replace(self, ub=np.where(mask, self.ub, 0), cap=np.where(mask, self.cap, 0.0))


def with_need(inst: Instance, need: FloatArray) -> Instance:
    """The same instance with another need per deployment (e.g. stabilised over time)."""
    return _replace(inst, need=need)


def _replace(inst: Instance, **changes: object) -> Instance:
    fields = {k: getattr(inst, k) for k in inst.__dataclass_fields__}
    fields.update(changes)
    return Instance(**fields)


def replica_devices(devices: int, gpus_per_node: int) -> int:
    """Devices a replica occupies: TP x PP rounded to a divisor of the node size, or to whole nodes."""
    if devices >= gpus_per_node:
        return math.ceil(devices / gpus_per_node) * gpus_per_node
    d = devices
    while gpus_per_node % d:
        d += 1
    return d


def foreign_devices(snapshot: Snapshot) -> dict[str, int]:
    """Per node: whole devices held by pods that are not replicas of a deployment in the snapshot.

    Those are other workloads sharing the pools (another team's pods, batch jobs, the simulator's
    background pods); placement and routing must not count their devices as Wattplane's. Rules:

    * only a pod bound to a node holds devices: a pending one (``node`` None) counts nothing;
    * a pod holds ``num_gpu`` whole devices whatever its ``gpu_milli``: a device partly in use
      (Alibaba's fractional pods) is not free for a whole-GPU replica;
    * pods that name their devices (``gpu_indices``) are counted by distinct device, so fractional
      pods sharing one device hold it once; pods that do not are counted one device per GPU asked
      (the safe side: nothing says they share);
    * a node never holds more than its devices.
    """
    ours = {d.name for d in snapshot.deployments}
    named: dict[str, set[int]] = {}
    counted: dict[str, int] = {}
    for pod in snapshot.pods:
        if pod.node is None or pod.num_gpu == 0 or (pod.deployment is not None and pod.deployment in ours):
            continue
        if pod.gpu_indices:
            named.setdefault(pod.node, set()).update(pod.gpu_indices)
        else:
            counted[pod.node] = counted.get(pod.node, 0) + pod.num_gpu
    out = {node: len(idx) for node, idx in named.items()}
    for node, n in counted.items():
        out[node] = out.get(node, 0) + n
    return out


@dataclass(frozen=True)
class PoolRoom:
    """Devices a pool offers Wattplane's replicas, node by node (foreign pods' devices taken out)."""

    gpus_per_node: int
    free_per_node: IntArray  # per node counted (present ones, plus nodes an autoscaling pool may add)

    @property
    def devices(self) -> float:
        return float(self.free_per_node.sum())

    def fits(self, replica_devices: int) -> int:
        """Replicas of ``replica_devices`` (a divisor of the node size, or whole nodes) that fit."""
        if replica_devices <= self.gpus_per_node:  # within one node: its free devices, wherever they are
            return int((self.free_per_node // replica_devices).sum())
        # across nodes: one pod of a node's width on each of several nodes with that much free
        whole = int((self.free_per_node >= self.gpus_per_node).sum())
        return whole // math.ceil(replica_devices / self.gpus_per_node)


def pool_room(snapshot: Snapshot, pool: Pool, foreign: dict[str, int] | None = None) -> PoolRoom:
    """The pool's devices minus what foreign pods hold (``foreign`` from :func:`foreign_devices`).

    An autoscaling pool (``max_nodes`` set) counts ``max_nodes`` nodes: those present (ready or
    not: it may replace them) and empty ones it may add; present beyond ``max_nodes``, the freest
    count. A fixed pool counts its ready, schedulable nodes.
    """
    held = foreign_devices(snapshot) if foreign is None else foreign
    gpn = pool.gpus_per_node
    nodes = snapshot.nodes_in_pool(pool.name)
    if pool.max_nodes is not None:
        free = sorted((max(gpn - held.get(n.name, 0), 0) for n in nodes), reverse=True)[: pool.max_nodes]
        free += [gpn] * (pool.max_nodes - len(free))
    else:
        free = [max((n.gpus or gpn) - held.get(n.name, 0), 0) for n in nodes if n.ready and n.schedulable]
    return PoolRoom(gpus_per_node=gpn, free_per_node=np.array(free, dtype=np.int64))


def pool_devices(snapshot: Snapshot, pool: Pool, foreign: dict[str, int] | None = None) -> float:
    """Devices the pool offers Wattplane (see :func:`pool_room`)."""
    return pool_room(snapshot, pool, foreign).devices


def pool_cap_fractions(snapshot: Snapshot) -> list[float]:
    """Per pool: mean power limit / TDP over its reporting GPUs (1.0 when uncapped or unknown)."""
    pool_of = {n.name: n.pool for n in snapshot.nodes if n.pool is not None}
    tdp = {p.name: p.accelerator.tdp_w for p in snapshot.pools}
    sums: dict[str, list[float]] = {}
    for t in snapshot.gpu_telemetry:
        pool = pool_of.get(t.node)
        if pool is not None and t.power_limit_w is not None:
            sums.setdefault(pool, []).append(min(1.0, t.power_limit_w / tdp[pool]))
    return [float(np.mean(sums[p.name])) if p.name in sums else 1.0 for p in snapshot.pools]


def build_instance(snapshot: Snapshot, profiles: ProfileTable, params: InstanceParams | None = None) -> Instance:
    """Turn a snapshot (with forecast ``demand``) into the numeric placement problem."""
    params = params or InstanceParams()
    deps = snapshot.deployments
    pools = snapshot.pools
    domains = tuple(sorted({p.power_domain for p in pools if p.power_domain is not None}))
    domain_index = {d: i for i, d in enumerate(domains)}
    budgets = {d.name: d.budget_w * (1 - d.safety_margin) for d in snapshot.power_domains}
    demand = {d.deployment: d for d in snapshot.demand}
    current: dict[tuple[str, str], int] = {}
    for rs in snapshot.replicas:
        current[(rs.deployment, rs.pool)] = current.get((rs.deployment, rs.pool), 0) + rs.replicas

    foreign = foreign_devices(snapshot)
    rooms = [pool_room(snapshot, p, foreign) for p in pools]
    devcap = np.array([math.inf if params.unlimited_capacity else room.devices for room in rooms])
    fits: dict[tuple[int, int], int] = {}  # (pool, devices per replica) -> replicas that fit node by node
    caps = pool_cap_fractions(snapshot)
    idle_w = [power_model.gpu_power_w(p.accelerator, 0.0, 0.0, None) for p in pools]
    idle_domain: dict[str, float] = {}  # idle draw of every device present in the domain
    for p, pool in enumerate(pools):
        if pool.power_domain is not None:
            present = sum(n.gpus or pool.gpus_per_node for n in snapshot.nodes_in_pool(pool.name) if n.ready)
            idle_domain[pool.power_domain] = idle_domain.get(pool.power_domain, 0.0) + present * idle_w[p]
    factors = [cap_throughput_factor(c) for c in caps]
    cache: dict[tuple[object, ...], Profile | None] = {}

    replicas_now = [sum(n for (dn, _), n in current.items() if dn == d.name) for d in deps]
    rows: list[tuple[int, int, float, float, float, int, float, int, int]] = []
    need = np.zeros(len(deps))
    demand_out = np.zeros(len(deps))
    short_price = np.zeros(len(deps))
    for m, d in enumerate(deps):
        dm = demand.get(d.name)
        out = dm.output_tokens_per_s if dm else 0.0
        share = (dm.input_tokens_per_s / out) if dm and out > 0 else 0.0
        demand_out[m] = out
        need[m] = out / max(d.target_utilisation, 1e-6)
        allowed = set(d.allowed_pools) if d.allowed_pools else None
        preferred = set(d.preferred_pools)
        dearest = 0.0
        for p, pool in enumerate(pools):
            r0 = current.get((d.name, pool.name), 0)
            prof = None
            if allowed is None or pool.name in allowed:
                key = (d.model, d.parallelism, pool.accelerator)
                if key not in cache:
                    cache[key] = profiles.for_deployment(d, pool.accelerator)
                prof = cache[key]
            if prof is None:
                if r0 > 0:  # must drain: keep the pair so the change is planned and counted
                    dv = replica_devices(d.parallelism.devices, pool.gpus_per_node)
                    rows.append((m, p, 0.0, 0.0, 0.0, dv, 0.0, r0, 0))
                continue
            dec, pre = factors[p]
            a = 1.0 / (1.0 / (prof.output_tokens_per_s * dec) + share / (prof.input_tokens_per_s * pre))
            # SLO-feasibility: count only the load a replica serves within the SLO at the headroom
            # replicas that will share the load (TTFT pooling): as many as run now or the demand needs here
            pooled = max(replicas_now[m], math.ceil(out / max(a * d.target_utilisation, 1e-9)), 1)
            u_slo = slo_utilisation(prof, d.slo.ttft_p99_ms, d.slo.tpot_p99_ms, pooled)
            if u_slo <= 0.0:  # misses the SLO even idle: never plan it here (drain what runs)
                if r0 > 0:
                    dv = replica_devices(d.parallelism.devices, pool.gpus_per_node)
                    rows.append((m, p, 0.0, 0.0, 0.0, dv, 0.0, r0, 0))
                continue
            a *= min(1.0, u_slo / max(d.target_utilisation, 1e-6))
            dv = replica_devices(d.parallelism.devices, pool.gpus_per_node)
            # draw at the planned operating point (target utilisation, this prompt/token mix) by the
            # same board-power model the power stage and the simulator use, above the idle draw
            # every device pays anyway (counted once per domain below)
            t_in, t_out = share / prof.input_tokens_per_s, 1.0 / prof.output_tokens_per_s
            u = d.target_utilisation
            cap_w = caps[p] * pool.accelerator.tdp_w if caps[p] < 1.0 else None
            watts_dev = power_model.gpu_power_w(pool.accelerator, u * t_in / (t_in + t_out), u, cap_w)
            w = dv * max(watts_dev - idle_w[p], 0.0)
            c = dv * pool.cost_per_device_hour + dv * watts_dev / 1000.0 * params.power_price_per_kwh
            oc = c * (1 - params.preferred_discount) if pool.name in preferred else c
            if math.isinf(devcap[p]):
                ub = d.max_replicas
            else:
                if (p, dv) not in fits:
                    fits[(p, dv)] = rooms[p].fits(dv)
                ub = min(d.max_replicas, fits[(p, dv)])
            rows.append((m, p, a, c, oc, dv, w, r0, ub))
            dearest = max(dearest, c / a)
        short_price[m] = params.shortfall_factor * (dearest if dearest > 0 else 1.0)

    arr = np.array(rows, dtype=np.float64).reshape(-1, 9)
    cost = arr[:, 3]
    return Instance(
        deployments=tuple(d.name for d in deps),
        pools=tuple(p.name for p in pools),
        domains=domains,
        pair_m=arr[:, 0].astype(np.int64),
        pair_p=arr[:, 1].astype(np.int64),
        cap=arr[:, 2],
        cost=cost,
        obj_cost=arr[:, 4],
        dis=params.disruption_weight * np.maximum(cost, 1e-3),
        dev=arr[:, 5].astype(np.int64),
        power=arr[:, 6],
        r0=arr[:, 7].astype(np.int64),
        ub=arr[:, 8].astype(np.int64),
        need=need,
        demand_out=demand_out,
        min_r=np.array([d.min_replicas for d in deps], dtype=np.int64),
        max_r=np.array([d.max_replicas for d in deps], dtype=np.int64),
        short_price=short_price,
        pool_devices=devcap,
        pool_domain=np.array([domain_index.get(p.power_domain or "", -1) for p in pools], dtype=np.int64),
        domain_budget=np.array([math.inf if params.unlimited_capacity
                                else max(budgets.get(d, math.inf) - idle_domain.get(d, 0.0), 0.0) for d in domains]),
        pool_accelerator=tuple(p.accelerator.model for p in pools),
    )


@dataclass(frozen=True)
class Evaluation:
    """How good an integer replica vector is, term by term ($/h), and whether it is within limits."""

    objective: float
    cost_per_hour: float
    disruption: float
    shortfall: FloatArray  # per deployment: unmet need, tokens/s
    missing_min: IntArray  # per deployment: replicas below min_replicas
    changes: int
    feasible: bool  # capacity, power budgets, per-pair and per-deployment maxima hold


def evaluate(inst: Instance, r: IntArray) -> Evaluation:
    """Score ``r`` (replicas per pair) with the objective every method is compared on."""
    m_count = len(inst.deployments)
    cover = np.bincount(inst.pair_m, weights=inst.cap * r, minlength=m_count)
    total = np.bincount(inst.pair_m, weights=r.astype(np.float64), minlength=m_count)
    shortfall = np.maximum(inst.need - cover, 0.0)
    missing = np.maximum(inst.min_r - total, 0).astype(np.int64)
    delta = np.abs(r - inst.r0)
    obj = (
        float(inst.obj_cost @ r) + float(inst.dis @ delta) + float(inst.short_price @ shortfall)
        + float(missing_min_penalty(inst) @ missing)
    )
    return Evaluation(
        objective=obj,
        cost_per_hour=float(inst.cost @ r),
        disruption=float(inst.dis @ delta),
        shortfall=shortfall,
        missing_min=missing,
        changes=int(delta.sum()),
        feasible=violations(inst, r) == [],
    )


def missing_min_penalty(inst: Instance) -> FloatArray:
    """$/h per replica below ``min_replicas``: ten times the dearest replica of that deployment."""
    dearest = np.zeros(len(inst.deployments))
    np.maximum.at(dearest, inst.pair_m, inst.cost)
    return 10.0 * np.maximum(dearest, 1.0)


def violations(inst: Instance, r: IntArray) -> list[str]:
    """Hard limits ``r`` breaks (empty when it is a valid plan)."""
    out: list[str] = []
    if (r < 0).any():
        out.append("negative replicas")
    if (r > inst.ub).any():
        out.append("replicas above a pool's per-deployment bound")
    used = np.bincount(inst.pair_p, weights=inst.dev * r, minlength=len(inst.pools))
    for p in np.flatnonzero(used > inst.pool_devices + 1e-9):
        out.append(f"pool {inst.pools[p]}: {used[p]:g} devices > {inst.pool_devices[p]:g}")
    total = np.bincount(inst.pair_m, weights=r.astype(np.float64), minlength=len(inst.deployments))
    for m in np.flatnonzero(total > inst.max_r):
        out.append(f"deployment {inst.deployments[m]}: {total[m]:g} replicas > max {inst.max_r[m]}")
    if len(inst.domains):
        draw = domain_draw(inst, r)
        for k in np.flatnonzero(draw > inst.domain_budget + 1e-6):
            out.append(f"power domain {inst.domains[k]}: {draw[k]:.0f} W > {inst.domain_budget[k]:.0f} W")
    return out


def domain_draw(inst: Instance, r: IntArray) -> FloatArray:
    """Predicted W per power domain of the replicas ``r``."""
    dom = inst.pool_domain[inst.pair_p]
    mask = dom >= 0
    draw: FloatArray = np.bincount(dom[mask], weights=(inst.power * r)[mask], minlength=len(inst.domains)).astype(
        np.float64
    )
    return draw


def components(inst: Instance) -> list[tuple[IntArray, IntArray]]:
    """Independent sub-problems: (deployments, pools) linked by allowed pairs and shared power domains."""
    n_m, n_p = len(inst.deployments), len(inst.pools)
    parent = list(range(n_m + n_p))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for m, p in zip(inst.pair_m.tolist(), inst.pair_p.tolist(), strict=True):
        union(m, n_m + p)
    first_in_domain: dict[int, int] = {}
    for p, k in enumerate(inst.pool_domain.tolist()):
        if k >= 0:
            if k in first_in_domain:
                union(n_m + p, n_m + first_in_domain[k])
            else:
                first_in_domain[k] = p
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for x in range(n_m + n_p):
        g = groups.setdefault(find(x), ([], []))
        (g[0] if x < n_m else g[1]).append(x if x < n_m else x - n_m)
    return [(np.array(ms, dtype=np.int64), np.array(ps, dtype=np.int64)) for ms, ps in groups.values() if ms]


def replica_actions(inst: Instance, r: IntArray) -> tuple[SetReplicas, ...]:
    """One ``SetReplicas`` per pair whose count changes, in (deployment, pool) order."""
    out = []
    for k in np.flatnonzero(r != inst.r0):
        out.append(SetReplicas(
            deployment=inst.deployments[int(inst.pair_m[k])], pool=inst.pools[int(inst.pair_p[k])],
            replicas=int(r[k]), previous=int(inst.r0[k]),
        ))
    return tuple(sorted(out, key=lambda a: (a.deployment, a.pool)))


def plan_metrics(inst: Instance, r: IntArray) -> dict[str, float]:
    """Figures every placement plan reports, whoever made it."""
    ev = evaluate(inst, r)
    need = float(inst.need.sum())
    return {
        "cost_per_hour": round(ev.cost_per_hour, 6),
        "objective": round(ev.objective, 6),
        "replica_changes": float(ev.changes),
        "shortfall_tokens_per_s": round(float(ev.shortfall.sum()), 3),
        "need_covered": round(1.0 - float(ev.shortfall.sum()) / need, 6) if need > 0 else 1.0,
        "replicas": float(r.sum()),
        "devices": float((inst.dev * r).sum()),
        "power_w": round(float((inst.power * r).sum()), 1),
    }
