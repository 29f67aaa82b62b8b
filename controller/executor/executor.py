"""THE executor: a Plan becomes writes through the ports, idempotently, within disruption limits.

Level-triggered: given the desired replicas per pool and what is observed now, it writes only the
difference, so running it twice, or after a crash half-way, converges without duplicates (object
names are derived from the spec, and writes are server-side applies with one field manager).
Order, and why: additions before removals, and make before break across pools: when a plan moves
replicas from pool A to pool B, a *ready* replica in A goes only while the deployment keeps at least
its desired total of ready replicas without it (the simulator's rule, ``SimulatedFleet.reconcile_replicas``),
so a B that cannot host the replacements (full, a node died) never leaves the model with nothing
serving; the rest goes on later reconciles as replacements turn Ready (derived from observed
``readyReplicas``, no hidden state). Not-ready extras go at once, and so does a whole-deployment
shrink. Removals are also clipped by a central disruption budget, whatever a policy asked for.
Dry-run returns the same list of changes without writing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.api import models as api
from controller.executor import render as r
from controller.executor.ports import AgentPort, ClusterPort, RouterPort
from controller.faults import fault_point
from policies.plan import Plan, SetExpertPlacement, SetPowerCap, SetReplicas, SetRoutingShare


@dataclass(frozen=True)
class Change:
    op: str  # "apply" | "delete"
    kind: str
    namespace: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.op} {self.kind} {self.namespace}/{self.name}" + (f": {self.detail}" if self.detail else "")


@dataclass
class DisruptionBudget:
    """Replicas (or group members) the executor may remove or replace in one cycle."""

    max_removals: int
    used: int = 0

    def take(self, wanted: int) -> int:
        granted = max(0, min(wanted, self.max_removals - self.used))
        self.used += granted
        return granted


@dataclass
class ReadySpare:
    """Ready replicas a deployment may still lose this pass and keep its desired total ready."""

    left: int

    def take(self, wanted: int) -> int:
        granted = max(0, min(wanted, self.left))
        self.left -= granted
        return granted


@dataclass
class ExecutionResult:
    changes: list[Change] = field(default_factory=list)
    limited: bool = False  # the disruption budget or a terminating object held something back: requeue
    dry_run: bool = False
    kept_waiting: int = 0  # old ready replicas kept until replacements elsewhere are Ready (make before break)


@dataclass(frozen=True)
class Observed:
    """What runs now for one (ModelDeployment, pool): counts derived from owned objects."""

    pool: str
    shape: str
    replicas: int
    ready: int


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def observe(objects: Sequence[Mapping[str, Any]]) -> dict[str, Observed]:
    """Replicas and ready replicas per pool from the Deployments and group pods a deployment owns."""
    out: dict[str, Observed] = {}
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for obj in objects:
        labels = _labels(obj)
        pool = labels.get(r.L_POOL)
        if pool is None:
            continue
        if obj["kind"] == "Deployment":
            spec_n = int(obj.get("spec", {}).get("replicas") or 0)
            ready = int((obj.get("status") or {}).get("readyReplicas") or 0)
            out[pool] = Observed(pool, r.SHAPE_DEPLOYMENT, spec_n, min(ready, spec_n))
        elif obj["kind"] == "Pod" and labels.get(r.L_SHAPE) == r.SHAPE_GROUP:
            groups[pool][labels.get(r.L_GROUP, "")].append(obj)
    for pool, members in groups.items():
        ready = sum(1 for pods in members.values() if pods and all(_pod_ready(p) for p in pods))
        out[pool] = Observed(pool, r.SHAPE_GROUP, len(members), ready)
    return out


def desired_from_plan(plan: Plan, deployment: str, current: Mapping[str, int]) -> dict[str, int]:
    """Current replicas per pool, overridden by the plan's SetReplicas for ``deployment``."""
    desired = dict(current)
    for action in plan.actions:
        if isinstance(action, SetReplicas) and action.deployment == deployment:
            desired[action.pool] = action.replicas
    return desired


