"""Checks on what agents send, so one broken or hostile agent cannot poison fleet state.

Every rejection names a ``RejectReason`` (a metric label) and maps to a gRPC status; the hub
ends that agent's stream only. Checks are plain comparisons written so that NaN fails them too.
"""

from __future__ import annotations

from enum import StrEnum

import grpc

from protos.wattplane.v1 import agent_pb2 as pb

PROTOCOL_VERSION = pb.PROTOCOL_VERSION_1

MAX_GPUS_PER_NODE = 64
MAX_REPLICAS_PER_REPORT = 64
MAX_EXPERT_LAYERS = 256
MAX_EXPERTS = 1024
MAX_POWER_W = 5_000.0  # per device; no accelerator draws more
MAX_CLOCK_MHZ = 10_000.0
MAX_RATE = 1e12  # rates, queues and latencies: finite and non-negative


class RejectReason(StrEnum):
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    OUT_OF_RANGE = "out_of_range"
    PROTOCOL = "protocol"  # wrong message order or version
    AUTH_UNAVAILABLE = "auth_unavailable"  # the authenticator itself failed (e.g. API server down)
    OVERLOADED = "overloaded"  # the hub is at its stream limit: shed, the agent retries with backoff
    RATE_LIMITED = "rate_limited"  # one stream sent reports far faster than its interval allows
    QUARANTINED = "quarantined"  # this identity's streams were rejected too often just now
    NOT_LEADER = "not_leader"  # a standby replica's hub: the agent reconnects until it reaches the leader


STATUS: dict[RejectReason, grpc.StatusCode] = {
    RejectReason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    RejectReason.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    RejectReason.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.OVERSIZED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RejectReason.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    RejectReason.PROTOCOL: grpc.StatusCode.FAILED_PRECONDITION,
    RejectReason.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RejectReason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RejectReason.QUARANTINED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RejectReason.AUTH_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    RejectReason.NOT_LEADER: grpc.StatusCode.UNAVAILABLE,
}


