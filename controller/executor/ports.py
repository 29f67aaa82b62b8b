"""The executor's ports: the only ways Wattplane changes the world.

The controller implements them against the API server, agents and the Ray Serve router; the
simulator and the tests implement them in memory (``RecordingCluster`` below), so both exercise
the one real executor rather than a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from policies.plan import SetPowerCap, SetRoutingShare


class ClusterPort(Protocol):
    def apply(self, obj: dict[str, Any]) -> None:
        """Server-side apply ``obj`` with the controller's field manager (create or update)."""

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete one object; an object that is already gone is not an error."""

    def delete_all(self, namespace: str, label_selector: str) -> None:
        """Delete every Deployment, Pod, Service and ConfigMap matching the selector."""


class AgentPort(Protocol):
    def set_power_cap(self, action: SetPowerCap) -> None: ...


class RouterPort(Protocol):
    def set_routing_share(self, action: SetRoutingShare) -> None: ...


@dataclass
class RecordingCluster:
    """In-memory ClusterPort: remembers applied objects and every call, for tests and the simulator."""

    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str, str, str]] = field(default_factory=list)

    def apply(self, obj: dict[str, Any]) -> None:
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        self.calls.append(("apply", *key))
        self.objects[key] = obj

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.calls.append(("delete", kind, namespace, name))
        self.objects.pop((kind, namespace, name), None)

    def delete_all(self, namespace: str, label_selector: str) -> None:
        self.calls.append(("delete_all", "*", namespace, label_selector))
        wanted = dict(kv.split("=", 1) for kv in label_selector.split(","))
        for key, obj in list(self.objects.items()):
            labels = obj["metadata"].get("labels", {})
            if key[1] == namespace and all(labels.get(k) == v for k, v in wanted.items()):
                del self.objects[key]


@dataclass
class RecordingAgents:
    caps: list[SetPowerCap] = field(default_factory=list)

    def set_power_cap(self, action: SetPowerCap) -> None:
        self.caps.append(action)


@dataclass
class RecordingRouter:
    shares: list[SetRoutingShare] = field(default_factory=list)

    def set_routing_share(self, action: SetRoutingShare) -> None:
        self.shares.append(action)
