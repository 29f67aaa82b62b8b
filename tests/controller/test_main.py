"""``wattplane controller`` plumbing: the telemetry hub runs on its own loop thread and serves the controller."""

from __future__ import annotations

import socket

from controller.main import HubRunner
from controller.telemetry import HubAgentPort, StaticTokenAuthenticator
from policies.plan import SetPowerCap


def test_hub_runner_serves_and_answers_from_other_threads() -> None:
    hub = HubRunner.start(None, "127.0.0.1", 0, None,  # type: ignore[arg-type]
                          authenticator=StaticTokenAuthenticator({"t": "agent"}))
    try:
        assert hub.port > 0
        with socket.create_connection(("127.0.0.1", hub.port), timeout=5):
            pass  # the gRPC port accepts connections
        assert hub.telemetry() == ((), ())  # no agent has reported yet
        assert isinstance(hub.agents, HubAgentPort)
        hub.agents.set_power_cap(SetPowerCap(node="n1", gpu=0, power_limit_w=300))  # queued for an absent node
    finally:
        hub.stop()
    assert not hub.thread.is_alive()
