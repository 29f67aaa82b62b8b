"""Hub state -> the telemetry part of a ``policies.snapshot.Snapshot``.

Only fresh nodes contribute: a stale node's last reading is history, not the present, and a
policy acting on it would cap or place against power that may no longer be drawn. Serving load is
aggregated per deployment over its replicas (sums for rates and queues, the worst replica for
tail latencies, the mean for KV-cache use); expert loads sum the token counts in every fresh
node's ring buffer, a short window that smooths single-interval noise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from controller.telemetry.hub import CommandState, TelemetryHub
from policies.snapshot import ExpertLoad, GPUTelemetry, PriorityClass, ServingTelemetry
from protos.wattplane.v1 import agent_pb2 as pb


@dataclass(frozen=True)
class TelemetrySummary:
    gpu_telemetry: tuple[GPUTelemetry, ...]
    serving: tuple[ServingTelemetry, ...]
    expert_loads: tuple[ExpertLoad, ...]
    stale_nodes: tuple[str, ...]


def summarise(
    hub: TelemetryHub,
    *,
    gpu_deployments: Mapping[tuple[str, int], str] | None = None,
    gpu_priorities: Mapping[tuple[str, int], PriorityClass] | None = None,
) -> TelemetrySummary:
    """Snapshot telemetry from the hub; ``gpu_*`` maps ``(node, index)`` to what runs there."""
    deployments = gpu_deployments or {}
    priorities = gpu_priorities or {}
    gpus: list[GPUTelemetry] = []
    serving: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    experts: dict[str, list[list[float]]] = {}
    for state in sorted(hub.fresh_nodes(), key=lambda s: s.name):
        report = state.last_report
        if report is None:
            continue
        for g in report.gpus:
            key = (state.name, g.index)
            gpus.append(
                GPUTelemetry(
                    node=state.name,
                    index=g.index,
                    power_w=g.power_w,
                    utilisation=g.utilisation,
                    memory_used_gib=g.memory_used_gib,
                    sm_clock_mhz=g.sm_clock_mhz,
                    temperature_c=g.temperature_c,
                    power_limit_w=g.power_limit_w or None,
                    energy_j=g.energy_j,
                    prefill_fraction=g.prefill_fraction if g.HasField("prefill_fraction") else None,
                    deployment=deployments.get(key),
                    priority=priorities.get(key),
                )
            )
        for r in report.replicas:
            serving[r.deployment].append(
                (
                    r.requests_per_s, r.input_tokens_per_s, r.output_tokens_per_s, r.queue_depth,
                    r.ttft_p99_ms, r.tpot_p99_ms, r.kv_cache_use,
                )
            )  # fmt: skip
        for past in state.history:
            for r in past.replicas:
                if r.expert_tokens:
                    _add_expert_tokens(experts, r.deployment, [list(layer.tokens) for layer in r.expert_tokens])
    return TelemetrySummary(
        gpu_telemetry=tuple(gpus),
        serving=tuple(_serving(name, rows) for name, rows in sorted(serving.items())),
        expert_loads=tuple(
            ExpertLoad(deployment=name, loads=tuple(tuple(float(x) for x in layer) for layer in loads))
            for name, loads in sorted(experts.items())
        ),
        stale_nodes=tuple(hub.stale_nodes()),
    )


def _serving(deployment: str, rows: list[tuple[float, ...]]) -> ServingTelemetry:
    return ServingTelemetry(
        deployment=deployment,
        requests_per_s=sum(r[0] for r in rows),
        input_tokens_per_s=sum(r[1] for r in rows),
        output_tokens_per_s=sum(r[2] for r in rows),
        queue_depth=sum(r[3] for r in rows),
        ttft_p99_ms=max(r[4] for r in rows),
        tpot_p99_ms=max(r[5] for r in rows),
        kv_cache_use=sum(r[6] for r in rows) / len(rows),
    )


def _add_expert_tokens(acc: dict[str, list[list[float]]], deployment: str, layers: list[list[int]]) -> None:
    """Element-wise sum; a replica reporting a different shape resets nothing, it is skipped."""
    current = acc.get(deployment)
    if current is None:
        acc[deployment] = [[float(x) for x in layer] for layer in layers]
        return
    if len(current) != len(layers) or any(len(a) != len(b) for a, b in zip(current, layers, strict=True)):
        return
    for a, b in zip(current, layers, strict=True):
        for i, x in enumerate(b):
            a[i] += x


# -- power: what a PowerDomain status needs from the hub --------------------------------------------


@dataclass(frozen=True)
class NodePower:
    """One node's power as the hub saw it: the draws in its ring buffer and the limits in force."""

    node: str
    fresh: bool
    draws: tuple[tuple[float, float], ...]  # (sampled unix s, node draw W), oldest first
    limits: tuple[tuple[int, float, float], ...]  # latest report: (gpu index, limit in force W, max legal W)
    guard_active: bool = False  # latest report: the agent's local guard is capping the node


class CapState(StrEnum):
    ACKNOWLEDGED = "acknowledged"  # the agent answered APPLIED
    PENDING = "pending"  # queued or sent, no answer yet
    FAILED = "failed"  # the agent refused it or the device failed


@dataclass(frozen=True)
class CapCommand:
    """The latest power-limit command for one GPU (``watts`` None: limits cleared)."""

    node: str
    gpu: int
    watts: float | None
    state: CapState


@dataclass(frozen=True)
class PowerReadings:
    nodes: Mapping[str, NodePower]
    caps: tuple[CapCommand, ...]


def power_readings(hub: TelemetryHub) -> PowerReadings:
    """Per-node draws (ring buffers) and the latest cap command per GPU with its acknowledgement.

    Read on the hub's event-loop thread. Commands are in the order they were issued, so the last
    one seen for a GPU is the one in force (or on its way).
    """
    nodes = {}
    for state in hub.nodes.values():
        draws = tuple(
            ((r.sampled_unix_ns or r.sent_unix_ns) / 1e9, r.node_power_w or sum(g.power_w for g in r.gpus))
            for r in state.history
        )
        top = {a.index: a.max_power_limit_w for a in state.hello.accelerators}
        report = state.last_report
        limits = tuple((g.index, g.power_limit_w, top.get(g.index, 0.0)) for g in report.gpus) if report else ()
        nodes[state.name] = NodePower(state.name, not hub.is_stale(state.name), draws, limits,
                                      bool(report.guard_active) if report else False)
    latest: dict[tuple[str, int], CapCommand] = {}
    for record in hub.commands.values():
        action = record.command.WhichOneof("action")
        watts: float | None
        if action == "set_power_limit":
            indices, watts = list(record.command.set_power_limit.gpu_indices), record.command.set_power_limit.watts
        elif action == "clear_limits":
            indices, watts = list(record.command.clear_limits.gpu_indices), None
        else:
            continue
        node = hub.nodes.get(record.node)
        if not indices and node is not None:  # empty: every device of the node
            indices = [a.index for a in node.hello.accelerators]
        if record.state is not CommandState.DONE:
            cap_state = CapState.PENDING
        elif record.result is not None and record.result.status == pb.COMMAND_STATUS_APPLIED:
            cap_state = CapState.ACKNOWLEDGED
        else:
            cap_state = CapState.FAILED
        for i in indices:
            latest[(record.node, int(i))] = CapCommand(record.node, int(i), watts, cap_state)
    return PowerReadings(nodes=nodes, caps=tuple(latest.values()))
