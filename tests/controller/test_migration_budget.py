"""The durable migration budget: per-window limit, shared by successive controllers, safe under races."""

from __future__ import annotations

import copy
from typing import Any

from controller.executor.migration_budget import MigrationBudget
from controller.kube import KubeError


class Store:
    """One ConfigMap with resourceVersion checks, like the API server; ``fail`` makes every call fail."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.rv = 0
        self.fail: int | None = None
        self.race = 0  # the next N replaces lose to "another writer"

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        if self.fail:
            raise KubeError(self.fail, "down")
        if self.obj is None:
            raise KubeError(404, "not found")
        return copy.deepcopy(self.obj)

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        self.obj = copy.deepcopy(body)
        self.obj["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.obj)

    def create(self, kind: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        if self.obj is not None:
            raise KubeError(409, "exists")
        return self._store(body)

    def replace(self, kind: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        assert self.obj is not None
        if self.race:
            self.race -= 1
            data = self.obj["data"]
            data["count"] = str(int(data["count"]) + 1)  # someone else spent one meanwhile
            self.rv += 1
            self.obj["metadata"]["resourceVersion"] = str(self.rv)
        if body["metadata"]["resourceVersion"] != self.obj["metadata"]["resourceVersion"]:
            raise KubeError(409, "conflict")
        return self._store(body)


class Wall:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_limit_holds_across_instances_within_a_window_and_resets_after() -> None:
    store, wall = Store(), Wall()
    first = MigrationBudget(store, wall=wall)  # type: ignore[arg-type]
    assert first.reserve(["ns/a", "ns/b"], limit=3, window_s=30) == 2
    # the first controller dies; its successor knows nothing but what the cluster says
    second = MigrationBudget(store, wall=wall)  # type: ignore[arg-type]
    wall.t += 10
    assert second.used(30) == (2, 20.0)
    assert second.reserve(["ns/c", "ns/d"], limit=3, window_s=30) == 1
    assert second.reserve(["ns/e"], limit=3, window_s=30) == 0
    wall.t += 20  # the cycle is over
    assert second.used(30) == (0, 0.0)
    assert second.reserve(["ns/e", "ns/f", "ns/g", "ns/h"], limit=3, window_s=30) == 3


def test_a_concurrent_writer_is_not_overspent_and_api_trouble_grants_nothing() -> None:
    store, wall = Store(), Wall()
    budget = MigrationBudget(store, wall=wall)  # type: ignore[arg-type]
    assert budget.reserve(["ns/a"], limit=3, window_s=30) == 1
    store.race = 1  # another writer takes one between our read and write: we re-read and see 2 spent
    assert budget.reserve(["ns/b", "ns/c", "ns/d"], limit=3, window_s=30) == 1
    assert store.obj is not None and store.obj["data"]["count"] == "3"
    store.fail = 503
    wall.t += 60
    assert budget.reserve(["ns/e"], limit=3, window_s=30) == 0
