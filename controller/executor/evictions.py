"""Migrations (``MigratePod``) actuated through the Eviction API, or KubeVirt live migration for VMs.

Why evictions and not deletes: the API server checks PodDisruptionBudgets on an eviction and
answers 429 when it would break one, so a budget is honoured even if our snapshot was stale.
Order, and why: (1) enforce the plan's migration limit (MNL) centrally, before anything happens;
(2) re-check the precondition (the pod still runs where the plan assumed); (3) drain — take a
serving replica out of its Service's endpoints (:class:`ServingDrain`) and wait a bounded time —
so in-flight requests finish and no new ones arrive; (4) fence the node the pod leaves (cordon it, when it was
not cordoned already) so the replacement cannot land back there, then evict (a blocked eviction
puts the pod back in service and lifts the fence); (5) keep at most ``max_concurrent`` moves in
flight (evicted pods still terminating, VM migrations running) before the next one; (6) lift a
node's fence once the pod is gone and its owner's replacement has a node (or when the batch ends:
a replacement that waits for a later move of the same plan must not stall the batch).
A pod owned by a KubeVirt ``VirtualMachineInstance`` is not evicted: a
``VirtualMachineInstanceMigration`` live-migrates the VM (:mod:`controller.executor.vm_migrations`)
and counts against the same concurrency.
The replacement of an evicted pod is created by its owner and placed by the scheduler; with the
bin-packing scoring GPU clusters use (NodeResourcesFit MostAllocated on ``nvidia.com/gpu``) it
lands on the fuller node, which is the rescheduler's target. Why the fence: the owner creates the
replacement while the evicted pod is still terminating, so its old node still looks as full as
the target and the scheduler may put it straight back. A pod that landed elsewhere than planned
is reported, never chased. Dry-run returns what would be done and does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any

from controller.api.convert import FENCE_ANNOTATION
from controller.executor import render as r
from controller.executor import vm_migrations as vmm
from controller.faults import fault_point
from policies.plan import MigratePod

SERVING_LABEL = r.L_SERVING  # the model's Service selects "true"; a drain sets "false"

# drain(action) takes the pod out of service; it returns how to put it back (when the move fails)
Drain = Callable[[MigratePod], Callable[[], None] | None]


class MigrationOutcome(StrEnum):
    EVICTED = "Evicted"
    MIGRATED = "Migrated"  # a VM's live migration Succeeded
    BLOCKED_BY_PDB = "BlockedByPDB"  # 429 from the Eviction API
    GONE = "Gone"  # the pod no longer exists (404): nothing to do
    OVER_LIMIT = "OverLimit"  # beyond the plan's migration limit: not attempted
    DRY_RUN = "DryRun"
    FAILED = "Failed"


class MigrationLimitExceeded(ValueError):
    """A plan asked for more migrations than the limit allows; the excess is refused, not trimmed silently."""


@dataclass(frozen=True)
class MigrationLimits:
    max_migrations: int = 10  # MNL per plan
    max_concurrent: int = 2  # moves in flight at once (evicted pods still terminating, VM migrations running)
    wait_timeout_s: float = 60.0
    vm_migration_timeout_s: float = 300.0  # a VM migration not finished by then is cancelled (Failed)


@dataclass
class MigrationReport:
    outcomes: dict[str, MigrationOutcome] = field(default_factory=dict)  # "ns/name" -> outcome
    messages: dict[str, str] = field(default_factory=dict)

    @property
    def evicted(self) -> int:
        return sum(1 for o in self.outcomes.values() if o is MigrationOutcome.EVICTED)


def _split(key: str) -> tuple[str, str]:
    ns, sep, name = key.partition("/")
    return (ns, name) if sep else ("default", key)


class _InFlight:
    """One move still under way: an evicted pod that still exists, or a VM migration not finished."""

    def __init__(self, key: str, done: Callable[[], bool], on_done: Callable[[], None] | None = None) -> None:
        self.key = key
        self._done = done
        self.on_done = on_done

    def done(self) -> bool:
        if not self._done():
            return False
        if self.on_done is not None:
            self.on_done()
            self.on_done = None
        return True


class NodeFence:
    """Cordon the node a pod is leaving while its replacement is scheduled; lift it afterwards.

    Only nodes this fence cordoned are uncordoned (an operator's cordon stays). The annotation marks
    our cordons so :func:`lift_stale_fences` can lift them after a crash.
    """

    def __init__(self, core: Any) -> None:
        self.core = core
        self.held: dict[str, tuple[int, bool]] = {}  # node -> (moves holding it, cordoned by us)

    def hold(self, node: str) -> None:
        count, ours = self.held.get(node, (0, False))
        if count == 0:
            ours = not self.core.read_node(node).spec.unschedulable
            if ours:
                self.core.patch_node(node, {"metadata": {"annotations": {FENCE_ANNOTATION: "true"}},
                                            "spec": {"unschedulable": True}})
        self.held[node] = (count + 1, ours)

    def release(self, node: str) -> None:
        count, ours = self.held.get(node, (0, False))
        if count <= 1:
            self.held.pop(node, None)
            if ours:
                self.core.patch_node(node, {"metadata": {"annotations": {FENCE_ANNOTATION: None}},
                                            "spec": {"unschedulable": False}})
        else:
            self.held[node] = (count - 1, ours)

    def release_all(self) -> None:
        """Lift every fence still held (moves that timed out): a fence never outlives its batch."""
        for node in list(self.held):
            self.held[node] = (1, self.held[node][1])
            self.release(node)


def lift_stale_fences(core: Any) -> list[str]:
    """Uncordon nodes a previous (crashed) run fenced; call only when no batch of moves is under way."""
    lifted = []
    for node in core.list_node().items:
        if (node.metadata.annotations or {}).get(FENCE_ANNOTATION):
            core.patch_node(node.metadata.name, {"metadata": {"annotations": {FENCE_ANNOTATION: None}},
                                                 "spec": {"unschedulable": False}})
            lifted.append(node.metadata.name)
    return lifted


def apply_migrations(
    core: Any,  # kubernetes.client.CoreV1Api
    actions: Sequence[MigratePod],
    limits: MigrationLimits,
    *,
    dry_run: bool = False,
    drain: Drain | None = None,
    custom: Any = None,  # kubernetes.client.CustomObjectsApi, for VM migrations (made from core when needed)
    fence: NodeFence | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> MigrationReport:
    """Move the pods of ``actions`` in order (the rescheduler's executable order); wait for the last ones."""
    from kubernetes import client

    report = MigrationReport()
    for extra in actions[limits.max_migrations:]:
        report.outcomes[extra.pod] = MigrationOutcome.OVER_LIMIT
        report.messages[extra.pod] = f"plan exceeds the migration limit {limits.max_migrations}"
    in_flight: list[_InFlight] = []
    fenced: list[_InFlight] = []  # moves whose node stays fenced until the replacement has a node
    vms: list[vmm.VMMigration] = []
    for action in actions[: limits.max_migrations]:
        ns, name = _split(action.pod)
        if dry_run:
            report.outcomes[action.pod] = MigrationOutcome.DRY_RUN
            report.messages[action.pod] = f"would move {action.pod} from {action.from_node} (target {action.to_node})"
            continue
        _wait_in_flight(in_flight, limits.max_concurrent - 1, limits.wait_timeout_s, sleep, clock, fenced)
        undo: Callable[[], None] | None = None
        try:
            pod = core.read_namespaced_pod(name, ns)
            if pod.spec.node_name != action.from_node:
                report.outcomes[action.pod] = MigrationOutcome.FAILED
                report.messages[action.pod] = (
                    f"precondition failed: {action.pod} runs on {pod.spec.node_name}, plan assumed {action.from_node}"
                )
                continue
            vmi = vmm.owning_vmi(pod)
            if vmi is not None:
                custom = custom if custom is not None else client.CustomObjectsApi(core.api_client)
                started = vmm.start_migration(custom, ns, vmi, action.pod)
                vms.append(started)
                in_flight.append(_InFlight(action.pod, partial(vmm.finished, custom, started, clock,
                                                               limits.vm_migration_timeout_s)))
                continue
            if drain is not None and action.deployment is not None:
                undo = drain(action)
            if fence is not None:
                fence.hold(action.from_node)
                undo = _both(undo, partial(fence.release, action.from_node))
            body = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=ns))
            core.create_namespaced_pod_eviction(name, ns, body)
        except client.ApiException as exc:
            if exc.status == 429:
                report.outcomes[action.pod] = MigrationOutcome.BLOCKED_BY_PDB
                report.messages[action.pod] = "eviction would violate a PodDisruptionBudget"
            elif exc.status == 404:
                report.outcomes[action.pod] = MigrationOutcome.GONE
            else:
                report.outcomes[action.pod] = MigrationOutcome.FAILED
                report.messages[action.pod] = f"move failed: {exc.status} {exc.reason}"
            if undo is not None:
                undo()  # still running where it was: back in service
            continue
        report.outcomes[action.pod] = MigrationOutcome.EVICTED
        in_flight.append(_InFlight(action.pod, partial(_pod_gone, core, ns, name, pod.metadata.uid)))
        if fence is not None:
            fenced.append(_InFlight(action.pod, partial(_moved, core, ns, name, pod),
                                    partial(fence.release, action.from_node)))
        fault_point("migration.after_evict")
    _wait_in_flight(fenced, 0, limits.wait_timeout_s, sleep, clock)
    _wait_in_flight(in_flight, 0, max(limits.wait_timeout_s, limits.vm_migration_timeout_s if vms else 0.0),
                    sleep, clock)
    if fence is not None:
        fence.release_all()
    for m in vms:
        report.outcomes[m.pod] = MigrationOutcome.MIGRATED if m.phase == vmm.SUCCEEDED else MigrationOutcome.FAILED
        report.messages[m.pod] = m.message
    return report


