"""What PowerDomain status and the power policy read from the hub: draws, prompt shares, cap acknowledgements."""

from __future__ import annotations

from itertools import pairwise

import pytest

from controller.telemetry import start_server, summarise
from controller.telemetry.summary import CapState, power_readings
from protos.wattplane.v1 import agent_pb2 as pb
from tests.telemetry.test_telemetry_hub import Running, make_agent, make_hub, run, until


def test_prompt_share_draws_and_cap_acknowledgements_reach_the_controller() -> None:
    async def body() -> None:
        hub = make_hub()
        server, port = await start_server(hub)
        a, b = make_agent("node-a", port, gpus=2), make_agent("node-b", port, gpus=2)
        async with Running(a, b):
            await until(lambda: all(s.reports >= 3 for s in hub.nodes.values()) and len(hub.nodes) == 2)
            # the simulated source knows its phase mix (0.1 of the time in prompts): it reaches the snapshot
            summary = summarise(hub)
            assert [g.prefill_fraction for g in summary.gpu_telemetry] == pytest.approx([0.1] * 4)
            ok = hub.send_command("node-a", pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[1], watts=450)))
            bad = hub.send_command("node-b", pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[0], watts=50)))
            await hub.wait_result(ok, 5)
            await hub.wait_result(bad, 5)
            await until(lambda: any(g.power_limit_w == 450 for g in hub.nodes["node-a"].last_report.gpus))
        hub.send_command("node-b", pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[1], watts=500)))
        readings = power_readings(hub)
        caps = {(c.node, c.gpu): (c.watts, c.state) for c in readings.caps}
        assert caps == {("node-a", 1): (450.0, CapState.ACKNOWLEDGED), ("node-b", 0): (50.0, CapState.FAILED),
                        ("node-b", 1): (500.0, CapState.PENDING)}  # node-b's agent has stopped: not answered
        draws = readings.nodes["node-a"].draws
        assert len(draws) >= 3 and all(t2 >= t1 for (t1, _), (t2, _) in pairwise(draws))
        assert all(w > 0 for _, w in draws)
        assert dict((i, (lim, top)) for i, lim, top in readings.nodes["node-a"].limits) == {
            0: (700.0, 700.0), 1: (450.0, 700.0)}
        await server.stop(None)

    run(body())


def test_an_out_of_range_prompt_share_is_rejected() -> None:
    from controller.telemetry.validation import Rejected, ReportBounds, validate_report

    hello = pb.NodeHello(node_name="n", accelerators=[pb.AcceleratorInfo(index=0, max_power_limit_w=700,
                                                                         memory_gib=80)])
    good = pb.NodeReport(gpus=[pb.GPUSample(index=0, power_w=300, prefill_fraction=0.4)])
    validate_report(good, ReportBounds(hello))
    for share in (1.5, -0.1, float("nan")):
        with pytest.raises(Rejected):
            validate_report(pb.NodeReport(gpus=[pb.GPUSample(index=0, power_w=300, prefill_fraction=share)]),
                            ReportBounds(hello))
