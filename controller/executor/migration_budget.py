"""The migration limit, kept in the cluster so it holds across controller crashes and failovers.

Why: the limit (FleetPolicy ``maxMigrationsPerCycle``) was counted in memory, per plan. A
controller killed after the first eviction of a batch forgets it; its successor re-plans at once
and may start a full batch again, so one cycle sees more moves than the limit. Here the count
lives in a ConfigMap and is written *before* the moves start (write-ahead): a crash can only make
the count too high (moves reserved, never made), never too low. A cycle is a window of
``window_s`` seconds (the FleetPolicy's reconcile period) that starts with its first move.
Updates carry the resourceVersion read (optimistic concurrency), so two writers cannot both spend
the last unit; any API trouble grants nothing (refusing a move is always safe).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from controller.kube import Kube, KubeError

log = logging.getLogger(__name__)

NAME = "wattplane-migration-budget"


class MigrationBudget:
    def __init__(self, kube: Kube, namespace: str = "default", name: str = NAME,
                 wall: Callable[[], float] = time.time) -> None:
        self.kube, self.namespace, self.name, self.wall = kube, namespace, name, wall

    def _read(self) -> dict[str, Any] | None:
        try:
            return self.kube.get("ConfigMap", self.name, self.namespace)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def used(self, window_s: float) -> tuple[int, float]:
        """Moves reserved in the current window, and seconds until the window ends (0: no window open)."""
        cm = self._read()
        data = (cm or {}).get("data") or {}
        start, count = float(data.get("windowStart", 0)), int(data.get("count", 0))
        left = start + window_s - self.wall()
        return (count, left) if left > 0 else (0, 0.0)

    def reserve(self, pods: Sequence[str], limit: int, window_s: float, attempts: int = 5) -> int:
        """Reserve up to ``len(pods)`` moves of this window's ``limit``; returns how many were granted
        (the first ones of ``pods`` may go ahead)."""
        if not pods:
            return 0
        for _ in range(attempts):
            try:
                cm = self._read()
                now = self.wall()
                data = (cm or {}).get("data") or {}
                start, count = float(data.get("windowStart", 0)), int(data.get("count", 0))
                recent = json.loads(data.get("pods", "[]"))
                if now - start >= window_s:  # the previous cycle is over: a new one starts with these moves
                    start, count, recent = now, 0, []
                granted = max(0, min(len(pods), limit - count))
                if granted == 0:
                    return 0
                body: dict[str, Any] = {
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": self.name, "namespace": self.namespace,
                                 "labels": {"app.kubernetes.io/component": "migration-budget"}},
                    "data": {"windowStart": repr(start), "windowSeconds": repr(window_s), "limit": str(limit),
                             "count": str(count + granted), "pods": json.dumps([*recent, *pods[:granted]][-64:])},
                }
                if cm is None:
                    self.kube.create("ConfigMap", body, self.namespace)
                else:
                    body["metadata"]["resourceVersion"] = cm["metadata"]["resourceVersion"]
                    self.kube.replace("ConfigMap", body, self.namespace)
                return granted
            except KubeError as exc:
                if exc.status == 409:  # somebody else wrote in between: read again
                    continue
                log.warning("migration budget %s/%s unavailable (%s): no moves this time", self.namespace,
                            self.name, exc)
                return 0
        return 0