def _both(first: Callable[[], None] | None, second: Callable[[], None]) -> Callable[[], None]:
    def undo() -> None:
        if first is not None:
            first()
        second()
    return undo


def _pod_gone(core: Any, ns: str, name: str, uid: str) -> bool:
    from kubernetes import client

    try:
        return bool(core.read_namespaced_pod(name, ns).metadata.uid != uid)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        return True


def _moved(core: Any, ns: str, name: str, pod: Any) -> bool:
    """The evicted pod is gone and no pod of its owner waits for a node (the replacement was placed)."""

    if not _pod_gone(core, ns, name, pod.metadata.uid):
        return False
    owners = {o.uid for o in getattr(pod.metadata, "owner_references", None) or [] if o.controller}
    if not owners:
        return True
    for p in core.list_namespaced_pod(ns).items:
        mine = any(o.uid in owners for o in p.metadata.owner_references or [])
        if mine and not p.spec.node_name and p.metadata.deletion_timestamp is None:
            return False
    return True


def _wait_in_flight(in_flight: list[_InFlight], allowed: int, timeout_s: float,
                    sleep: Callable[[float], None], clock: Callable[[], float],
                    also: list[_InFlight] | None = None) -> None:
    """Block until at most ``allowed`` moves are still under way (or the timeout passes); ``also`` is
    polled on the way (fences lifted as soon as their replacement has a node)."""
    deadline = clock() + timeout_s
    while True:
        if also is not None:
            also[:] = [m for m in also if not m.done()]
        in_flight[:] = [m for m in in_flight if not m.done()]
        if len(in_flight) <= max(allowed, 0) or clock() > deadline:
            return
        sleep(0.2)


