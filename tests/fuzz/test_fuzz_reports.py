"""Fuzzed agent messages through the hub's own parse and validation path: every input is either
accepted or rejected with a Rejected carrying a gRPC status — never another exception.

Inputs: 400 arbitrary byte strings, 400 serialised AgentMessages with random field values
(NaN, infinities, huge counts, unknown GPU indices), and 300 bit-flipped valid reports.
"""

from __future__ import annotations

import math

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.telemetry.auth import StaticTokenAuthenticator
from controller.telemetry.hub import TelemetryHub
from controller.telemetry.validation import Rejected, ReportBounds, validate_hello, validate_report
from protos.wattplane.v1 import agent_pb2 as pb

HUB = TelemetryHub(StaticTokenAuthenticator({"t": "agent"}))
HELLO = pb.NodeHello(protocol_version=pb.PROTOCOL_VERSION_1, node_name="n0", accelerators=[
    pb.AcceleratorInfo(index=i, model="H100-80GB", memory_gib=80, tdp_w=700, min_power_limit_w=200,
                   max_power_limit_w=700) for i in range(8)])
BOUNDS = ReportBounds(HELLO)
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


def _check(raw: bytes) -> None:
    try:
        msg = HUB._parse(raw)
        if msg.HasField("hello"):
            validate_hello(msg.hello)
        if msg.HasField("report"):
            validate_report(msg.report, BOUNDS)
    except Rejected as exc:
        assert isinstance(exc.status, grpc.StatusCode) and str(exc)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(raw: bytes) -> None:
    _check(raw)


@st.composite
def reports(draw: st.DrawFn) -> bytes:
    gpus = [pb.GPUSample(index=draw(st.integers(0, 2**31 - 1) | st.integers(0, 9)), power_w=draw(floats),
                         utilisation=draw(floats), memory_used_gib=draw(floats), sm_clock_mhz=draw(floats),
                         temperature_c=draw(floats), power_limit_w=draw(floats), energy_j=draw(floats))
            for _ in range(draw(st.integers(0, 10)))]
    report = pb.NodeReport(seq=draw(st.integers(0, 2**63 - 1)), node_power_w=draw(floats), gpus=gpus)
    return pb.AgentMessage(report=report).SerializeToString()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reports())
def test_random_field_values(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 7))
def test_bit_flips_of_a_valid_report(position: int, bit: int) -> None:
    valid = pb.AgentMessage(report=pb.NodeReport(seq=3, node_power_w=2000.0, gpus=[
        pb.GPUSample(index=i, power_w=300.0, utilisation=0.5, power_limit_w=700.0) for i in range(8)]))
    raw = bytearray(valid.SerializeToString())
    raw[position % len(raw)] ^= 1 << bit
    _check(bytes(raw))


def test_out_of_range_readings_are_rejected_not_stored() -> None:
    bad = pb.NodeReport(seq=1, node_power_w=100.0, gpus=[pb.GPUSample(index=0, power_w=math.inf)])
    try:
        validate_report(bad, BOUNDS)
    except Rejected as exc:
        assert exc.status == grpc.StatusCode.OUT_OF_RANGE
    else:
        raise AssertionError("an infinite power reading was accepted")
