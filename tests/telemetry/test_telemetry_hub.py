"""The hub against real agents and raw clients over 127.0.0.1 sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agents.agent import Agent, AgentConfig
from agents.sources.simulated import SimulatedSource, constant_load
from controller.telemetry import HubConfig, StaticTokenAuthenticator, TelemetryHub, start_server, summarise
from controller.telemetry.hub import CONNECT_METHOD
from controller.telemetry.metrics import register
from protos.wattplane.v1 import agent_pb2 as pb

TOKEN = "secret"
FAST = 0.05  # report interval in tests


def run(coro: Awaitable[None], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def make_hub(**config: Any) -> TelemetryHub:
    clock = config.pop("clock", None)
    kwargs = {"clock": clock} if clock else {}
    return TelemetryHub(StaticTokenAuthenticator({TOKEN: "sim"}), HubConfig(report_interval_s=FAST, **config), **kwargs)


def make_agent(name: str, port: int, *, token: str = TOKEN, gpus: int = 8, **config: Any) -> Agent:
    cfg = AgentConfig(
        node_name=name, target=f"127.0.0.1:{port}", token=token, report_interval_s=FAST, backoff_base_s=0.05,
        backoff_max_s=0.2, **config,
    )  # fmt: skip
    return Agent(cfg, SimulatedSource(gpus=gpus, load=constant_load(0.1, 0.5), node_name=name))


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


class Running:
    """Agents as tasks, stopped on exit."""

    def __init__(self, *agents: Agent) -> None:
        self.agents = agents
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Running:
        self.tasks = [asyncio.create_task(a.run()) for a in self.agents]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for a in self.agents:
            a.stop()
        await asyncio.gather(*self.tasks)


def hello(name: str = "raw", gpus: int = 2) -> pb.AgentMessage:
    accs = [
        pb.AcceleratorInfo(
            index=i, model="H100", memory_gib=80, tdp_w=700, min_power_limit_w=200, max_power_limit_w=700
        )
        for i in range(gpus)
    ]
    return pb.AgentMessage(hello=pb.NodeHello(protocol_version=1, node_name=name, accelerators=accs))


async def raw_stream(port: int, messages: list[bytes], token: str = TOKEN) -> grpc.StatusCode:
    """Send raw messages on one stream and return the status the hub ends it with."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(CONNECT_METHOD)(metadata=(("authorization", f"Bearer {token}"),))
        try:
            for m in messages:
                await call.write(m)
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return await call.code()


def test_many_agents_report_to_one_hub() -> None:
    async def body() -> None:
        hub = make_hub()
        server, port = await start_server(hub)
        agents = [make_agent(f"node-{i}", port) for i in range(24)]
        async with Running(*agents):
            await until(lambda: len(hub.nodes) == 24 and all(s.reports >= 3 for s in hub.nodes.values()))
        summary = summarise(hub)
        assert len(summary.gpu_telemetry) == 24 * 8
        assert {g.node for g in summary.gpu_telemetry} == {f"node-{i}" for i in range(24)}
        assert all(g.power_w > 0 for g in summary.gpu_telemetry)
        assert not hub.rejected
        await server.stop(0)

    run(body())


def test_wrong_token_is_refused_and_counted() -> None:
    async def body() -> None:
        hub = make_hub()
        server, port = await start_server(hub)
        agent = make_agent("intruder", port, token="wrong")
        async with Running(agent):
            await until(lambda: hub.rejected["unauthenticated"] >= 2)
        assert agent.connections == 0
        assert agent.last_error is not None and "UNAUTHENTICATED" in agent.last_error
        assert "intruder" not in hub.nodes
        no_token = await raw_stream(port, [hello().SerializeToString()], token="")
        assert no_token is grpc.StatusCode.UNAUTHENTICATED
        await server.stop(0)

    run(body())