class ServingDrain:
    """Take a serving replica out of its Service before it is evicted, the Kubernetes way.

    The model's Service selects ``wattplane.io/serving: "true"``; setting the pod's label to
    ``"false"`` makes the EndpointSlice controller drop it, so the router (or kube-proxy) sends it no
    new requests. We wait until no EndpointSlice of the namespace lists the pod (bounded by
    ``endpoints_timeout_s``), then ``drain_s`` more for in-flight requests to finish. A pod without the
    label serves through no such Service and is not waited for. ``undo`` puts the label back when the
    eviction is refused, so a blocked move does not leave a replica out of service.
    """

    def __init__(self, core: Any, discovery: Any, *, drain_s: float = 10.0, endpoints_timeout_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = core
        self.discovery = discovery  # kubernetes.client.DiscoveryV1Api
        self.drain_s = drain_s
        self.endpoints_timeout_s = endpoints_timeout_s
        self.sleep = sleep
        self.clock = clock

    def __call__(self, action: MigratePod) -> Callable[[], None] | None:
        ns, name = _split(action.pod)
        pod = self.core.read_namespaced_pod(name, ns)
        if (pod.metadata.labels or {}).get(SERVING_LABEL) != "true":
            return None
        self._label(ns, name, "false")
        deadline = self.clock() + self.endpoints_timeout_s
        while self._in_endpoints(ns, pod.metadata.uid, name) and self.clock() < deadline:
            self.sleep(0.1)
        self.sleep(self.drain_s)
        return lambda: self._label(ns, name, "true")

    def _label(self, ns: str, name: str, value: str) -> None:
        self.core.patch_namespaced_pod(name, ns, {"metadata": {"labels": {SERVING_LABEL: value}}})

    def _in_endpoints(self, ns: str, uid: str, name: str) -> bool:
        for s in self.discovery.list_namespaced_endpoint_slice(ns).items:
            for e in s.endpoints or []:
                ref = e.target_ref
                if ref is not None and ref.kind == "Pod" and (ref.uid == uid or ref.name == name):
                    return True
        return False
