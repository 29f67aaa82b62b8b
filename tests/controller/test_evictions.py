"""The eviction actuator's ordering and preconditions, against a recording fake of CoreV1Api."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kubernetes.client import ApiException

from controller.executor.evictions import MigrationLimits, MigrationOutcome, apply_migrations
from policies.plan import MigratePod


class FakeCore:
    """Pods by ``(ns, name)`` -> node; evicting deletes at once unless the pod is PDB-protected."""

    def __init__(self, pods: dict[tuple[str, str], str], protected: frozenset[str] = frozenset()) -> None:
        self.pods = dict(pods)
        self.protected = protected
        self.log: list[str] = []

    def read_namespaced_pod(self, name: str, ns: str) -> Any:
        if (ns, name) not in self.pods:
            raise ApiException(status=404)
        return SimpleNamespace(spec=SimpleNamespace(node_name=self.pods[(ns, name)]),
                               metadata=SimpleNamespace(uid=f"uid-{name}"))

    def create_namespaced_pod_eviction(self, name: str, ns: str, body: Any) -> None:
        if name in self.protected:
            raise ApiException(status=429)
        self.log.append(f"evict {ns}/{name}")
        del self.pods[(ns, name)]


def test_serving_replicas_are_drained_before_their_eviction() -> None:
    core = FakeCore({("ns", "a"): "n0", ("ns", "b"): "n1"})
    moves = [MigratePod(pod="ns/a", from_node="n0", to_node="n1", deployment="ns/llama"),
             MigratePod(pod="ns/b", from_node="n1", to_node="n0")]
    report = apply_migrations(core, moves, MigrationLimits(max_migrations=5, max_concurrent=1),
                              drain=lambda m: core.log.append(f"drain {m.pod}"), sleep=lambda s: None)
    assert core.log == ["drain ns/a", "evict ns/a", "evict ns/b"]  # b serves nothing: no drain
    assert report.evicted == 2


def test_stale_plans_and_budgets_are_reported_not_forced() -> None:
    core = FakeCore({("ns", "moved"): "n9", ("ns", "guarded"): "n0"}, protected=frozenset({"guarded"}))
    moves = [MigratePod(pod="ns/moved", from_node="n0", to_node="n1"),  # it no longer runs on n0
             MigratePod(pod="ns/guarded", from_node="n0", to_node="n1"),
             MigratePod(pod="ns/gone", from_node="n0", to_node="n1")]
    report = apply_migrations(core, moves, MigrationLimits(max_migrations=5), sleep=lambda s: None)
    assert report.outcomes == {"ns/moved": MigrationOutcome.FAILED, "ns/guarded": MigrationOutcome.BLOCKED_BY_PDB,
                               "ns/gone": MigrationOutcome.GONE}
    assert "plan assumed n0" in report.messages["ns/moved"]
    assert core.log == []
