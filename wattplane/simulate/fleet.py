"""The simulated world: nodes, GPUs, replicas, background pods, caps, routing and expert placement.

The fleet is the in-memory fake behind the executor's ports (design §1: "same policies, same
executor interface"). It implements the controller's ``AgentPort`` and ``RouterPort``
(``controller/executor/ports.py``), and :func:`apply_plan` hands power caps and routing shares to
the controller's real :class:`controller.executor.executor.Executor` (``apply_node_actions``),
which calls those ports. Replica counts, expert placements and migrations — which the executor
turns into Kubernetes writes (Deployments, pod groups, ConfigMaps, evictions) — are applied here
directly: placement by first fit as a scheduler would, and make before break as the design asks
(an old replica serves until a replacement is Ready; see :meth:`SimulatedFleet.reconcile_replicas`).
Kubernetes does that inside one Deployment (a rolling update); across pools the executor applies
the same rule (``controller/executor/executor.py:apply_deployment``), so the two agree.

State lives in numpy arrays indexed by a global GPU id so a 10,000-GPU fleet stays cheap:
``owner[g]`` is the replica using GPU ``g`` (-1 none), ``bg_milli[g]`` the share used by background
pods, ``cap[g]`` its power limit (NaN: uncapped). Invariants (checked by :meth:`check`): a GPU has
at most one replica owner and no background share while owned, background shares stay within
[0, 1000], and no free-capacity count is negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controller.executor.executor import Executor
from controller.executor.ports import RecordingCluster
from policies.plan import MigratePod, Plan, SetExpertPlacement, SetPowerCap, SetReplicas, SetRoutingShare
from policies.snapshot import AcceleratorSpec
from wattplane.simulate.scenario import Scenario


@dataclass
class Replica:
    id: int
    name: str
    deployment: int
    pool: int
    gpus: np.ndarray  # global GPU ids, ordered by node
    ready_at: float


@dataclass
class BackgroundPod:
    name: str
    node: int
    gpus: np.ndarray  # global GPU ids it uses
    milli: int  # share of each GPU (1000 = whole)
    cpu_milli: int = 4000
    memory_mib: int = 16384


@dataclass
class ApplyReport:
    """What an apply did, for metrics: rejected actions are counted, never silently dropped."""

    replica_changes: int = 0
    caps_set: int = 0
    migrations: int = 0
    migrations_rejected: int = 0
    expert_copies: int = 0
    routing_changes: int = 0


class SimulatedFleet:
    """Fleet state plus the port methods the executor calls."""

    def __init__(self, scenario: Scenario, rng: np.random.Generator) -> None:
        self.scenario = scenario
        self.pools = list(scenario.pools)
        self.pool_index = {p.name: i for i, p in enumerate(self.pools)}
        self.domains = list(scenario.power_domains)
        self.domain_index = {d.name: i for i, d in enumerate(self.domains)}
        self.deployments = list(scenario.deployments)
        self.dep_index = {d.name: i for i, d in enumerate(self.deployments)}
        node_names: list[str] = []
        node_pool: list[int] = []
        node_first: list[int] = []
        gpu_node: list[int] = []
        for pi, p in enumerate(self.pools):
            for k in range(p.nodes):
                node_first.append(len(gpu_node))
                node_names.append(f"{p.name}-{k:04d}")
                node_pool.append(pi)
                gpu_node.extend([len(node_names) - 1] * p.gpus_per_node)
        self.node_names = node_names
        self.node_by_name = {n: i for i, n in enumerate(node_names)}
        self.node_pool = np.array(node_pool, dtype=np.int64)
        self.node_first = np.array(node_first, dtype=np.int64)
        self.node_ready = np.ones(len(node_names), dtype=bool)
        self.gpu_node = np.array(gpu_node, dtype=np.int64)
        self.gpu_pool = self.node_pool[self.gpu_node] if len(gpu_node) else np.zeros(0, dtype=np.int64)
        self.gpu_local = np.arange(len(gpu_node)) - (self.node_first[self.gpu_node] if len(gpu_node) else 0)
        pool_domain = np.array([self.domain_index[p.power_domain] if p.power_domain else -1 for p in self.pools])
        self.gpu_domain = pool_domain[self.gpu_pool] if len(gpu_node) else np.zeros(0, dtype=np.int64)
        n_gpu = len(gpu_node)
        self.owner = np.full(n_gpu, -1, dtype=np.int64)
        self.bg_milli = np.zeros(n_gpu, dtype=np.int64)
        self.cap = np.full(n_gpu, np.nan)
        self.replicas: dict[int, Replica] = {}
        self._next_replica = 0
        self.desired = np.zeros((len(self.deployments), len(self.pools)), dtype=np.int64)
        self.routing: dict[int, tuple[int, float]] = {}  # deployment -> (fallback deployment, share)
        self.placements: dict[int, tuple[int, np.ndarray, int]] = {}  # dep -> (version, phy2log, slots/device)
        self.background: dict[str, BackgroundPod] = {}
        self.version = 0  # bumped on every change that affects capacity or power groups
        self.caps_set = 0  # counters of the port calls that changed something
        self.routing_changes = 0
        self.executor = Executor(cluster=RecordingCluster(), agents=self, router=self)
        self._rng = rng

    # -- geometry helpers ------------------------------------------------------------------------
    def spec(self, pool: int) -> AcceleratorSpec:
        return self.pools[pool].accelerator

    def node_gpus(self, node: int) -> np.ndarray:
        first = int(self.node_first[node])
        return np.arange(first, first + self.pools[int(self.node_pool[node])].gpus_per_node)

    def free_whole(self) -> np.ndarray:
        """Per GPU: usable by a new replica (no owner, no background share, node ready)."""
        free: np.ndarray = (self.owner < 0) & (self.bg_milli == 0) & self.node_ready[self.gpu_node]
        return free

    def devices(self, dep: int) -> int:
        return self.deployments[dep].parallelism.devices

    # -- replicas (what the executor's Deployment / pod-group writes amount to) -------------------
    def set_replicas(self, action: SetReplicas) -> bool:
        """Record the desired count; :meth:`reconcile_replicas` (once per plan) converges to it."""
        dep, pool = self.dep_index.get(action.deployment), self.pool_index.get(action.pool)
        if dep is None or pool is None:
            return False
        changed = int(self.desired[dep, pool]) != action.replicas
        self.desired[dep, pool] = action.replicas
        return changed

    def running(self, dep: int, pool: int) -> list[Replica]:
        return [r for r in self.replicas.values() if r.deployment == dep and r.pool == pool]

    def reconcile_replicas(self, now: float) -> None:
        """Converge placed replicas to ``desired``: place missing ones first-fit, then remove extras.

        Make before break: additions first; extras not yet ready go at once, but a *ready* extra
        (an old replica a move or shrink no longer wants) is removed only while the deployment keeps
        at least its desired total of ready replicas without it, i.e. once a replacement is Ready, or
        because the plan shrinks the deployment as a whole. A replacement that is only starting, or
        Pending because its pool has no room (other workloads hold the GPUs), replaces nothing: the
        old replica keeps serving. The engine calls this again whenever a replica turns ready.
        """
        groups: dict[tuple[int, int], list[Replica]] = {}
        for r in self.replicas.values():
            groups.setdefault((r.deployment, r.pool), []).append(r)
        for dep, pool in zip(*np.nonzero(self.desired), strict=True):
            have = len(groups.get((int(dep), int(pool)), []))
            for _ in range(int(self.desired[dep, pool]) - have):
                if not self._place(int(dep), int(pool), now):
                    break
        ready = np.zeros(len(self.deployments), dtype=np.int64)
        for r in self.replicas.values():
            ready[r.deployment] += int(r.ready_at <= now)
        # ready replicas each deployment may lose and still have its desired total ready
        spare = np.maximum(ready - self.desired.sum(axis=1), 0)
        ready_extras: list[Replica] = []
        for (dep, pool), have_list in groups.items():
            extra = len(have_list) - int(self.desired[dep, pool])
            if extra <= 0:
                continue
            # not-yet-ready first, then newest: the oldest (warm) replicas keep serving
            have_list.sort(key=lambda r: (r.ready_at <= now, -r.id))
            for r in have_list[:extra]:
                if r.ready_at <= now:
                    ready_extras.append(r)
                else:
                    self._remove(r)
        for r in sorted(ready_extras, key=lambda r: -r.id):  # newest first, across pools
            if spare[r.deployment] > 0:
                spare[r.deployment] -= 1
                self._remove(r)

    def pending(self, dep: int, pool: int) -> int:
        return max(int(self.desired[dep, pool]) - len(self.running(dep, pool)), 0)

    def _place(self, dep: int, pool: int, now: float) -> bool:
        need = self.devices(dep)
        per_node = self.pools[pool].gpus_per_node
        free = self.free_whole()
        nodes = np.nonzero(self.node_pool == pool)[0]
        if len(nodes) == 0:
            return False
        free_per_node = np.add.reduceat(free[self.gpu_pool == pool].astype(np.int64),
                                        np.arange(0, len(nodes) * per_node, per_node))
        if need <= per_node:
            fit = np.nonzero(free_per_node >= need)[0]
            if len(fit) == 0:
                return False
            # first fit in node order: packs replicas onto few nodes, leaving whole nodes for wide replicas
            node = int(nodes[fit[0]])
            gpus = self.node_gpus(node)
            gpus = gpus[free[gpus]][:need]
        else:
            k = math.ceil(need / per_node)
            whole = np.nonzero(free_per_node == per_node)[0][:k]
            if len(whole) < k:
                return False
            gpus = np.concatenate([self.node_gpus(int(nodes[i])) for i in whole])[:need]
        rid = self._next_replica
        self._next_replica += 1
        name = f"{self.deployments[dep].name}-{self.pools[pool].name}-{rid}"
        startup = self.scenario.replica_startup_s if now > 0 else 0.0
        self.replicas[rid] = Replica(rid, name, dep, pool, gpus, now + startup)
        self.owner[gpus] = rid
        self.version += 1
        return True

    def _remove(self, r: Replica) -> None:
        self.owner[r.gpus] = -1
        del self.replicas[r.id]
        self.version += 1

    # -- AgentPort / RouterPort (controller/executor/ports.py) -----------------------------------
    def set_power_cap(self, action: SetPowerCap) -> None:
        """The agent's applier: clamp to the device's legal range, as the node agent does."""
        node = self.node_by_name.get(action.node)
        if node is None:
            return
        gpus = self.node_gpus(node)
        if action.gpu >= len(gpus):
            return
        g = gpus[action.gpu]
        old = self.cap[g]
        spec = self.spec(int(self.gpu_pool[g]))
        new = np.nan if action.power_limit_w is None else min(max(action.power_limit_w, spec.min_power_w),
                                                              spec.max_power_w)
        if (math.isnan(old) and math.isnan(new)) or old == new:
            return
        self.cap[g] = new
        self.caps_set += int(not math.isnan(new))
        self.version += 1

    def set_routing_share(self, action: SetRoutingShare) -> None:
        dep, fb = self.dep_index.get(action.deployment), self.dep_index.get(action.fallback)
        if dep is None or fb is None:
            return
        old = self.routing.get(dep)
        self.routing[dep] = (fb, float(action.fallback_share))
        self.routing_changes += int(old is None or abs(old[1] - action.fallback_share) > 1e-9)

    # -- expert placement (the executor publishes it as a versioned ConfigMap) --------------------
    def set_expert_placement(self, action: SetExpertPlacement) -> int:
        dep = self.dep_index.get(action.deployment)
        if dep is None or not action.phy2log:
            return 0
        self.placements[dep] = (action.version, np.array(action.phy2log, dtype=np.int64), action.slots_per_device)
        self.version += 1
        return int(action.copies)

    # -- migrations ----------------------------------------------------------------------------
    def migrate(self, action: MigratePod) -> bool:
        """Move a background pod or a one-node replica pod; refused when the target cannot hold it.

        Replica moves are make-before-break (the new pod warms up while the old one serves), so the
        replica keeps serving; the cost is counted as a migration.
        """
        to = self.node_by_name.get(action.to_node)
        if to is None or not self.node_ready[to]:
            return False
        bg = self.background.get(action.pod)
        target = self.node_gpus(to)
        if bg is not None:
            free_share = np.where(self.owner[target] < 0, 1000 - self.bg_milli[target], 0)
            if bg.milli < 1000:
                fit = np.nonzero(free_share >= bg.milli)[0]
                if len(fit) == 0:
                    return False
                # best fit: the most-used GPU that still fits, to keep whole GPUs free
                g = target[fit[np.argmin(free_share[fit])]]
                chosen = np.array([g])
            else:
                whole = target[free_share == 1000]
                if len(whole) < len(bg.gpus):
                    return False
                chosen = whole[: len(bg.gpus)]
            self.bg_milli[bg.gpus] -= bg.milli
            self.bg_milli[chosen] += bg.milli
            bg.gpus, bg.node = chosen, to
            self.version += 1
            return True
        rid = _replica_id(action.pod)
        r = self.replicas.get(rid) if rid is not None else None
        if r is None or len(r.gpus) > self.pools[r.pool].gpus_per_node or int(self.node_pool[to]) != r.pool:
            return False
        free = self.free_whole()[target]
        if free.sum() < len(r.gpus):
            return False
        chosen = target[free][: len(r.gpus)]
        self.owner[r.gpus] = -1
        self.owner[chosen] = r.id
        r.gpus = chosen
        self.version += 1
        return True

    # -- background pods and faults --------------------------------------------------------------
    def seed_background(self, shapes: list[tuple[int, int, int, int]] | None = None) -> None:
        """Scatter background pods over the GPUs the initial replicas left free.

        ``shapes`` are real pods' ``(num_gpu, gpu_milli, cpu_milli, memory_mib)`` (e.g. from the
        Alibaba trace); without them ``background.count`` synthetic pods are drawn.
        """
        spec = self.scenario.background
        if shapes is None:
            shapes = []
            for _ in range(spec.count):
                frac = self._rng.random() < spec.fractional_share
                milli = int(self._rng.choice([250, 500, 750])) if frac else 1000
                ngpu = 1 if frac else int(self._rng.choice([1, 2, 4], p=[0.6, 0.3, 0.1]))
                shapes.append((ngpu, milli, 4000, 16384))
        if not shapes:
            return
        pools = [self.pool_index[p] for p in spec.pools] if spec.pools else list(range(len(self.pools)))
        nodes = np.nonzero(np.isin(self.node_pool, pools))[0]
        if len(nodes) == 0:
            return
        for k, (ngpu, milli, cpu, mem) in enumerate(shapes):
            # scattered placement (a spreading scheduler over time): a random node with room
            for _ in range(20):
                node = int(self._rng.choice(nodes))
                gpus = self.node_gpus(node)
                room = np.where(self.owner[gpus] < 0, 1000 - self.bg_milli[gpus], 0)
                ok = gpus[room >= milli]
                if len(ok) >= ngpu:
                    chosen = self._rng.choice(ok, size=ngpu, replace=False)
                    self.bg_milli[chosen] += milli
                    name = f"bg-{k:05d}"
                    self.background[name] = BackgroundPod(name, node, np.sort(chosen), milli, cpu, mem)
                    break

    def finish_background(self, fraction: float) -> int:
        """Background pods finish (churn): free their GPUs; returns how many ended."""
        if not self.background or fraction <= 0:
            return 0
        names = sorted(self.background)
        ended = [n for n in names if self._rng.random() < fraction]
        for n in ended:
            bg = self.background.pop(n)
            self.bg_milli[bg.gpus] -= bg.milli
        if ended:
            self.version += 1
        return len(ended)

    def fail_node(self, name: str, failed: bool) -> None:
        node = self.node_by_name.get(name)
        if node is None:
            return
        self.node_ready[node] = not failed
        if failed:
            for r in [r for r in self.replicas.values() if int(self.gpu_node[r.gpus[0]]) == node
                      or node in set(self.gpu_node[r.gpus].tolist())]:
                self._remove(r)
        self.version += 1

    # -- invariants -----------------------------------------------------------------------------
    def check(self) -> list[str]:
        problems = []
        if (self.bg_milli < 0).any() or (self.bg_milli > 1000).any():
            problems.append("background GPU share outside [0, 1000]")
        if ((self.owner >= 0) & (self.bg_milli > 0)).any():
            problems.append("a GPU is owned by a replica and shared by a background pod")
        seen = np.zeros(len(self.owner), dtype=np.int64)
        for r in self.replicas.values():
            seen[r.gpus] += 1
            if (self.owner[r.gpus] != r.id).any():
                problems.append(f"replica {r.name}: owner map disagrees")
        if (seen > 1).any():
            problems.append("a GPU is assigned to two replicas")
        if (self.free_whole().sum()) < 0:
            problems.append("negative free capacity")
        return problems


def _replica_id(pod: str) -> int | None:
    """Replica pods are named ``<replica name>-<ordinal>``; the replica name ends in its id."""
    parts = pod.rsplit("-", 2)
    if len(parts) < 3:
        return None
    try:
        return int(parts[-2])
    except ValueError:
        return None


def apply_plan(fleet: SimulatedFleet, plan: Plan, now: float, report: ApplyReport) -> None:
    """Apply a plan: node actions through the controller's executor, the rest to the fleet directly."""
    caps, routes = fleet.caps_set, fleet.routing_changes
    fleet.executor.apply_node_actions(plan, dry_run=plan.dry_run)
    report.caps_set += fleet.caps_set - caps
    report.routing_changes += fleet.routing_changes - routes
    if plan.dry_run:
        return
    for a in plan.actions:
        if isinstance(a, SetReplicas):
            report.replica_changes += int(fleet.set_replicas(a))
        elif isinstance(a, SetExpertPlacement):
            report.expert_copies += fleet.set_expert_placement(a)
        elif isinstance(a, MigratePod):
            if fleet.migrate(a):
                report.migrations += 1
            else:
                report.migrations_rejected += 1
    if any(isinstance(a, MigratePod | SetReplicas) for a in plan.actions):
        fleet.reconcile_replicas(now)  # new desired counts, or room freed by migrations


__all__ = ["ApplyReport", "BackgroundPod", "Replica", "SimulatedFleet", "apply_plan"]