def test_command_round_trip_and_out_of_range_refusal() -> None:
    async def body() -> None:
        hub = make_hub()
        server, port = await start_server(hub)
        agent = make_agent("n1", port)
        async with Running(agent):
            await until(lambda: "n1" in hub.nodes and hub.nodes["n1"].connected)
            cid = hub.send_command("n1", pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[2, 3], watts=450)))
            result = await hub.wait_result(cid, 5)
            assert result.status == pb.COMMAND_STATUS_APPLIED
            assert list(result.applied_w) == [450, 450]
            assert [s.power_limit_w for s in agent.source.sample()][:4] == [700, 700, 450, 450]

            cid = hub.send_command("n1", pb.Command(set_power_limit=pb.SetPowerLimit(watts=50)))
            refused = await hub.wait_result(cid, 5)
            assert refused.status == pb.COMMAND_STATUS_OUT_OF_RANGE
            assert [s.power_limit_w for s in agent.source.sample()][:4] == [700, 700, 450, 450]

            await until(lambda: any(g.power_limit_w == 450 for g in summarise(hub).gpu_telemetry))
        assert hub.pending_commands() == []
        await server.stop(0)

    run(body())


def test_command_for_a_disconnected_node_is_delivered_when_it_connects() -> None:
    async def body() -> None:
        hub = make_hub()
        server, port = await start_server(hub)
        cid = hub.send_command("late", pb.Command(set_report_interval=pb.SetReportInterval(seconds=0.1)))
        assert [r.command.id for r in hub.pending_commands("late")] == [cid]
        agent = make_agent("late", port)
        async with Running(agent):
            result = await hub.wait_result(cid, 5)
        assert result.status == pb.COMMAND_STATUS_APPLIED
        assert agent.applier.report_interval_s == 0.1
        await server.stop(0)

    run(body())


def test_stale_nodes_are_marked_and_left_out_of_the_snapshot() -> None:
    async def body() -> None:
        now = [1000.0]
        hub = make_hub(clock=lambda: now[0], stale_after_s=3.0)
        server, port = await start_server(hub)
        async with Running(make_agent("a", port), make_agent("b", port)):
            await until(lambda: {"a", "b"} <= set(hub.nodes) and all(s.reports for s in hub.nodes.values()))
        await until(lambda: hub.connected_agents() == 0)  # the hub has seen both streams end (slow when loaded)
        assert hub.stale_nodes() == []
        now[0] += 10.0  # both stopped reporting 10 s ago
        assert hub.stale_nodes() == ["a", "b"]
        summary = summarise(hub)
        assert summary.gpu_telemetry == () and summary.stale_nodes == ("a", "b")
        assert hub.forget(older_than_s=60.0) == []  # stale is not gone
        now[0] += 60.0
        assert hub.forget(older_than_s=60.0) == ["a", "b"] and hub.nodes == {}
        await server.stop(0)

    run(body())


def test_bad_input_is_rejected_with_a_status_and_counted_without_hurting_others() -> None:
    async def body() -> None:
        hub = make_hub(max_message_bytes=4096)
        server, port = await start_server(hub)
        good = make_agent("good", port)
        async with Running(good):
            await until(lambda: "good" in hub.nodes and hub.nodes["good"].reports > 0)
            before = hub.nodes["good"].reports
            h = hello("bad").SerializeToString()
            bad_power = pb.AgentMessage(report=pb.NodeReport(gpus=[pb.GPUSample(index=0, power_w=1e6)]))
            nan_util = pb.AgentMessage(report=pb.NodeReport(gpus=[pb.GPUSample(index=1, utilisation=float("nan"))]))
            unknown_gpu = pb.AgentMessage(report=pb.NodeReport(gpus=[pb.GPUSample(index=7)]))
            results = [
                await raw_stream(port, [h, b"\xff\xff\xff\xff"]),
                await raw_stream(port, [h, b"\x12" + b"\x80" * 5000]),
                await raw_stream(port, [h, bad_power.SerializeToString()]),
                await raw_stream(port, [h, nan_util.SerializeToString()]),
                await raw_stream(port, [h, unknown_gpu.SerializeToString()]),
                await raw_stream(port, [pb.AgentMessage(report=pb.NodeReport()).SerializeToString()]),
            ]
            assert results == [
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.FAILED_PRECONDITION,
            ]
            assert hub.rejected == {"malformed": 1, "oversized": 1, "out_of_range": 3, "protocol": 1}
            await until(lambda: hub.nodes["good"].reports > before + 3)
        assert good.connections == 1  # never disturbed
        assert hub.nodes["bad"].last_report is None  # nothing from the bad agent was stored
        await server.stop(0)

    run(body())


