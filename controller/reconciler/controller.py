"""The level-triggered reconciler: watch -> queue of keys -> reconcile(key).

Watches only enqueue keys (``md:<ns>/<name>``, ``pool:<name>``). A worker takes a key and runs
one pass: *passive sync* (read the caches, build the Snapshot, observe what runs) then *active
step* (run the policy pipeline, hand this deployment's part of the Plan to the one executor),
then writes status once, with Events on changes and bad input. Every pass works from the whole
current state, not from the event that woke it, so a missed or repeated event, a restart or a
crash half-way all converge to the same objects.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from controller.api import convert
from controller.api import models as api
from controller.dataplane.table import DEFAULT_TTL_S
from controller.executor import render as r
from controller.executor.executor import DisruptionBudget, Executor, desired_from_plan, observe
from controller.executor.ports import AgentPort, RouterPort
from controller.faults import fault_point
from controller.kube import Kube, KubeClusterPort, KubeError
from controller.metrics import Metrics
from controller.pipeline import run_pipeline, shortfall
from controller.reconciler.informer import Informer
from controller.reconciler.queue import ShutDown, WorkQueue
from controller.reconciler.reschedule_input import gpus_of, unschedulable, with_cluster_pods
from controller.reconciler.status import (
    KEEPING_OLD_REPLICAS,
    Problem,
    deployment_status,
    domain_draws,
    effects_of,
    merge_window,
    pool_status,
    power_domain_status,
    power_plan_summary,
    wire,
)
from controller.snapshot_builder import Built, OurReplicas, build_snapshot, group_by_owner, held_devices, owner_key
from controller.telemetry.summary import PowerReadings
from policies.pipeline import PipelineState
from policies.plan import MigratePod, Plan, PolicyName, SetReplicas, SetRoutingShare
from policies.power import node_shares
from policies.snapshot import GPUTelemetry, ServingTelemetry

log = logging.getLogger(__name__)

TelemetrySource = Callable[[], tuple[Sequence[GPUTelemetry], Sequence[ServingTelemetry]]]
PowerSource = Callable[[], PowerReadings]

FINALIZER = "wattplane.io/cleanup"
MANAGED_SELECTOR = f"{r.MANAGED_BY}={r.MANAGED_BY_VALUE}"
MD = "md:"
POOL = "pool:"
FLEET = "fleet:"  # "re-plan now": fans out to every deployment the fresh plan gives work
PD = "pd:"  # a PowerDomain's status pass; it requeues itself every POWER_STATUS_PERIOD_S
POWER_STATUS_PERIOD_S = 2.0
POOL_STATUS_DELAY_S = 1.0
REPLAN_INTERVAL_S = 1.0
# The router drops a table ``DEFAULT_TTL_S`` after it last heard of it (a controller gone quiet must not
# keep traffic on the fallback), so the shares in force are re-pushed well within that TTL even when
# the plan has not changed.
ROUTING_REFRESH_S = DEFAULT_TTL_S / 3
MIGRATION_SETTLE_S = 5.0  # after a batch of moves, let the scheduler place the replacements before the next


def iso_now(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _node_fingerprint(node: Mapping[str, Any] | None) -> tuple[Any, ...]:
    if node is None:
        return ()
    status = node.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return (tuple(sorted((node["metadata"].get("labels") or {}).items())),
            (status.get("allocatable") or {}).get(r.GPU_RESOURCE), conds.get("Ready"),
            (node.get("spec") or {}).get("unschedulable"))


def _keeping(status: api.ModelDeploymentStatus | None) -> bool:
    """Whether the last status already said old replicas wait for their replacements."""
    return any(c.type == api.ConditionType.PROGRESSING and c.reason == KEEPING_OLD_REPLICAS
               for c in (status.conditions if status else []))


def _plan_input(obj: Mapping[str, Any]) -> tuple[Any, ...]:
    """The parts of an owned object the snapshot (and so the plan) depends on."""
    spec = obj.get("spec") or {}
    return (obj["metadata"].get("labels"), spec.get("replicas"), spec.get("nodeName"),
            bool(obj["metadata"].get("deletionTimestamp")), (obj.get("status") or {}).get("phase"))


def _reschedule_input(pod: Mapping[str, Any]) -> tuple[Any, ...]:
    """The parts of any GPU pod the rescheduler's snapshot depends on."""
    meta = pod["metadata"]
    return (meta.get("labels"), (pod.get("spec") or {}).get("nodeName"), bool(meta.get("deletionTimestamp")),
            (pod.get("status") or {}).get("phase"), unschedulable(pod))


def restore_state(fleet: api.FleetPolicy) -> PipelineState:
    """The pipeline State a previous leader saved, or a fresh one when there is none or it is unreadable."""
    saved = fleet.status.pipeline_state if fleet.status else {}
    try:
        return PipelineState.model_validate(saved) if saved else PipelineState()
    except ValidationError:
        log.warning("saved pipeline state does not validate; starting fresh")
        return PipelineState()


