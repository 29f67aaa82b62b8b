"""A restarted controller's hub must not reuse the command ids of the one before it.

Agents answer each command id once and remember the answer (at-least-once delivery). A new hub
whose ids started again from the same counter would have its first commands answered from that
memory — acknowledged, never applied. Found by ``tests/chaos/test_cap_crash.py`` (a cap sent by
the successor of a controller SIGKILLed mid power-cap was acknowledged but not in force).
"""

from __future__ import annotations

import socket

from controller.telemetry import start_server
from protos.wattplane.v1 import agent_pb2 as pb
from tests.telemetry.test_telemetry_hub import Running, make_agent, make_hub, run, until


def _cap(gpu: int, watts: float) -> pb.Command:
    return pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[gpu], watts=watts))


def test_a_new_hubs_first_command_is_applied_by_an_agent_that_served_the_old_one() -> None:
    async def body() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        old = make_hub()
        server, _ = await start_server(old, f"127.0.0.1:{port}")
        agent = make_agent("n1", port)
        async with Running(agent):
            await until(lambda: "n1" in old.nodes and old.nodes["n1"].connected)
            first = old.send_command("n1", _cap(0, 400))
            assert (await old.wait_result(first, 5)).status == pb.COMMAND_STATUS_APPLIED
            await server.stop(0)
            await until(lambda: not agent.connected)
            new = make_hub()
            server2, _ = await start_server(new, f"127.0.0.1:{port}")
            await until(lambda: "n1" in new.nodes and new.nodes["n1"].connected)
            second = new.send_command("n1", _cap(1, 300))  # the new hub's first command, like the old one's
            result = await new.wait_result(second, 5)
            assert result.status == pb.COMMAND_STATUS_APPLIED and list(result.applied_w) == [300]
            assert [agent.limits.effective_w(i) for i in range(3)] == [400, 300, 700]
            assert second != first
        await server2.stop(0)

    run(body())