def test_agents_reconnect_after_a_controller_restart() -> None:
    async def body() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        hub = make_hub()
        server, _ = await start_server(hub, f"127.0.0.1:{port}")
        agents = [make_agent(f"r{i}", port) for i in range(5)]
        async with Running(*agents):
            await until(lambda: hub.connected_agents() == 5)
            await server.stop(0)
            await until(lambda: not any(a.connected for a in agents))
            await asyncio.sleep(0.3)  # reports pile up in the agents' buffers meanwhile
            buffered = {a.config.node_name: len(a.outbox) for a in agents}
            seq_at_restart = {a.config.node_name: a._seq for a in agents}
            assert all(n >= 3 for n in buffered.values())
            hub2 = make_hub(history=200)
            server2, _ = await start_server(hub2, f"127.0.0.1:{port}")
            await until(lambda: hub2.connected_agents() == 5 and all(s.reports >= 8 for s in hub2.nodes.values()))
            assert all(a.connections == 2 for a in agents)
            for name, state in hub2.nodes.items():
                seqs = [r.seq for r in state.history]
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "in order, no gaps"
                assert seqs[0] <= seq_at_restart[name] - buffered[name] + 1, "the buffered reports arrived"
        await server2.stop(0)

    run(body())


def test_prometheus_metrics_per_gpu_and_per_domain() -> None:
    async def body() -> None:
        hub = make_hub()
        registry = CollectorRegistry()
        register(hub, registry)
        server, port = await start_server(hub)
        async with Running(make_agent("m1", port, gpus=2), make_agent("m2", port, gpus=2)):
            await until(lambda: len(hub.nodes) == 2 and all(s.reports for s in hub.nodes.values()))
            hub.set_power_domains({"m1": "row-a", "m2": "row-a"})
            text = generate_latest(registry).decode()
        await server.stop(0)
        assert 'wattplane_gpu_power_watts{gpu="1",node="m2"}' in text
        powers = [
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("wattplane_gpu_power_w")
        ]
        domain = next(
            line for line in text.splitlines() if line.startswith('wattplane_domain_power_watts{domain="row-a"}')
        )
        assert float(domain.rsplit(" ", 1)[1]) == pytest.approx(sum(powers))
        assert "wattplane_telemetry_reports_total" in text

    run(body())


def test_executor_port_turns_power_caps_into_agent_commands() -> None:
    from controller.telemetry import HubAgentPort
    from policies.plan import SetPowerCap

    async def body() -> None:
        hub = make_hub()
        server, port = await start_server(hub)
        agent = make_agent("p1", port, gpus=4)
        agents_port = HubAgentPort(hub)
        async with Running(agent):
            await until(lambda: "p1" in hub.nodes and hub.nodes["p1"].connected)
            agents_port.set_power_cap(SetPowerCap(node="p1", gpu=2, power_limit_w=420.0))
            await until(lambda: not hub.pending_commands())
            assert [s.power_limit_w for s in agent.source.sample()] == [700, 700, 420, 700]
            agents_port.set_power_cap(SetPowerCap(node="p1", gpu=2))  # neither limit: clear the cap
            await until(lambda: not hub.pending_commands())
            assert [s.power_limit_w for s in agent.source.sample()] == [700] * 4
        assert [r.result.status for r in hub.commands.values() if r.result] == [pb.COMMAND_STATUS_APPLIED] * 2
        await server.stop(0)

    run(body())