class Executor:
    def __init__(
        self, cluster: ClusterPort, agents: AgentPort | None = None, router: RouterPort | None = None
    ) -> None:
        self.cluster = cluster
        self.agents = agents
        self.router = router

    # -- one ModelDeployment ------------------------------------------------------------------
    def apply_deployment(
        self,
        md: api.ModelDeployment,
        pools: Mapping[str, api.AcceleratorPool],
        desired: Mapping[str, int],
        objects: Sequence[Mapping[str, Any]],
        budget: DisruptionBudget,
        dry_run: bool = False,
    ) -> ExecutionResult:
        """Make the objects of ``md`` match ``desired`` replicas per pool; pools not listed get none."""
        result = ExecutionResult(dry_run=dry_run)
        ns = md.metadata["namespace"]
        by_pool: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for obj in objects:
            pool = _labels(obj).get(r.L_POOL)
            if pool is not None:
                by_pool[pool].append(obj)
        pool_by_label = {r.short(name): name for name in pools}
        wanted = {p: n for p, n in desired.items() if n > 0 and p in pools}
        seen = observe(objects)
        spare = ReadySpare(max(sum(o.ready for o in seen.values()) - sum(wanted.values()), 0))
        # additions and updates first (make before break), then removals in pools no longer wanted
        for pool_name, n in sorted(wanted.items()):
            spec = pools[pool_name]
            mine = by_pool.get(r.short(pool_name), [])
            if r.shape_for(md, spec).kind == r.SHAPE_DEPLOYMENT:
                self._deployment(md, pool_name, spec, n, mine, budget, result, spare)
                self._remove(ns, [o for o in mine if o["kind"] == "Pod" and _labels(o).get(r.L_SHAPE) == r.SHAPE_GROUP],
                             budget, result, "shape changed to Deployment")
            else:
                self._groups(md, pool_name, spec, n, mine, budget, result, spare)
                self._remove(ns, [o for o in mine if o["kind"] == "Deployment"], budget, result,
                             "shape changed to pod group")
        for label, mine in sorted(by_pool.items()):
            if pool_by_label.get(label) in wanted:
                continue
            old = seen.get(label)
            old_pool = pool_by_label.get(label)
            if old is not None and old_pool is not None and old.ready > spare.left:
                # make before break: part of this pool still serves until replacements are Ready
                if old.shape == r.SHAPE_DEPLOYMENT:
                    self._deployment(md, old_pool, pools[old_pool], 0, mine, budget, result, spare)
                else:
                    self._groups(md, old_pool, pools[old_pool], 0, mine, budget, result, spare)
                continue
            if old is not None:
                spare.take(old.ready)
            stale = [o for o in mine if o["kind"] == "Deployment" or _labels(o).get(r.L_SHAPE) == r.SHAPE_GROUP]
            self._remove(ns, stale, budget, result, "no replicas wanted in this pool")
            for svc in {_labels(o).get(r.L_GROUP) for o in mine if _labels(o).get(r.L_GROUP)}:
                self._write(result, Change("delete", "Service", ns, str(svc), "group removed"))
        return result

    def _deployment(
        self,
        md: api.ModelDeployment,
        pool_name: str,
        pool: api.AcceleratorPool,
        n: int,
        mine: Sequence[Mapping[str, Any]],
        budget: DisruptionBudget,
        result: ExecutionResult,
        spare: ReadySpare,
    ) -> None:
        current = next((o for o in mine if o["kind"] == "Deployment"), None)
        target = n
        if current is not None:
            have = int(current.get("spec", {}).get("replicas") or 0)
            if n < have:
                # the ReplicaSet removes not-ready pods first: those go at once, ready ones only as spare allows
                ready = min(int((current.get("status") or {}).get("readyReplicas") or 0), have)
                unready_cut = min(have - n, have - ready)
                ready_cut = have - n - unready_cut
                kept = ready_cut - spare.take(ready_cut)
                result.kept_waiting += kept
                target = have - budget.take(have - n - kept)
                result.limited |= target != n
            if target == 0:
                self._write(result, Change("delete", "Deployment", current["metadata"]["namespace"],
                                           current["metadata"]["name"], "no replicas wanted in this pool"))
                return
            same_hash = current["metadata"].get("annotations", {}).get(r.A_SPEC_HASH)
            want = r.render_deployment(md, pool_name, pool, target)
            if have == target and same_hash == want["metadata"]["annotations"][r.A_SPEC_HASH]:
                return
            detail = f"replicas {have} -> {target}" if have != target else "template changed"
        else:
            want = r.render_deployment(md, pool_name, pool, target)
            detail = f"create with {target} replicas"
        self._write(result, Change("apply", "Deployment", want["metadata"]["namespace"], want["metadata"]["name"],
                                   detail), want)

    def _groups(
        self,
        md: api.ModelDeployment,
        pool_name: str,
        pool: api.AcceleratorPool,
        n: int,
        mine: Sequence[Mapping[str, Any]],
        budget: DisruptionBudget,
        result: ExecutionResult,
        spare: ReadySpare,
    ) -> None:
        ns = md.metadata["namespace"]
        shape = r.shape_for(md, pool)
        pods = {o["metadata"]["name"]: o for o in mine if o["kind"] == "Pod"}
        existing = sorted({int(_labels(o).get(r.L_GROUP_INDEX, "0")) for o in pods.values()})
        # shrink: whole groups at a time, highest indices first, not-ready groups at once, ready ones only
        # as the deployment's ready spare allows (make before break), all within the budget
        extra = [i for i in existing if i >= n]
        members_of = {i: [p for p in pods.values() if _labels(p).get(r.L_GROUP_INDEX, "0") == str(i)] for i in extra}
        ready = [i for i in extra if members_of[i] and all(_pod_ready(p) for p in members_of[i])]
        kept = len(ready) - spare.take(len(ready))
        result.kept_waiting += kept
        held = set(sorted(ready)[:kept])  # the lowest ready indices keep serving
        removable = [i for i in extra if i not in held]
        keep_extra = len(removable) - budget.take(len(removable))
        result.limited |= keep_extra > 0 or kept > 0
        for index in sorted(removable, reverse=True)[: len(removable) - keep_extra]:
            group = r.group_name(md, pool_name, index)
            members = [p for p in pods.values() if _labels(p).get(r.L_GROUP) == group]
            for p in members:
                self._write(result, Change("delete", "Pod", ns, p["metadata"]["name"], "group removed"))
            self._write(result, Change("delete", "Service", ns, group, "group removed"))
        for index in range(n):
            group = r.group_name(md, pool_name, index)
            created = False
            for ordinal in range(shape.nodes):
                want = r.render_group_pod(md, pool_name, pool, index, ordinal)
                name = want["metadata"]["name"]
                have = pods.get(name)
                if have is not None:
                    if have["metadata"].get("deletionTimestamp"):
                        result.limited = True  # re-create once it is gone
                        continue
                    same = have["metadata"].get("annotations", {}).get(r.A_SPEC_HASH) == want["metadata"][
                        "annotations"][r.A_SPEC_HASH]
                    failed = (have.get("status") or {}).get("phase") in ("Failed", "Succeeded")
                    if same and not failed:
                        continue
                    if not budget.take(1):
                        result.limited = True
                        continue
                    self._write(result, Change("delete", "Pod", ns, name, "failed" if failed else "spec changed"))
                    result.limited = True
                    continue
                if not created:
                    svc = r.render_group_service(md, pool_name, index)
                    self._write(result, Change("apply", "Service", ns, group, "group service"), svc)
                    created = True
                self._write(result, Change("apply", "Pod", ns, name, f"group {index} member {ordinal}"), want)
            # group members beyond the shape's node count (the group shrank by a node)
            for p in pods.values():
                if _labels(p).get(r.L_GROUP) == group and int(_labels(p).get(r.L_ORDINAL, "0")) >= shape.nodes:
                    if budget.take(1):
                        self._write(result, Change("delete", "Pod", ns, p["metadata"]["name"], "group shrank"))
                    else:
                        result.limited = True

    def _remove(
        self, ns: str, objs: Sequence[Mapping[str, Any]], budget: DisruptionBudget, result: ExecutionResult,
        why: str,
    ) -> None:
        for obj in objs:
            if obj["metadata"].get("deletionTimestamp"):
                continue
            weight = int(obj.get("spec", {}).get("replicas") or 0) if obj["kind"] == "Deployment" else 1
            if weight and budget.take(weight) < weight:
                result.limited = True
                continue
            self._write(result, Change("delete", obj["kind"], ns, obj["metadata"]["name"], why))

    def _write(self, result: ExecutionResult, change: Change, obj: dict[str, Any] | None = None) -> None:
        result.changes.append(change)
        if result.dry_run:
            return
        if change.op == "apply":
            assert obj is not None
            self.cluster.apply(obj)
            fault_point("executor.after_apply")
        else:
            self.cluster.delete(change.kind, change.namespace, change.name)
            fault_point("executor.after_delete")

    # -- whole-fleet actions --------------------------------------------------------------------
    def apply_plan(
        self,
        plans: Sequence[Plan],
        md: api.ModelDeployment,
        deployment_key: str,
        pools: Mapping[str, api.AcceleratorPool],
        objects: Sequence[Mapping[str, Any]],
        budget: DisruptionBudget,
        dry_run: bool = False,
    ) -> ExecutionResult:
        """Apply the parts of the cycle's plans (pipeline order) that concern one ModelDeployment.

        Later plans refine earlier ones: a later SetReplicas for the same pool wins.
        """
        seen = observe(objects)
        desired = {name: seen[r.short(name)].replicas if r.short(name) in seen else 0 for name in pools}
        for plan in plans:
            desired = desired_from_plan(plan, deployment_key, desired)
        dry_run = dry_run or any(p.dry_run for p in plans)
        result = self.apply_deployment(md, pools, desired, objects, budget, dry_run)
        for plan in plans:
            for action in plan.actions:
                if isinstance(action, SetExpertPlacement) and action.deployment == deployment_key:
                    cm = r.render_expert_placement(md, action.version, [list(row) for row in action.phy2log])
                    self._write(result, Change("apply", "ConfigMap", cm["metadata"]["namespace"],
                                               cm["metadata"]["name"], f"expert placement v{action.version}"), cm)
        return result

    def apply_node_actions(self, plan: Plan, dry_run: bool = False) -> list[str]:
        """Power caps go to the agents, routing shares to the router; returns what was (or would be) done."""
        done = []
        for action in plan.actions:
            if isinstance(action, SetPowerCap) and self.agents is not None:
                if not dry_run:
                    self.agents.set_power_cap(action)
                    fault_point("executor.after_cap")
                done.append(f"cap {action.node}/{action.gpu} at {action.power_limit_w} W")
            elif isinstance(action, SetRoutingShare) and self.router is not None:
                if not dry_run:
                    self.router.set_routing_share(action)
                done.append(f"route {action.fallback_share:.2f} of {action.deployment} to {action.fallback}")
        return done
