"""Standby hubs send agents to the leader; the stale sweep marks quiet nodes without a query.

Two hubs listen on one port (SO_REUSEPORT: the kernel spreads new connections between them, as a
Service spreads them over controller replicas); only the leader's accepts agents.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from prometheus_client import CollectorRegistry, generate_latest

from agents.agent import Agent, AgentConfig
from agents.sources.simulated import SimulatedSource, constant_load
from controller.telemetry import HubConfig, StaticTokenAuthenticator, TelemetryHub, start_server, summarise
from controller.telemetry.hub import CONNECT_METHOD
from controller.telemetry.metrics import register
from protos.wattplane.v1 import agent_pb2 as pb

TOKEN = "secret"
FAST = 0.05


def run(coro: Awaitable[None], timeout: float = 40.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def make_hub(**config: float) -> TelemetryHub:
    return TelemetryHub(StaticTokenAuthenticator({TOKEN: "sim"}), HubConfig(report_interval_s=FAST, **config))


def make_agent(name: str, port: int) -> Agent:
    cfg = AgentConfig(
        node_name=name, target=f"127.0.0.1:{port}", token=TOKEN, report_interval_s=FAST, backoff_base_s=0.05,
        backoff_max_s=0.2,
    )  # fmt: skip
    return Agent(cfg, SimulatedSource(gpus=2, load=constant_load(0.1, 0.5), node_name=name))


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def hello(name: str) -> bytes:
    accs = [pb.AcceleratorInfo(index=0, model="H100", tdp_w=700, min_power_limit_w=200, max_power_limit_w=700)]
    return pb.AgentMessage(
        hello=pb.NodeHello(protocol_version=1, node_name=name, accelerators=accs)
    ).SerializeToString()


async def probe(port: int) -> grpc.aio.AioRpcError | None:
    """One stream on a new connection: the standby's refusal, or None when the leader welcomed it."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        call = ch.stream_stream(CONNECT_METHOD)(
            iter([hello("probe")]), metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        try:
            async for _ in call:
                call.cancel()  # welcomed
                return None
        except grpc.aio.AioRpcError as exc:
            return exc
        return None


def test_a_standby_hub_refuses_agents_with_unavailable_and_they_reach_the_leader() -> None:
    async def body() -> None:
        leader, standby = make_hub(), make_hub()
        standby.set_accepting(False)
        server_a, port = await start_server(leader, reuse_port=True)
        server_b, port_b = await start_server(standby, f"127.0.0.1:{port}", reuse_port=True)
        assert port_b == port

        # a raw client sees the status and message the agents act on (new connections land on either hub)
        refusal = None
        for _ in range(40):
            refusal = await probe(port)
            if refusal is not None:
                break
        assert refusal is not None and refusal.code() is grpc.StatusCode.UNAVAILABLE
        assert "not the leader" in (refusal.details() or "")
        assert standby.rejected["not_leader"] == 1 and not standby.nodes

        agents = [make_agent(f"node-{i}", port) for i in range(12)]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            await until(lambda: leader.connected_agents() == 12)
            assert standby.connected_agents() == 0 and not standby.nodes
            assert standby.rejected["not_leader"] > 0  # 12 agents: some first reached the standby
            refused = [a for a in agents if a.last_error and "not the leader" in a.last_error]
            assert refused and all("UNAVAILABLE" in (a.last_error or "") for a in refused)

            # leadership moves: the old leader ends its streams, the new one takes everyone
            standby.set_accepting(True)
            leader.set_accepting(False)
            await until(lambda: standby.connected_agents() == 12 and leader.connected_agents() == 0)
            assert leader.rejected["not_leader"] >= 12
            marks = {n: s.reports for n, s in standby.nodes.items()}
            await until(lambda: all(standby.nodes[n].reports > marks[n] + 2 for n in marks))
            assert len(summarise(standby).gpu_telemetry) == 12 * 2
            assert not leader._recent_rejects  # refusals by a standby never quarantine an agent
        finally:
            for a in agents:
                a.stop()
            await asyncio.gather(*tasks)
            await server_a.stop(0)
            await server_b.stop(0)

    run(body())


def test_the_sweep_marks_a_quiet_node_stale_once_and_a_report_clears_it() -> None:
    now = [1000.0]
    hub = TelemetryHub(StaticTokenAuthenticator({TOKEN: "sim"}), HubConfig(stale_after_s=3.0), clock=lambda: now[0])
    told: list[list[str]] = []
    hub.on_stale = told.append

    async def body() -> None:
        from controller.telemetry.auth import Identity

        for name in ("a", "b"):
            hub._open_session(pb.AgentMessage.FromString(hello(name)).hello, Identity(user="sim"))
        assert hub.sweep() == []
        now[0] += 2.0
        hub.nodes["b"].last_report_at = now[0]  # b reported just now
        now[0] += 2.0  # a: 4 s silent, b: 2 s
        assert hub.sweep() == ["a"]
        assert hub.sweep() == []  # marked once
        assert told == [["a"]] and hub.stale_marked == 1
        assert hub.nodes["a"].marked_stale and not hub.nodes["b"].marked_stale

    run(body())


def test_the_periodic_sweep_marks_stale_without_a_query_and_the_metrics_show_it() -> None:
    async def body() -> None:
        hub = make_hub(stale_after_s=0.4, sweep_every_s=0.05)
        server, port = await start_server(hub)
        registry = CollectorRegistry()
        register(hub, registry)
        told: list[str] = []
        hub.on_stale = told.extend
        agents = [make_agent("quiet", port), make_agent("busy", port)]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            await until(lambda: hub.connected_agents() == 2 and all(s.reports >= 2 for s in hub.nodes.values()))
            agents[0].stop()
            await tasks[0]
            await until(lambda: hub.nodes["quiet"].marked_stale, timeout=3)  # nobody called stale_nodes()
            assert told == ["quiet"] and not hub.nodes["busy"].marked_stale
            text = generate_latest(registry).decode()
            assert 'wattplane_node_stale{node="quiet"} 1.0' in text
            assert 'wattplane_node_stale{node="busy"} 0.0' in text
            assert "wattplane_telemetry_stale_marked_total 1.0" in text
            assert {g.node for g in summarise(hub).gpu_telemetry} == {"busy"}
            assert summarise(hub).stale_nodes == ("quiet",)
            # the node comes back: its first report clears the mark
            back = make_agent("quiet", port)
            task = asyncio.create_task(back.run())
            await until(lambda: not hub.nodes["quiet"].marked_stale and not hub.is_stale("quiet"))
            back.stop()
            await task
        finally:
            agents[1].stop()
            await tasks[1]
            await server.stop(0)

    run(body())
