"""Start the hub's gRPC server (``grpc.aio``) on an address; TLS when a cert and key are given."""

from __future__ import annotations

from pathlib import Path

import grpc

from controller.telemetry.hub import TelemetryHub

# gRPC itself refuses messages above this; below it the hub applies its own, counted, limit.
TRANSPORT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


async def start_server(
    hub: TelemetryHub,
    address: str = "127.0.0.1:0",
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the bound port (useful with port 0)."""
    server = grpc.aio.server(
        handlers=[hub.handler()],
        options=[
            ("grpc.max_receive_message_length", TRANSPORT_MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    if tls_cert is not None and tls_key is not None:
        creds = grpc.ssl_server_credentials([(tls_key.read_bytes(), tls_cert.read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"telemetry hub could not bind {address}")
    await server.start()
    return server, port
