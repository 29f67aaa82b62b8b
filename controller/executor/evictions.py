"""Migrations (``MigratePod``) actuated through the Eviction API, within disruption limits.

Why evictions and not deletes: the API server checks PodDisruptionBudgets on an eviction and
answers 429 when it would break one, so a budget is honoured even if our snapshot was stale.
Order, and why: (1) enforce the plan's migration limit (MNL) centrally, before anything happens;
(2) drain — tell the router to stop sending new requests to a serving replica — so in-flight
requests finish; (3) evict; (4) keep at most ``max_concurrent`` evicted pods still terminating
before the next eviction. The replacement is created by the pod's owner and placed by the
scheduler; with the bin-packing scoring GPU clusters use (NodeResourcesFit MostAllocated on
``nvidia.com/gpu``) it lands on the fuller node, which is the rescheduler's target. A pod that
landed elsewhere is reported, never chased. Dry-run returns what would be evicted and does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from policies.plan import MigratePod


class MigrationOutcome(StrEnum):
    EVICTED = "Evicted"
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
    max_concurrent: int = 2  # evicted pods still terminating at once
    wait_timeout_s: float = 60.0


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


def apply_migrations(
    core: Any,  # kubernetes.client.CoreV1Api
    actions: Sequence[MigratePod],
    limits: MigrationLimits,
    *,
    dry_run: bool = False,
    drain: Callable[[MigratePod], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> MigrationReport:
    """Evict the pods of ``actions`` in order (the rescheduler's executable order)."""
    from kubernetes import client

    report = MigrationReport()
    for extra in actions[limits.max_migrations:]:
        report.outcomes[extra.pod] = MigrationOutcome.OVER_LIMIT
        report.messages[extra.pod] = f"plan exceeds the migration limit {limits.max_migrations}"
    in_flight: list[tuple[str, str, str]] = []  # (ns, name, uid) evicted, maybe still terminating
    for action in actions[: limits.max_migrations]:
        ns, name = _split(action.pod)
        if dry_run:
            report.outcomes[action.pod] = MigrationOutcome.DRY_RUN
            report.messages[action.pod] = f"would evict {action.pod} from {action.from_node} (target {action.to_node})"
            continue
        _wait_in_flight(core, in_flight, limits.max_concurrent - 1, limits.wait_timeout_s, sleep, clock)
        if drain is not None and action.deployment is not None:
            drain(action)
        try:
            pod = core.read_namespaced_pod(name, ns)
            if pod.spec.node_name != action.from_node:
                report.outcomes[action.pod] = MigrationOutcome.FAILED
                report.messages[action.pod] = (
                    f"precondition failed: {action.pod} runs on {pod.spec.node_name}, plan assumed {action.from_node}"
                )
                continue
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
                report.messages[action.pod] = f"eviction failed: {exc.status} {exc.reason}"
            continue
        report.outcomes[action.pod] = MigrationOutcome.EVICTED
        in_flight.append((ns, name, pod.metadata.uid))
    return report


def _wait_in_flight(core: Any, in_flight: list[tuple[str, str, str]], allowed: int, timeout_s: float,
                    sleep: Callable[[float], None], clock: Callable[[], float]) -> None:
    """Block until at most ``allowed`` evicted pods (same uid) still exist."""
    from kubernetes import client

    deadline = clock() + timeout_s
    while True:
        still = []
        for ns, name, uid in in_flight:
            try:
                if core.read_namespaced_pod(name, ns).metadata.uid == uid:
                    still.append((ns, name, uid))
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
        in_flight[:] = still
        if len(in_flight) <= max(allowed, 0) or clock() > deadline:
            return
        sleep(0.2)
