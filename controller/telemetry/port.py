"""The executor's ``AgentPort`` backed by the hub: a ``SetPowerCap`` action becomes agent commands.

A cap with a power limit becomes ``SetPowerLimit``, a clock limit ``SetClockLimit``, neither
``ClearLimits``, each for the one GPU the action names. Delivery and retries are the hub's
(at least once, results in ``hub.commands``). The executor may call from another thread than
the hub's event loop; the command is then handed over with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from controller.telemetry.hub import TelemetryHub
from policies.plan import SetPowerCap
from protos.wattplane.v1 import agent_pb2 as pb


def commands_for(action: SetPowerCap) -> list[pb.Command]:
    gpus = [action.gpu]
    out = []
    if action.power_limit_w is not None:
        out.append(pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=gpus, watts=action.power_limit_w)))
    if action.clock_limit_mhz is not None:
        out.append(
            pb.Command(set_clock_limit=pb.SetClockLimit(gpu_indices=gpus, max_sm_clock_mhz=action.clock_limit_mhz))
        )
    if not out:
        out.append(pb.Command(clear_limits=pb.ClearLimits(gpu_indices=gpus)))
    return out


class HubAgentPort:
    def __init__(self, hub: TelemetryHub, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._hub = hub
        self._loop = loop

    def set_power_cap(self, action: SetPowerCap) -> None:
        for cmd in commands_for(action):
            self._on_hub_loop(self._hub.send_command, action.node, cmd)

    def set_node_shares(self, shares: dict[str, float]) -> None:
        """Each node's share of its domain budget for its local guard (the hub sends only changed ones)."""
        self._on_hub_loop(self._hub.set_node_shares, shares)

    def set_domain_shares(self, domain: str, budget_w: float, shares: dict[str, float]) -> None:
        """The same, naming the PowerDomain and the budget the shares were computed from: agents that
        read a lower budget for it on the API server scale their share down without a controller."""
        self._on_hub_loop(self._hub.set_node_shares, shares, domain, budget_w)

    def _on_hub_loop(self, fn: Callable[..., object], *args: object) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and (self._loop is None or running is self._loop):
            fn(*args)
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)
        else:
            raise RuntimeError("HubAgentPort called outside the hub's event loop without being given that loop")
