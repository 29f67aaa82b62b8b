"""The committed generated code matches agent.proto, and the wire format tolerates change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from protos.wattplane.v1 import agent_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_not_stale() -> None:
    # In a subprocess: grpc_tools' protoc links its own protobuf runtime, and loading it into a
    # process that already holds OR-Tools' copy crashes the interpreter (segfault).
    proc = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr or "run: python -m protos.generate"


def test_service_name_is_the_proto_package() -> None:
    service = pb.DESCRIPTOR.services_by_name["AgentService"]
    assert service.full_name == "wattplane.v1.AgentService"
    assert service.methods_by_name["Connect"].client_streaming
    assert service.methods_by_name["Connect"].server_streaming


def test_unknown_fields_survive_a_round_trip() -> None:
    """A newer agent may add fields; an older hub must parse, ignore and keep them."""
    report = pb.NodeReport(seq=7, node_power_w=1234.5)
    unknown_field = bytes([0xF8, 0x06, 0x2A])  # field 99, varint, value 42
    raw = report.SerializeToString() + unknown_field
    parsed = pb.NodeReport.FromString(raw)
    assert parsed.seq == 7 and parsed.node_power_w == 1234.5
    assert unknown_field in parsed.SerializeToString()


def test_hello_carries_a_protocol_version() -> None:
    hello = pb.NodeHello(protocol_version=pb.PROTOCOL_VERSION_1, node_name="n")
    assert pb.NodeHello.FromString(hello.SerializeToString()).protocol_version == 1