class Controller:
    drain_s = 10.0  # how long a serving replica out of its Service's endpoints gets before it is evicted

    def __init__(self, kube: Kube, metrics: Metrics | None = None, *, workers: int = 2,
                 resync_s: float | None = None, dry_run: bool = False, identity: str = "wattplane",
                 agents: AgentPort | None = None, router: RouterPort | None = None,
                 telemetry: TelemetrySource | None = None, power: PowerSource | None = None) -> None:
        """``agents``/``router`` receive power caps and routing shares (none: those actions are only
        logged); ``telemetry()`` returns (GPU readings, serving load) for the snapshot when a hub runs;
        ``power()`` the hub's per-node draws and cap acknowledgements for PowerDomain status."""
        self.kube = kube
        self.metrics = metrics or Metrics()
        self.kube.on_request = lambda verb: self.metrics.api_requests.labels(verb).inc()
        self.workers = workers
        self.resync_override = resync_s
        self.dry_run = dry_run
        self.identity = identity
        self.queue = WorkQueue()
        self.executor = Executor(KubeClusterPort(kube), agents, router)
        self.telemetry = telemetry
        self.power = power
        self._draw_windows: dict[str, dict[int, float]] = {}  # PowerDomain -> {unix second: domain draw W}
        self._applied_node_plans: set[str] = set()
        self._routing_pushed_at = -math.inf  # monotonic time of the last push of the routing shares in force
        self.stop_event = threading.Event()
        self._gen = 0  # bumped by any change the snapshot reads
        self._spec_gen = 0  # bumped by changes of intent (specs, pools, nodes): these always re-plan
        self._gen_lock = threading.Lock()
        self._plan_lock = threading.Lock()
        self._memo: tuple[int, int, float, Built, list[Plan]] | None = None  # spec_gen, gen, at, ...
        self._pipeline_state: PipelineState | None = None  # restored from the FleetPolicy status
        self._state_saved = -1e9
        self._threads: list[threading.Thread] = []
        self.reconcile_count = 0
        self._migrations: threading.Thread | None = None  # the batch of moves under way, if any
        self._migrations_done = -1e9  # monotonic time the last batch finished
        inf = self.informers = {
            "AcceleratorPool": Informer(kube, "AcceleratorPool", self._on_fleet_object),
            "PowerDomain": Informer(kube, "PowerDomain", self._on_fleet_object),
            "FleetPolicy": Informer(kube, "FleetPolicy", self._on_fleet_object),
            "ModelDeployment": Informer(kube, "ModelDeployment", self._on_md),
            "Node": Informer(kube, "Node", self._on_node),
            "Deployment": Informer(kube, "Deployment", self._on_owned, label_selector=MANAGED_SELECTOR),
            "Pod": Informer(kube, "Pod", self._on_owned, label_selector=MANAGED_SELECTOR),
            # rescheduling sees every GPU pod (fragmentation is made by all of them) and their budgets
            "ClusterPod": Informer(kube, "Pod", self._on_cluster_pod),
            "PodDisruptionBudget": Informer(kube, "PodDisruptionBudget", self._on_budget),
        }
        for i in inf.values():
            i.on_error = self._on_watch_error

    def _on_watch_error(self, kind: str, exc: Exception) -> None:
        self.metrics.reconcile_errors.labels("watch:" + kind, type(exc).__name__).inc()

    # -- event handlers: cheap, they only bump the cache generation and enqueue keys ---------------
    def _bump(self, spec: bool = True) -> None:
        with self._gen_lock:
            self._gen += 1
            if spec:
                self._spec_gen += 1

    def _enqueue_all(self) -> None:
        for md in self.informers["ModelDeployment"].items():
            self.queue.add(MD + convert.deployment_key(md["metadata"]["namespace"], md["metadata"]["name"]))
        for pool in self.informers["AcceleratorPool"].items():
            self.queue.add(POOL + pool["metadata"]["name"])
        for pd in self.informers["PowerDomain"].items():
            self.queue.add(PD + pd["metadata"]["name"])
        self.queue.add(FLEET)  # the fleet is re-planned (and its State saved) even when no deployment is left

    def _on_fleet_object(self, kind: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        if new is not None and old is not None and new["metadata"].get("generation") == old["metadata"].get(
                "generation"):
            return  # a status-only update (ours): nothing a policy reads changed
        self._bump()
        self._enqueue_all()

    def _on_md(self, kind: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        obj = new or old
        assert obj is not None
        if new is not None and old is not None:
            same = (new["metadata"].get("generation") == old["metadata"].get("generation")
                    and new["metadata"].get("deletionTimestamp") == old["metadata"].get("deletionTimestamp"))
            if same:
                return  # status or finalizer write: the spec did not change
        self._bump()
        self.queue.add(MD + convert.deployment_key(obj["metadata"]["namespace"], obj["metadata"]["name"]))

    def _on_node(self, kind: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        if new is not None and old is not None and _node_fingerprint(new) == _node_fingerprint(old):
            return  # heartbeats
        self._bump()
        self._enqueue_all()

    def _on_owned(self, kind: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        obj = new or old
        assert obj is not None
        if new is None or old is None or _plan_input(new) != _plan_input(old):
            self._bump(spec=False)  # readiness alone changes status, not the plan: no need to re-plan
        owner = owner_key(obj)
        if owner is None:
            name = (obj["metadata"].get("labels") or {}).get(r.L_DEPLOYMENT)
            if name:
                owner = convert.deployment_key(obj["metadata"]["namespace"], name)
        if owner is not None:
            self.queue.add(MD + owner)
        if obj["kind"] == "Pod":  # pool status counts allocated devices: refresh it, at most once a second
            for pool in self.informers["AcceleratorPool"].items():
                self.queue.add_after(POOL + pool["metadata"]["name"], POOL_STATUS_DELAY_S)

    def _rescheduling_on(self) -> bool:
        return self.fleet_policy().spec.policies.rescheduling

    def _on_cluster_pod(self, kind: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        """A GPU pod appeared, moved, became unschedulable or left: the rescheduler's input changed, and
        for another workload's pod so did the devices placement may use (the snapshot's foreign pods)."""
        obj = new or old
        assert obj is not None
        if not gpus_of(obj):
            return
        if new is not None and old is not None and _reschedule_input(new) == _reschedule_input(old):
            return
        ours = (obj["metadata"].get("labels") or {}).get(r.MANAGED_BY) == r.MANAGED_BY_VALUE
        # pool status counts every pod's devices from this cache (other workloads' too): refresh it
        for pool in self.informers["AcceleratorPool"].items():
            self.queue.add_after(POOL + pool["metadata"]["name"], POOL_STATUS_DELAY_S)
        if ours and not self._rescheduling_on():
            return  # our own pods reach the plan through _on_owned
        self._bump(spec=False)
        self.queue.add_after(FLEET, REPLAN_INTERVAL_S)

    def _on_budget(self, kind: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        allowed = [((o or {}).get("status") or {}).get("disruptionsAllowed") for o in (new, old)]
        if (new is None or old is None or allowed[0] != allowed[1]) and self._rescheduling_on():
            self._bump(spec=False)
            self.queue.add_after(FLEET, REPLAN_INTERVAL_S)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, sync_timeout_s: float = 60.0) -> None:
        for i in self.informers.values():
            i.start()
        deadline = time.monotonic() + sync_timeout_s
        for i in self.informers.values():
            if not i.synced.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"cache of {i.kind} did not sync within {sync_timeout_s}s")
        self._enqueue_all()
        self.queue.add(FLEET)  # plan once at start even with no ModelDeployment (rescheduling acts on any pod)
        if not self.dry_run:
            self._lift_stale_fences()
        for n in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"worker-{n}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._resync, name="resync", daemon=True)
        t.start()
        self._threads.append(t)

    def _lift_stale_fences(self) -> None:
        """A predecessor killed mid-migration leaves its node fence (a cordon) up, and only a new batch of
        moves would lift it; if no move is needed any more the node stays cordoned for good. On taking
        over no batch of ours is under way, so any fence still standing is a dead run's."""
        from kubernetes import client as k8s

        from controller.executor.evictions import lift_stale_fences

        try:
            for node in lift_stale_fences(k8s.CoreV1Api(self.kube.api)):
                log.warning("lifted a stale migration fence (cordon) from node %s", node)
        except Exception as exc:  # best effort: the next batch of moves tries again
            log.warning("lifting stale migration fences failed: %s", exc)

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers.values())

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful: workers finish their current key, watches close."""
        self.stop_event.set()
        self.queue.shutdown()
        for i in self.informers.values():
            i.stop()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _resync(self) -> None:
        while not self.stop_event.wait(self.resync_period()):
            self._bump()
            self._enqueue_all()

    def resync_period(self) -> float:
        if self.resync_override is not None:
            return self.resync_override
        return self.fleet_policy().spec.reconcile_period_s

    def fleet_policy(self) -> api.FleetPolicy:
        obj = self.informers["FleetPolicy"].store.get("default")
        if obj is None:
            return api.FleetPolicy(metadata={"name": "default"})
        try:
            return api.FleetPolicy.model_validate(obj)
        except ValidationError:
            return api.FleetPolicy(metadata={"name": "default"})

    def _worker(self) -> None:
        while True:
            try:
                key = self.queue.get()
            except ShutDown:
                return
            if key is None:
                continue
            kind = key.split(":", 1)[0]
            start = time.perf_counter()
            try:
                requeue = self.reconcile(key)
                self.queue.forget(key)
                if requeue:
                    self.queue.add_after(key, requeue)
                self.metrics.reconciles.labels(kind, "success").inc()
            except Exception as exc:  # error = retry with backoff
                delay = self.queue.add_rate_limited(key)
                self.metrics.reconciles.labels(kind, "error").inc()
                self.metrics.reconcile_errors.labels(kind, type(exc).__name__).inc()
                log.warning("reconcile %s failed (%s); retry in %.2fs", key, exc, delay)
            finally:
                self.reconcile_count += 1
                self.metrics.reconcile_seconds.labels(kind).observe(time.perf_counter() - start)
                self.queue.done(key)
                self.metrics.queue_depth.set(self.queue.depth())

    # -- passive sync: caches -> snapshot -> plans (memoised per cache generation) --------------------
    def owned_by(self) -> dict[str, list[dict[str, Any]]]:
        return group_by_owner([*self.informers["Deployment"].items(), *self.informers["Pod"].items()])

    def fleet(self) -> tuple[Built, list[Plan], dict[str, list[dict[str, Any]]], float]:
        """Snapshot and plans for the current caches, plus how stale they may be (seconds, 0 if fresh).

        Re-planning on every owned-object event would serialise all workers behind the planner during
        a rollout, so a plan is reused for up to ``REPLAN_INTERVAL_S`` while only workload objects
        changed; a change of intent (a spec, pool, node or the FleetPolicy) always re-plans. A caller
        given a stale plan schedules one re-plan (key ``fleet:``) for when the interval is over; the
        fresh plan enqueues every deployment it gives work, so nothing is left unplanned.
        """
        with self._plan_lock:
            gen, spec_gen, now = self._gen, self._spec_gen, time.monotonic()
            owned = self.owned_by()
            if self._memo is not None and self._memo[0] == spec_gen:
                age = now - self._memo[2]
                if self._memo[1] == gen:
                    return self._memo[3], self._memo[4], owned, 0.0
                if age < REPLAN_INTERVAL_S:
                    return self._memo[3], self._memo[4], owned, REPLAN_INTERVAL_S - age
            gpus, serving = self.telemetry() if self.telemetry is not None else ((), ())
            built = build_snapshot(
                gpu_telemetry=gpus,
                serving=serving,
                pools=self.informers["AcceleratorPool"].items(),
                power_domains=self.informers["PowerDomain"].items(),
                deployments=self.informers["ModelDeployment"].items(),
                nodes=self.informers["Node"].items(),
                owned=owned,
                now=time.time(),
                cluster_pods=self.informers["ClusterPod"].items(),
            )
            fleet = self.fleet_policy()
            spec = fleet.spec
            if self._pipeline_state is None:
                self._pipeline_state = restore_state(fleet)
            pods, budgets = self.informers["ClusterPod"].items(), self.informers["PodDisruptionBudget"].items()
            outcome = run_pipeline(built.snapshot, spec.policies, spec.solver_time_limits, self._pipeline_state,
                                   spec.disruption, lambda s: with_cluster_pods(s, pods, budgets))
            plans, self._pipeline_state = outcome.plans, outcome.state
            for note in outcome.notes:
                log.warning("policy pipeline: %s", note)
            dry = self.dry_run or spec.dry_run
            deferred: set[str] = set()
            for plan in plans:  # node-level actions (caps, routing) once per distinct plan
                if plan.id not in self._applied_node_plans:
                    for done in self.executor.apply_node_actions(plan, dry_run=dry):
                        log.info("%s%s", "dry-run: " if dry else "", done)
                    if any(isinstance(a, SetRoutingShare) for a in plan.actions):
                        self._routing_pushed_at = time.monotonic()
                    if not self._start_migrations(plan, spec.disruption, dry):
                        deferred.add(plan.id)  # moves not started (a batch under way): try again later
            self._applied_node_plans = {p.id for p in plans} - deferred
            if fleet.metadata.get("resourceVersion") and now - self._state_saved >= spec.reconcile_period_s:
                self._save_state(outcome.state)
                self._state_saved = now
            for plan in plans:
                self.metrics.solver_seconds.labels(plan.policy.value).observe(plan.explanation.solve_ms / 1000)
                self.metrics.solver_status.labels(plan.policy.value, plan.explanation.solver_status.value).inc()
                for action in plan.actions:  # level-triggered fan-out: whoever has work gets a pass
                    if isinstance(action, SetReplicas):
                        self.queue.add(MD + action.deployment)
            self._memo = (spec_gen, gen, now, built, plans)
            return built, plans, owned, 0.0

    def _start_migrations(self, plan: Plan, limits: api.DisruptionLimits, dry_run: bool) -> bool:
        """Run the rescheduler's moves (Eviction API with PDBs honoured, serving replicas drained first,
        KubeVirt VMs live-migrated; MNL and concurrency from the FleetPolicy) on a thread of their own:
        waiting for moves to finish must not hold the planner's lock. The plan, its explanation and each
        move's outcome go to the FleetPolicy status. One batch at a time, and the next only after the
        scheduler had ``MIGRATION_SETTLE_S`` to place the replacements (a plan made while pods are
        between nodes would chase its own moves). Returns False when the moves were not started."""
        if plan.policy is PolicyName.RESCHEDULE:
            log.info("rescheduling plan %s: %s", plan.id, plan.explanation.summary)
        moves = [a for a in plan.actions if isinstance(a, MigratePod)]
        if not moves:
            return True
        now = time.monotonic()
        busy = self._migrations is not None and self._migrations.is_alive()
        if not dry_run and (busy or now - self._migrations_done < MIGRATION_SETTLE_S):
            wait = MIGRATION_SETTLE_S if busy else MIGRATION_SETTLE_S - (now - self._migrations_done)
            self.queue.add_after(FLEET, wait + 0.05)
            return False
        if not dry_run:  # the per-cycle limit, kept in the cluster: a restarted controller sees what was spent
            granted = self._reserve_migrations(moves, limits.max_migrations_per_cycle)
            if not granted:
                return False
            moves = moves[:granted]
        from kubernetes import client as k8s

        from controller.executor.evictions import (
            MigrationLimits,
            NodeFence,
            ServingDrain,
            apply_migrations,
            lift_stale_fences,
        )

        self._write_reschedule_status(plan, {}, dry_run)
        core = k8s.CoreV1Api(self.kube.api)
        drain = ServingDrain(core, k8s.DiscoveryV1Api(self.kube.api), drain_s=self.drain_s)
        fence = None if dry_run else NodeFence(core)

        def run() -> None:
            try:
                if not dry_run:  # no batch is under way: a fence still standing is a crashed run's
                    for node in lift_stale_fences(core):
                        log.warning("lifted a stale migration fence (cordon) from node %s", node)
                report = apply_migrations(core, moves, MigrationLimits(limits.max_migrations_per_cycle,
                                                                       max(limits.max_concurrent, 1)),
                                          dry_run=dry_run, drain=drain, fence=fence)
                for pod, outcome in report.outcomes.items():
                    log.info("migration %s: %s %s", pod, outcome.value, report.messages.get(pod, ""))
                self._write_reschedule_status(plan, {p: (o.value, report.messages.get(p, ""))
                                                     for p, o in report.outcomes.items()}, dry_run)
            except Exception:
                log.exception("migrations of plan %s failed", plan.id)
            finally:
                if not dry_run:
                    self._migrations_done = time.monotonic()
                    self._bump(spec=False)
                    self.queue.add_after(FLEET, MIGRATION_SETTLE_S + 0.05)

        thread = threading.Thread(target=run, name=f"migrations-{plan.id}", daemon=True)
        if not dry_run:
            self._migrations = thread
        thread.start()
        return True

    def _reserve_migrations(self, moves: list[MigratePod], limit: int) -> int:
        """How many of ``moves`` this cycle's durable budget grants (reserved before any is made); when
        it grants fewer, a re-plan is scheduled for the end of the cycle."""
        from controller.executor.migration_budget import MigrationBudget

        budget = MigrationBudget(self.kube)
        window = self.fleet_policy().spec.reconcile_period_s
        granted = budget.reserve([m.pod for m in moves], limit, window)
        if granted < len(moves):
            try:
                left = budget.used(window)[1]
            except KubeError:
                left = window
            log.info("migration limit %d per %.0f s cycle: %d of %d moves granted; next cycle in %.1f s", limit,
                     window, granted, len(moves), left)
            self.queue.add_after(FLEET, max(left, 1.0) + 0.05)
        return granted

    def _write_reschedule_status(self, plan: Plan, outcomes: Mapping[str, tuple[str, str]], dry_run: bool) -> None:
        """The rescheduling plan with its explanation, and each move's outcome so far, in the FleetPolicy status."""
        if self.informers["FleetPolicy"].store.get("default") is None:
            log.info("rescheduling plan %s: %s (no FleetPolicy to record it in)", plan.id, plan.explanation.summary)
            return
        e = plan.explanation
        records = [api.MigrationRecord(pod=a.pod, from_node=a.from_node, to_node=a.to_node,
                                       outcome=outcomes.get(a.pod, ("Planned", ""))[0],
                                       message=outcomes.get(a.pod, ("", ""))[1][:500])
                   for a in plan.actions if isinstance(a, MigratePod)][:128]
        decision = api.RescheduleDecision(plan_id=plan.id, policy=plan.policy.value, reason=e.reason.value,
                                          summary=e.summary[:1000], objective=e.objective, bound=e.bound,
                                          solver_status=e.solver_status.value, solve_ms=e.solve_ms,
                                          fallback=e.fallback, time=iso_now(time.time()), dry_run=dry_run,
                                          migrations=records)
        try:
            self.kube.patch("FleetPolicy", "default", {"status": {"lastReschedule": wire(decision)}},
                            subresource="status")
        except KubeError as exc:
            log.warning("recording rescheduling plan %s failed: %s", plan.id, exc)

    def _save_state(self, state: PipelineState) -> None:
        """Persist the pipeline State (and who leads) in the FleetPolicy status; best effort."""
        status = {"leader": self.identity, "lastCycle": iso_now(time.time()),
                  "pipelineState": state.model_dump(mode="json")}
        current = self.informers["FleetPolicy"].store.get("default") or {}
        try:
            if "status" in current:  # replace, not merge: a merge patch keeps keys the State has dropped
                ops = [{"op": "add", "path": f"/status/{k}", "value": v} for k, v in status.items()]
                self.kube.patch("FleetPolicy", "default", ops, subresource="status",
                                content_type="application/json-patch+json")
            else:
                self.kube.patch("FleetPolicy", "default", {"status": status}, subresource="status")
        except KubeError as exc:
            log.warning("saving pipeline state failed: %s", exc)

    # -- one pass ----------------------------------------------------------------------------------------
    def reconcile(self, key: str) -> float | None:
        """Returns a delay after which to look again, or None."""
        if key.startswith(POOL):
            self.reconcile_pool(key[len(POOL):])
            return None
        if key == FLEET:
            _, plans, _, stale_s = self.fleet()
            refresh_s = self._refresh_routing(plans)
            waits = [w for w in (stale_s + 0.05 if stale_s else None, refresh_s) if w is not None]
            return min(waits) if waits else None
        if key.startswith(PD):
            return self.reconcile_power_domain(key[len(PD):])
        return self.reconcile_deployment(key[len(MD):])

    def _refresh_routing(self, plans: list[Plan]) -> float | None:
        """Re-push the routing shares in force before the router's table expires; returns when to look again."""
        shares = tuple(a for p in plans for a in p.actions if isinstance(a, SetRoutingShare))
        if not shares or self.executor.router is None:
            return None
        now = time.monotonic()
        due = self._routing_pushed_at + ROUTING_REFRESH_S - now
        if due > 0:
            return due
        self._routing_pushed_at = now
        if not (self.dry_run or self.fleet_policy().spec.dry_run):
            for action in shares:
                try:
                    self.executor.router.set_routing_share(action)
                except Exception as exc:  # the router is down: its table expires to "large only", say so
                    log.warning("re-pushing the routing share of %s failed: %s", action.deployment, exc)
        return ROUTING_REFRESH_S

    def reconcile_power_domain(self, name: str) -> float | None:
        """Write the domain's status from observed facts, then look again in POWER_STATUS_PERIOD_S.

        With the power policy on and a hub running, fresh telemetry counts as a change of what the
        snapshot reads, so the fleet re-plans (at most every REPLAN_INTERVAL_S) and new caps reach the
        agents on this cadence rather than only on the resync period.
        """
        obj = self.informers["PowerDomain"].get(name)
        if obj is None:
            self._draw_windows.pop(name, None)
            return None
        try:
            pd = api.PowerDomain.model_validate(obj)
        except ValidationError:
            return None  # the snapshot builder reports bad input; nothing to observe against
        if self.power is not None and self.fleet_policy().spec.policies.power:
            self._bump(spec=False)
        built, plans, _, _ = self.fleet()
        nodes = next((d.nodes for d in built.snapshot.power_domains if d.name == name), ())
        readings = self.power() if self.power is not None else PowerReadings(nodes={}, caps=())
        window = merge_window(self._draw_windows.get(name, {}), domain_draws(readings, nodes))
        self._draw_windows[name] = window
        now = iso_now(time.time())
        last = power_plan_summary(plans, name, set(nodes), pd.status.last_plan if pd.status else None, now)
        new = wire(power_domain_status(pd, nodes, readings, window, last, now))
        old = wire(pd.status) if pd.status else {}
        if new != old:
            self.kube.patch("PowerDomain", name, {"status": new}, subresource="status")
        self._send_node_shares(pd, nodes, readings)
        return POWER_STATUS_PERIOD_S

    def _send_node_shares(self, pd: api.PowerDomain, nodes: Sequence[str], readings: PowerReadings) -> None:
        """Hand each node its share of the domain budget, so its agent's guard holds the budget while
        the controller is away (``policies.power.node_shares``, the rule the simulator's guard uses too:
        latest draw, highest draw in the hub's ring buffer, guard holding it, devices' max limits);
        only with the power policy on."""
        send = getattr(self.executor.agents, "set_node_shares", None)
        spec = self.fleet_policy().spec
        if send is None or not nodes or self.dry_run or spec.dry_run or not spec.policies.power:
            return
        draws: dict[str, float | None] = {}
        peaks: dict[str, float] = {}
        highs: dict[str, float] = {}
        held: set[str] = set()
        for n in nodes:
            seen = readings.nodes.get(n)
            fresh = seen is not None and seen.fresh and bool(seen.draws)
            draws[n] = seen.draws[-1][1] if seen is not None and fresh else None
            peaks[n] = sum(max_w for _, _, max_w in seen.limits) if seen is not None else 0.0
            if seen is not None and fresh:
                highs[n] = max(w for _, w in seen.draws)
                if seen.guard_active:
                    held.add(n)
        shares = node_shares(pd.spec.budget_w, draws, peaks, highs=highs, held=held)
        if not shares:
            return
        with_basis = getattr(self.executor.agents, "set_domain_shares", None)
        if with_basis is not None:  # the domain and budget go along: agents scale down on a later, lower budget
            with_basis(str(pd.metadata.get("name", "")), pd.spec.budget_w, shares)
        else:
            send(shares)

    def reconcile_pool(self, name: str) -> None:
        obj = self.informers["AcceleratorPool"].get(name)
        if obj is None:
            return
        pool = api.AcceleratorPool.model_validate(obj)
        nodes = [n for n in self.informers["Node"].items()
                 if convert.selector_matches(pool.spec.node_selector, n["metadata"].get("labels") or {})]
        names = {n["metadata"]["name"] for n in nodes}
        ours = OurReplicas.of(convert.deployment_key(o["metadata"].get("namespace", "default"), o["metadata"]["name"])
                              for o in self.informers["ModelDeployment"].items())
        allocated: dict[str, int] = {}
        foreign: dict[str, int] = {}
        # every pod's devices, from the cluster-wide cache: other workloads' GPUs are not free either
        for pod in self.informers["ClusterPod"].items():
            node, gpus = held_devices(pod)
            if node is None or node not in names:
                continue
            allocated[node] = allocated.get(node, 0) + gpus
            if not ours.claims(pod):
                foreign[node] = foreign.get(node, 0) + gpus
        new = wire(pool_status(pool, nodes, allocated, foreign))
        old = wire(pool.status) if pool.status else {}
        if new != old:
            self.kube.patch("AcceleratorPool", name, {"status": new}, subresource="status")

    def reconcile_deployment(self, key: str) -> float | None:
        ns, name = key.split("/", 1)
        obj = self.informers["ModelDeployment"].get(key)
        if obj is None:
            return None  # gone: owner references let the garbage collector finish
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            self._finalize(ns, name, obj)
            return None
        if FINALIZER not in (meta.get("finalizers") or []):
            self.kube.patch("ModelDeployment", name, {"metadata": {
                "finalizers": [*(meta.get("finalizers") or []), FINALIZER],
                "resourceVersion": meta["resourceVersion"]}}, ns)
        built, plans, owned, stale_s = self.fleet()
        wall = time.time()
        if key in built.invalid:
            self._write_status_invalid(obj, built.invalid[key], wall)
            return None
        md = built.deployments.get(key)
        if md is None:
            return None
        objects = owned.get(key, [])
        placement = next(p for p in plans if p.policy is PolicyName.PLACEMENT)
        fleet = self.fleet_policy()
        budget = DisruptionBudget(fleet.spec.disruption.max_replica_removals_per_cycle)
        dry = self.dry_run or fleet.spec.dry_run
        observed = observe(objects)
        current = {p: observed[r.short(p)].replicas if r.short(p) in observed else 0 for p in built.pools}
        desired = current
        for plan in plans:
            desired = desired_from_plan(plan, key, desired)
        result = self.executor.apply_plan(plans, md, key, built.pools, objects, budget, dry_run=dry)
        for change in result.changes:
            self.metrics.writes.labels(change.op, change.kind).inc()
        problem = self._problem(md, key, built, plans)
        mine = [a for a in placement.actions if isinstance(a, SetReplicas) and a.deployment == key]
        decision = None
        last = md.status.last_decision if md.status else None
        if mine and (last is None or last.plan_id != placement.id):  # a plan is announced once
            what = ", ".join(f"{a.pool} {a.previous}->{a.replicas}" for a in mine)
            e = placement.explanation
            decision = api.Decision(plan_id=placement.id, policy=placement.policy.value, reason=e.reason.value,
                                    summary=f"{what}: {e.summary}"[:1000], objective=e.objective,
                                    solver_status=e.solver_status.value, solve_ms=e.solve_ms, fallback=e.fallback,
                                    time=iso_now(wall))
        for pool, n in desired.items():
            self.metrics.replicas.labels(ns, name, pool).set(n)
        nodes = {str(p["spec"].get("nodeName")) for p in self.informers["Pod"].items()
                 if p["metadata"]["namespace"] == ns and (p["metadata"].get("labels") or {}).get(r.L_DEPLOYMENT)
                 == r.short(name) and p["spec"].get("nodeName")}
        status = deployment_status(md, {p: n for p, n in desired.items() if n}, observed, built.pools, problem,
                                   decision, iso_now(wall), effects_of(plans, key, nodes, md.status),
                                   kept_waiting=result.kept_waiting)
        changes = "; ".join(str(c) for c in result.changes)
        if result.kept_waiting and not dry and not _keeping(md.status):  # announced once per wait
            self.event(obj, "Normal", KEEPING_OLD_REPLICAS,
                       f"{result.kept_waiting} old ready replica(s) keep serving until their replacements are Ready")
        fault_point("reconcile.before_status")
        self._write_status(obj, md, status, problem, decision, dry, changes)
        if stale_s:  # one deferred re-plan for everybody, not one requeue per deployment
            self.queue.add_after(FLEET, stale_s + 0.05)
        return 2.0 if result.limited else None

    def _problem(self, md: api.ModelDeployment, key: str, built: Built, plans: list[Plan]) -> Problem | None:
        ns = md.metadata["namespace"]
        if md.spec.fallback is not None:
            fb = convert.deployment_key(ns, md.spec.fallback.deployment)
            if fb not in built.deployments:
                return Problem("UnknownFallback", f"fallback ModelDeployment {fb} does not exist")
        allowed = md.spec.allowed_pools
        if not built.pools or (allowed and not set(allowed) & set(built.pools)):
            wanted = ", ".join(allowed) if allowed else "any"
            return Problem("NoAllowedPool", f"no AcceleratorPool matches the allowed pools ({wanted})")
        short = shortfall(built.snapshot, plans, key)
        if short:
            devices = md.spec.parallelism.tp * md.spec.parallelism.pp
            return Problem("InsufficientCapacity",
                           f"{short} of {md.spec.min_replicas} minimum replicas ({devices} GPUs each) do not fit "
                           f"in any allowed pool")
        return None

    def _write_status(self, obj: dict[str, Any], md: api.ModelDeployment, status: api.ModelDeploymentStatus,
                      problem: Problem | None, decision: api.Decision | None, dry: bool, changes: str) -> None:
        meta = obj["metadata"]
        new = wire(status)
        old = wire(api.ModelDeploymentStatus.model_validate(obj["status"])) if obj.get("status") else {}
        if new == old:
            return
        self.kube.patch("ModelDeployment", meta["name"], {"status": new}, meta["namespace"], subresource="status")
        prev_problem = next((c for c in (md.status.conditions if md.status else [])
                             if c.type == api.ConditionType.DEGRADED and c.status == "True"), None)
        if problem is not None and (prev_problem is None or prev_problem.reason != problem.reason):
            self.event(obj, "Warning", problem.reason, problem.message)
        if decision is not None:
            if dry:  # dry-run: the event carries the diff the executor would have applied
                self.event(obj, "Normal", "DryRun", f"{decision.summary} | would: {changes or 'nothing'}")
            else:
                self.event(obj, "Normal", "Scaled", decision.summary)

    def _write_status_invalid(self, obj: dict[str, Any], why: str, wall: float) -> None:
        meta = obj["metadata"]
        prev = [c for c in (obj.get("status") or {}).get("conditions") or []
                if c.get("type") == "Degraded" and c.get("status") == "True" and c.get("reason") == "BadInput"]
        if prev and prev[0].get("message") == why:
            return
        cond = {"type": "Degraded", "status": "True", "reason": "BadInput", "message": why[:1000],
                "lastTransitionTime": iso_now(wall)}
        self.kube.patch("ModelDeployment", meta["name"], {"status": {"conditions": [cond]}}, meta["namespace"],
                        subresource="status")
        self.event(obj, "Warning", "BadInput", why)

    def _finalize(self, ns: str, name: str, obj: dict[str, Any]) -> None:
        """Delete what we created for it, then let it go."""
        finalizers = obj["metadata"].get("finalizers") or []
        if FINALIZER not in finalizers:
            return
        self.executor.cluster.delete_all(ns, f"{MANAGED_SELECTOR},{r.L_DEPLOYMENT}={r.short(name)}")
        self.kube.patch("ModelDeployment", name, {"metadata": {
            "finalizers": [f for f in finalizers if f != FINALIZER],
            "resourceVersion": obj["metadata"]["resourceVersion"]}}, ns)
        self.metrics.forget_deployment(ns, name)
        self._bump()

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = iso_now(time.time())
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": api.API_VERSION, "kind": obj.get("kind", "ModelDeployment"),
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message[:1024], "type": type_,
            "source": {"component": "wattplane-controller"},
            "reportingComponent": "wattplane.io/controller", "reportingInstance": self.identity[:128],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.kube.create("Event", body, meta["namespace"])
        except KubeError as exc:
            log.warning("event %s for %s/%s not recorded: %s", reason, meta["namespace"], meta["name"], exc)
