"""The eviction actuator's ordering and preconditions, against a recording fake of CoreV1Api."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kubernetes.client import ApiException

from controller.api.convert import FENCE_ANNOTATION, to_node
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


class FencedCore(FakeCore):
    """FakeCore plus nodes (cordon state, annotations), pod labels and EndpointSlices, all recorded."""

    def __init__(self, pods: dict[tuple[str, str], str], cordoned: frozenset[str] = frozenset(),
                 protected: frozenset[str] = frozenset()) -> None:
        super().__init__(pods, protected)
        self.nodes = {n: {"unschedulable": n in cordoned, "annotations": {}} for n in ("n0", "n1", "n2")}
        self.labels: dict[str, dict[str, str]] = {name: {"wattplane.io/serving": "true"} for _, name in pods}
        self.listed = {name for _, name in pods}  # pods in the Service's EndpointSlice

    def read_node(self, name: str) -> Any:
        return SimpleNamespace(spec=SimpleNamespace(unschedulable=self.nodes[name]["unschedulable"]))

    def patch_node(self, name: str, body: dict[str, Any]) -> None:
        self.log.append(f"{'cordon' if body['spec']['unschedulable'] else 'uncordon'} {name}")
        self.nodes[name]["unschedulable"] = body["spec"]["unschedulable"]
        for k, v in body["metadata"]["annotations"].items():
            if v is None:
                self.nodes[name]["annotations"].pop(k, None)
            else:
                self.nodes[name]["annotations"][k] = v

    def list_node(self) -> Any:
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(name=n, annotations=v["annotations"]))
                                      for n, v in self.nodes.items()])

    def read_namespaced_pod(self, name: str, ns: str) -> Any:
        pod = super().read_namespaced_pod(name, ns)
        pod.metadata.labels = self.labels.get(name, {})
        return pod

    def patch_namespaced_pod(self, name: str, ns: str, body: dict[str, Any]) -> None:
        value = body["metadata"]["labels"]["wattplane.io/serving"]
        self.log.append(f"serving={value} {ns}/{name}")
        self.labels[name]["wattplane.io/serving"] = value
        if value == "false":
            self.listed.discard(name)  # the EndpointSlice controller drops it
        else:
            self.listed.add(name)

    def list_namespaced_endpoint_slice(self, ns: str) -> Any:
        refs = [SimpleNamespace(target_ref=SimpleNamespace(kind="Pod", uid=f"uid-{n}", name=n)) for n in self.listed]
        return SimpleNamespace(items=[SimpleNamespace(endpoints=refs)])


def test_drain_fence_evict_then_lift_and_an_operators_cordon_stays() -> None:
    from controller.executor.evictions import NodeFence, ServingDrain

    core = FencedCore({("ns", "a"): "n0", ("ns", "b"): "n1"}, cordoned=frozenset({"n1"}))
    moves = [MigratePod(pod="ns/a", from_node="n0", to_node="n2", deployment="ns/llama"),
             MigratePod(pod="ns/b", from_node="n1", to_node="n2", deployment="ns/llama")]
    drain = ServingDrain(core, core, drain_s=0.0, sleep=lambda s: None)
    report = apply_migrations(core, moves, MigrationLimits(max_concurrent=1), drain=drain, fence=NodeFence(core),
                              sleep=lambda s: None)
    assert report.evicted == 2
    # a: out of service, its node fenced, evicted, the fence lifted once it was gone; n1 was cordoned by
    # an operator, so it is neither cordoned again nor uncordoned
    assert core.log == ["serving=false ns/a", "cordon n0", "evict ns/a", "uncordon n0",
                        "serving=false ns/b", "evict ns/b"]
    assert core.nodes["n1"]["unschedulable"] and not core.nodes["n0"]["unschedulable"]
    assert all(not n["annotations"] for n in core.nodes.values())


def test_a_blocked_eviction_puts_the_replica_back_in_service_and_lifts_the_fence() -> None:
    from controller.executor.evictions import NodeFence, ServingDrain, lift_stale_fences

    core = FencedCore({("ns", "a"): "n0"}, protected=frozenset({"a"}))
    drain = ServingDrain(core, core, drain_s=0.0, sleep=lambda s: None)
    report = apply_migrations(core, [MigratePod(pod="ns/a", from_node="n0", to_node="n1", deployment="ns/m")],
                              MigrationLimits(), drain=drain, fence=NodeFence(core), sleep=lambda s: None)
    assert report.outcomes == {"ns/a": MigrationOutcome.BLOCKED_BY_PDB}
    assert core.log == ["serving=false ns/a", "cordon n0", "serving=true ns/a", "uncordon n0"]
    assert core.labels["a"]["wattplane.io/serving"] == "true" and "a" in core.listed
    # a crashed run's fence (annotation still on the node) is lifted before the next batch
    core.patch_node("n2", {"metadata": {"annotations": {"wattplane.io/fenced-for-migration": "true"}},
                           "spec": {"unschedulable": True}})
    assert lift_stale_fences(core) == ["n2"] and not core.nodes["n2"]["unschedulable"]


def test_placement_still_counts_a_node_our_fence_cordoned_but_not_an_operators_cordon() -> None:
    """The fence lasts seconds and keeps the node for the replica the move makes room for: were it
    unschedulable to placement, the 8-GPU replica waiting for that node would be planned away."""
    def node(annotations: dict[str, str]) -> dict[str, Any]:
        return {"metadata": {"name": "n1", "annotations": annotations}, "spec": {"unschedulable": True},
                "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]}}

    assert to_node(node({FENCE_ANNOTATION: "true"}), "pool", None).schedulable
    assert not to_node(node({}), "pool", None).schedulable