def test_summary_aggregates_serving_load_and_expert_tokens_across_nodes() -> None:
    def report(seq: int, rps: float, p99: float, kv: float, tokens: list[list[int]]) -> bytes:
        replica = pb.ReplicaSample(
            deployment="moe", replica=f"r{seq}", requests_per_s=rps, queue_depth=2, ttft_p99_ms=p99, kv_cache_use=kv,
            expert_tokens=[pb.ExpertLayerTokens(layer=i, tokens=row) for i, row in enumerate(tokens)],
        )  # fmt: skip
        gpus = [pb.GPUSample(index=0, power_w=300.0, power_limit_w=700.0)]
        return pb.AgentMessage(report=pb.NodeReport(seq=seq, gpus=gpus, replicas=[replica])).SerializeToString()

    async def stream(port: int, name: str, reports: list[bytes]) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(CONNECT_METHOD)(metadata=(("authorization", f"Bearer {TOKEN}"),))
            await call.write(hello(name, gpus=1).SerializeToString())
            await call.read()
            for r in reports:
                await call.write(r)
            await call.done_writing()
            await call.code()

    async def body() -> None:
        hub = make_hub()
        server, port = await start_server(hub)
        await stream(
            port, "x", [report(1, 5.0, 100.0, 0.2, [[1, 2], [3, 4]]), report(2, 7.0, 300.0, 0.4, [[1, 0], [0, 1]])]
        )
        await stream(port, "y", [report(1, 3.0, 200.0, 0.6, [[10, 0], [0, 10]])])
        await until(lambda: {"x", "y"} <= set(hub.nodes) and hub.reports_total == 3)
        summary = summarise(hub, gpu_deployments={("x", 0): "moe"})
        (serving,) = summary.serving
        assert serving.requests_per_s == 7.0 + 3.0  # the latest report of each node, summed
        assert serving.queue_depth == 4.0
        assert serving.ttft_p99_ms == 300.0  # the worst replica
        assert serving.kv_cache_use == pytest.approx(0.5)
        (experts,) = summary.expert_loads
        assert experts.loads == ((12.0, 2.0), (3.0, 15.0))  # every report in the ring buffers
        assert [(g.node, g.deployment) for g in summary.gpu_telemetry] == [("x", "moe"), ("y", None)]
        await server.stop(0)

    run(body())


def test_node_share_from_the_controller_drives_the_local_guard() -> None:
    async def body() -> None:
        hub = make_hub()
        server, port = await start_server(hub)
        hot = make_agent("hot", port)
        hot.source.set_load(constant_load(1.0, 1.0))  # ~TDP on every GPU: 5,600 W
        async with Running(hot):
            await until(lambda: "hot" in hub.nodes and hub.nodes["hot"].connected)
            assert not hot.guard.active
            (cid,) = hub.set_node_shares({"hot": 3000.0, "later": 2500.0})
            assert (await hub.wait_result(cid, 5)).status == pb.COMMAND_STATUS_APPLIED
            await until(lambda: sum(s.power_w for s in hot.source.sample()) <= 3000.0, timeout=1.0)
            assert hot.guard.active
            later = make_agent("later", port)
            async with Running(later):
                await until(lambda: later.connected)
                assert later.guard.config.share_w == 2500.0  # delivered in the Welcome
        await server.stop(0)

    run(body())


def test_agent_command_line_reports_to_a_hub() -> None:
    import subprocess
    import sys

    async def body() -> None:
        hub = make_hub()
        server, port = await start_server(hub)
        cmd = [sys.executable, "-m", "wattplane", "agent", "--source", "simulated", "--hub", f"127.0.0.1:{port}",
               "--token", TOKEN, "--node-name", "cli-node", "--sim-gpus", "2", "--report-interval", "0.1"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await until(lambda: "cli-node" in hub.nodes and hub.nodes["cli-node"].reports >= 2, timeout=15)
        finally:
            proc.terminate()
            proc.wait(10)
        assert hub.nodes["cli-node"].hello.source == "simulated"
        assert len(hub.nodes["cli-node"].last_report.gpus) == 2
        await server.stop(0)

    run(body(), timeout=30)


def test_node_bound_tokens_and_a_failing_authenticator() -> None:
    from controller.telemetry import Identity

    class Broken:
        async def authenticate(self, token: str) -> Identity | None:
            raise ConnectionError("API server unreachable")

    async def body() -> None:
        hub = TelemetryHub(StaticTokenAuthenticator({"bound": Identity(user="sa", node="n1")}))
        server, port = await start_server(hub)
        assert (
            await raw_stream(port, [hello("n2").SerializeToString()], token="bound")
            is grpc.StatusCode.PERMISSION_DENIED
        )
        assert await raw_stream(port, [hello("n1").SerializeToString()], token="bound") is grpc.StatusCode.OK
        await server.stop(0)
        broken = TelemetryHub(Broken())
        server, port = await start_server(broken)
        assert await raw_stream(port, [hello("n1").SerializeToString()]) is grpc.StatusCode.UNAVAILABLE
        assert broken.rejected == {"auth_unavailable": 1} and hub.rejected == {"permission_denied": 1}
        await server.stop(0)

    run(body())
