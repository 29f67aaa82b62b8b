"""Start the hub's gRPC server (``grpc.aio``) on an address; TLS when a cert and key are given.

TLS certificates come from files (a mounted Secret). They are re-read when the files change, so
a rotated Secret takes effect on the next handshake without restarting the hub: gRPC asks the
fetcher for a certificate config on every new TLS connection; existing streams keep the old one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from controller.telemetry.hub import TelemetryHub

log = logging.getLogger(__name__)

# gRPC itself refuses messages above this; below it the hub applies its own, counted, limit.
TRANSPORT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class CertificateFiles:
    """Serves the key pair in two files, re-reading them when their mtime, size or inode changes.

    A Secret update swaps a symlink (``..data``), so a whole new file appears at once; a half
    written pair (unparseable, or key and cert read at different versions) is caught by gRPC
    rejecting the config, after which the old one stays in use and the next handshake retries.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.loads = 0  # how many times the pair was (re-)read; rotations = loads - 1
        self._seen: tuple[tuple[int, int, int], ...] | None = None

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.cert, self.key):
            st = path.stat()  # follows the Secret's symlinks
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        self._seen = self._stamp()
        self.loads += 1
        return self._config()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The fetcher gRPC calls per handshake: None keeps the current certificate."""
        try:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            config = self._config()
        except OSError as exc:  # mid-rotation (file briefly missing): keep serving the old pair
            log.warning("TLS certificate files unreadable, keeping the current ones: %s", exc)
            return None
        self._seen = stamp
        self.loads += 1
        log.info("TLS certificate files changed; new connections use the new certificate")
        return config

    def _config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())])

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial(), self.fetch, require_client_authentication=False)


async def start_server(
    hub: TelemetryHub,
    address: str = "127.0.0.1:0",
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the bound port (useful with port 0). ``reuse_port``
    lets several processes listen on one port, the kernel spreading connections (hub shards)."""
    server = grpc.aio.server(
        handlers=[hub.handler()],
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", TRANSPORT_MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    if tls_cert is not None and tls_key is not None:
        port = server.add_secure_port(address, CertificateFiles(tls_cert, tls_key).credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"telemetry hub could not bind {address}")
    await server.start()
    hub.start_sweeper()
    return server, port