class Rejected(Exception):
    """A message the hub refuses; ends the sender's stream with ``STATUS[reason]``."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def status(self) -> grpc.StatusCode:
        return STATUS[self.reason]


def _range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise Rejected(RejectReason.OUT_OF_RANGE, f"{name}={value} outside [{lo}, {hi}]")


def validate_hello(hello: pb.NodeHello) -> None:
    if hello.protocol_version != PROTOCOL_VERSION:
        raise Rejected(RejectReason.PROTOCOL, f"protocol_version {hello.protocol_version} unsupported (want 1)")
    if not hello.node_name or len(hello.node_name) > 253:
        raise Rejected(RejectReason.MALFORMED, "node_name must be 1-253 characters")
    if len(hello.accelerators) > MAX_GPUS_PER_NODE:
        raise Rejected(RejectReason.OUT_OF_RANGE, f"{len(hello.accelerators)} accelerators > {MAX_GPUS_PER_NODE}")
    seen: set[int] = set()
    for acc in hello.accelerators:
        if acc.index in seen:
            raise Rejected(RejectReason.MALFORMED, f"duplicate accelerator index {acc.index}")
        seen.add(acc.index)
        _range(f"gpu {acc.index} tdp_w", acc.tdp_w, 1.0, MAX_POWER_W)
        _range(f"gpu {acc.index} min_power_limit_w", acc.min_power_limit_w, 0.0, acc.max_power_limit_w)
        _range(f"gpu {acc.index} max_power_limit_w", acc.max_power_limit_w, 0.0, MAX_POWER_W)
        _range(f"gpu {acc.index} memory_gib", acc.memory_gib, 0.0, 4096.0)
    _range("node_share_w", hello.node_share_w, 0.0, MAX_POWER_W * MAX_GPUS_PER_NODE)


class ReportBounds:
    """Per-device limits taken from the hello once, so checking a report is comparisons only."""

    def __init__(self, hello: pb.NodeHello) -> None:
        # index -> (highest plausible power or limit W, highest plausible memory GiB);
        # transient overshoot above the power limit is real, hence the slack.
        self.devices: dict[int, tuple[float, float]] = {
            a.index: (a.max_power_limit_w * 1.5 + 50.0, a.memory_gib * 1.05 + 1.0) for a in hello.accelerators
        }


def validate_report(report: pb.NodeReport, bounds: ReportBounds) -> None:
    """Reject readings no device can produce; the hot path of the hub, so kept to comparisons."""
    devices = bounds.devices
    gpus = report.gpus
    if len(gpus) > len(devices):
        raise Rejected(RejectReason.OUT_OF_RANGE, f"{len(gpus)} gpu samples for {len(devices)} accelerators")
    seen: set[int] = set()
    for g in gpus:
        index = g.index
        limits = devices.get(index)
        if limits is None or index in seen:
            raise Rejected(RejectReason.OUT_OF_RANGE, f"gpu index {index} unknown or repeated")
        seen.add(index)
        power_hi, memory_hi = limits
        if not (
            0.0 <= g.power_w <= power_hi
            and 0.0 <= g.utilisation <= 1.0
            and g.energy_j >= 0.0
            and 0.0 <= g.memory_used_gib <= memory_hi
            and 0.0 <= g.sm_clock_mhz <= MAX_CLOCK_MHZ
            and -60.0 <= g.temperature_c <= 200.0
            and 0.0 <= g.power_limit_w <= power_hi
            and 0.0 <= g.clock_limit_mhz <= MAX_CLOCK_MHZ
            and 0.0 <= g.prefill_fraction <= 1.0  # unset reads as 0.0
        ):
            raise Rejected(RejectReason.OUT_OF_RANGE, f"gpu {index}: reading out of range: {_one_line(g)}")
    if not 0.0 <= report.node_power_w <= MAX_POWER_W * MAX_GPUS_PER_NODE * 2:
        raise Rejected(RejectReason.OUT_OF_RANGE, f"node_power_w={report.node_power_w}")
    replicas = report.replicas
    if replicas:
        if len(replicas) > MAX_REPLICAS_PER_REPORT:
            raise Rejected(RejectReason.OUT_OF_RANGE, f"{len(replicas)} replicas > {MAX_REPLICAS_PER_REPORT}")
        for r in replicas:
            _validate_replica(r)


def _validate_replica(r: pb.ReplicaSample) -> None:
    if not r.deployment:
        raise Rejected(RejectReason.MALFORMED, "replica sample without deployment")
    if not (
        0.0 <= r.requests_per_s <= MAX_RATE
        and 0.0 <= r.input_tokens_per_s <= MAX_RATE
        and 0.0 <= r.output_tokens_per_s <= MAX_RATE
        and 0.0 <= r.queue_depth <= MAX_RATE
        and 0.0 <= r.running_batch <= MAX_RATE
        and 0.0 <= r.ttft_p50_ms <= MAX_RATE
        and 0.0 <= r.ttft_p99_ms <= MAX_RATE
        and 0.0 <= r.tpot_p50_ms <= MAX_RATE
        and 0.0 <= r.tpot_p99_ms <= MAX_RATE
        and 0.0 <= r.kv_cache_use <= 1.0
        and 0.0 <= r.prefill_fraction <= 1.0  # unset reads as 0.0
    ):
        raise Rejected(RejectReason.OUT_OF_RANGE, f"replica {r.deployment}/{r.replica}: value out of range")
    layers = r.expert_tokens
    if not layers:
        return
    if len(layers) > MAX_EXPERT_LAYERS:
        raise Rejected(RejectReason.OUT_OF_RANGE, f"{len(layers)} MoE layers > {MAX_EXPERT_LAYERS}")
    width = len(layers[0].tokens)
    for layer in layers:
        n = len(layer.tokens)
        if n > MAX_EXPERTS or n != width:
            raise Rejected(RejectReason.OUT_OF_RANGE, f"layer {layer.layer}: {n} experts (ragged or > {MAX_EXPERTS})")


def _one_line(msg: pb.GPUSample) -> str:
    return " ".join(str(msg).split())
