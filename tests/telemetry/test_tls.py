"""TLS on the hub with certificates from files, rotated without restarting the hub.

Cert A and cert B are both signed by one CA (as a cert-manager renewal would be). The hub starts
with A; an agent verifying with the CA connects; the files are replaced with B in the way a
Secret volume updates (a new file renamed over the old); a new connection must see B while the
first agent's stream, on the same hub server object, stays up the whole time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agents.agent import Agent, AgentConfig
from agents.sources.simulated import SimulatedSource, constant_load
from controller.telemetry import HubConfig, StaticTokenAuthenticator, TelemetryHub, start_server

TOKEN = "tls-secret"
FAST = 0.05


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("wattplane-test-ca"))
        .issuer_name(_name("wattplane-test-ca"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) for localhost / 127.0.0.1, signed by the CA."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def install(directory: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Replace the pair atomically (write aside, rename over), as a Secret volume update does."""
    for name, data in (("tls.key", key_pem), ("tls.crt", cert_pem)):
        tmp = directory / f".{name}.new"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)


def peer_common_name(port: int, ca_file: Path) -> str:
    """Handshake with the hub like a new agent (verifying with the CA) and return the server cert's CN."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def make_agent(name: str, port: int, ca_file: Path) -> Agent:
    cfg = AgentConfig(
        node_name=name, target=f"localhost:{port}", token=TOKEN, tls_ca=ca_file, report_interval_s=FAST,
        backoff_base_s=0.05, backoff_max_s=0.2,
    )  # fmt: skip
    return Agent(cfg, SimulatedSource(gpus=2, load=constant_load(0.1, 0.5), node_name=name))


async def until(cond: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_certificate_rotation_without_restart(tmp_path: Path) -> None:
    ca = make_ca()
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    secret = tmp_path / "secret"
    secret.mkdir()
    install(secret, *make_server_cert(ca, "hub-cert-A"))

    async def body() -> None:
        hub = TelemetryHub(StaticTokenAuthenticator({TOKEN: "sim"}), HubConfig(report_interval_s=FAST))
        server, port = await start_server(hub, "127.0.0.1:0", tls_cert=secret / "tls.crt", tls_key=secret / "tls.key")
        first = make_agent("node-a", port, ca_file)
        task_a = asyncio.create_task(first.run())
        try:
            await until(lambda: "node-a" in hub.nodes and hub.nodes["node-a"].reports >= 3)
            cn_before = await asyncio.to_thread(peer_common_name, port, ca_file)
            print(f"\nbefore rotation: new connection sees {cn_before}; node-a reports={hub.nodes['node-a'].reports}")
            assert cn_before == "hub-cert-A"

            install(secret, *make_server_cert(ca, "hub-cert-B"))
            cn_after = await asyncio.to_thread(peer_common_name, port, ca_file)
            print(f"after rotation: new connection sees {cn_after}")
            assert cn_after == "hub-cert-B"

            second = make_agent("node-b", port, ca_file)
            task_b = asyncio.create_task(second.run())
            try:
                await until(lambda: "node-b" in hub.nodes and hub.nodes["node-b"].reports >= 3)
                reports_a = hub.nodes["node-a"].reports
                await until(lambda: hub.nodes["node-a"].reports >= reports_a + 3)
                print(
                    f"node-b (new, verified with the CA) reports={hub.nodes['node-b'].reports}; "
                    f"node-a kept its stream: connections={first.connections}, reports={hub.nodes['node-a'].reports}"
                )
                assert second.connections == 1
                assert first.connections == 1  # the hub never restarted: the old stream survived
                assert hub.connected_agents() == 2
            finally:
                second.stop()
                await task_b
        finally:
            first.stop()
            await task_a
            await server.stop(0)

    asyncio.run(asyncio.wait_for(body(), 30))


def test_agent_refuses_a_hub_not_signed_by_its_ca(tmp_path: Path) -> None:
    """The agent's --tls-ca check is real: a cert from another CA never gets a report."""
    hub_ca, other_ca = make_ca(), make_ca()
    ca_file = tmp_path / "other-ca.crt"
    ca_file.write_bytes(other_ca[1].public_bytes(serialization.Encoding.PEM))
    install(tmp_path, *make_server_cert(hub_ca, "hub"))

    async def body() -> None:
        hub = TelemetryHub(StaticTokenAuthenticator({TOKEN: "sim"}), HubConfig(report_interval_s=FAST))
        server, port = await start_server(hub, tls_cert=tmp_path / "tls.crt", tls_key=tmp_path / "tls.key")
        agent = make_agent("node-x", port, ca_file)
        task = asyncio.create_task(agent.run())
        try:
            await asyncio.sleep(1.0)
            print(f"\nagent with the wrong CA: connections={agent.connections}, last error={agent.last_error}")
            assert agent.connections == 0
            assert "node-x" not in hub.nodes
            assert agent.last_error is not None
        finally:
            agent.stop()
            await task
            await server.stop(0)

    asyncio.run(asyncio.wait_for(body(), 30))
