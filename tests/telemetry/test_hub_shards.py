"""The hub sharded over worker processes, with real agents over 127.0.0.1 sockets.

Agents spread over two shard processes listening on one port (SO_REUSEPORT); the controller-side
``ShardedHub`` merges their state for the snapshot and the metrics, routes commands to the shard
holding each node's stream, and survives a shard being killed.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agents.agent import Agent, AgentConfig
from agents.sources.simulated import SimulatedSource, constant_load
from controller.telemetry import HubAgentPort, HubConfig, StaticTokenAuthenticator, summarise
from controller.telemetry.metrics import register
from controller.telemetry.shards import ShardedHub
from policies.plan import SetPowerCap
from protos.wattplane.v1 import agent_pb2 as pb

TOKEN = "secret"
FAST = 0.05
AGENTS = 16  # P(all on one of two shards) = 2 * 2**-16


def run(coro: Awaitable[None], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def sharded_hub(shards: int = 2) -> ShardedHub:
    config = HubConfig(report_interval_s=FAST, stale_after_s=1.0, sweep_every_s=0.1)
    return ShardedHub(functools.partial(StaticTokenAuthenticator, {TOKEN: "sim"}), config, shards=shards, flush_s=0.05)


def make_agent(name: str, port: int) -> Agent:
    cfg = AgentConfig(
        node_name=name, target=f"127.0.0.1:{port}", token=TOKEN, report_interval_s=FAST, backoff_base_s=0.05,
        backoff_max_s=0.2,
    )  # fmt: skip
    return Agent(cfg, SimulatedSource(gpus=4, load=constant_load(0.1, 0.5), node_name=name))


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def running(agents: list[Agent]) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(a.run()) for a in agents]


async def stopped(agents: list[Agent], tasks: list[asyncio.Task[None]]) -> None:
    for a in agents:
        a.stop()
    await asyncio.gather(*tasks)


def test_agents_spread_over_shards_and_the_merged_view_sees_them_all() -> None:
    async def body() -> None:
        hub = sharded_hub()
        port = await hub.start()
        names = [f"node-{i:02d}" for i in range(AGENTS)]
        agents = [make_agent(n, port) for n in names]
        tasks = await running(agents)
        try:
            await until(lambda: hub.connected_agents() == AGENTS and all(s.reports >= 3 for s in hub.nodes.values()))
            shards = {hub.shard_of(n) for n in names}
            assert shards == {0, 1}, f"agents landed on shards {shards}"
            summary = summarise(hub)
            assert {g.node for g in summary.gpu_telemetry} == set(names)
            assert len(summary.gpu_telemetry) == AGENTS * 4 and summary.stale_nodes == ()
            assert all(g.power_w > 0 for g in summary.gpu_telemetry)

            registry = CollectorRegistry()
            register(hub, registry)
            hub.set_power_domains({n: ("dom-a" if i % 2 else "dom-b") for i, n in enumerate(names)})
            text = generate_latest(registry).decode()
            power_lines = [ln for ln in text.splitlines() if ln.startswith("wattplane_gpu_power_watts{")]
            assert len(power_lines) == AGENTS * 4  # each GPU exported once, whichever shard holds it
            domains = [ln for ln in text.splitlines() if ln.startswith("wattplane_domain_power_watts{")]
            assert sorted(ln.split("}")[0] for ln in domains) == [
                'wattplane_domain_power_watts{domain="dom-a"',
                'wattplane_domain_power_watts{domain="dom-b"',
            ]  # one series per domain, summed over nodes on both shards
            assert all(float(ln.split()[-1]) > 0 for ln in domains)
            assert hub.reports_total >= 3 * AGENTS and not hub.rejected

            # a command to a node on each shard reaches its agent and the result comes back
            for shard in (0, 1):
                node = next(n for n in names if hub.shard_of(n) == shard)
                agent = agents[names.index(node)]
                cid = hub.send_command(node, pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[1], watts=450)))
                result = await hub.wait_result(cid, 10)
                assert result.status == pb.COMMAND_STATUS_APPLIED
                assert agent.source.sample()[1].power_limit_w == 450
                await until(lambda n=node: hub.nodes[n].last_report is not None  # type: ignore[misc]
                            and hub.nodes[n].last_report.gpus[1].power_limit_w == 450)  # fmt: skip
            # and through the executor's port, which the controller uses
            node = next(n for n in names if hub.shard_of(n) == 1)
            HubAgentPort(hub).set_power_cap(SetPowerCap(node=node, gpu=2, power_limit_w=400.0))
            await until(lambda: agents[names.index(node)].source.sample()[2].power_limit_w == 400)
            await until(lambda: hub.pending_commands() == [])  # every result came back to the merged view
        finally:
            await stopped(agents, tasks)
            await hub.stop()

    run(body())


def test_a_killed_shard_loses_nobody_else_and_its_agents_come_back() -> None:
    async def body() -> None:
        hub = sharded_hub()
        port = await hub.start()
        names = [f"node-{i:02d}" for i in range(AGENTS)]
        agents = [make_agent(n, port) for n in names]
        tasks = await running(agents)
        try:
            await until(lambda: hub.connected_agents() == AGENTS and {hub.shard_of(n) for n in names} == {0, 1})
            await until(lambda: all(a.connected for a in agents))
            await until(lambda: all(s.reports >= 20 for s in hub.nodes.values()))  # a full unconfirmed ring
            victims = [n for n in names if hub.shard_of(n) == 0]
            survivors = [n for n in names if hub.shard_of(n) == 1]
            before = {n: agents[names.index(n)].connections for n in names}
            old_pid = hub.shard_pids()[0]
            hub.kill_shard(0)
            await until(lambda: hub.restarts == 1 and hub.connected_agents() == AGENTS)
            assert hub.shard_pids()[0] != old_pid  # restarted
            # the merged view may still count a victim's dead stream: wait for the agents' own reconnects
            await until(lambda: all(agents[names.index(n)].connections > before[n] for n in victims))
            for n in victims:  # reconnected once (to the survivor or the restarted shard)
                assert agents[names.index(n)].connections == before[n] + 1
            # the new shard welcomed each with the seq the merged view holds: only reports in flight at
            # the kill (and since the last flush) are re-sent, not each agent's whole unconfirmed ring
            resent = [agents[names.index(n)].resent_reports for n in victims]
            assert max(resent) <= 10, resent
            for n in survivors:  # never disturbed: same stream, same shard
                assert agents[names.index(n)].connections == before[n]
                assert hub.shard_of(n) == 1
            # everyone reports again, and a command reaches a moved node
            marks = {n: hub.nodes[n].reports for n in names}
            await until(lambda: all(hub.nodes[n].reports > marks[n] + 2 for n in names))
            assert set(summarise(hub).stale_nodes) == set()
            moved = victims[0]
            cid = hub.send_command(moved, pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[0], watts=500)))
            assert (await hub.wait_result(cid, 10)).status == pb.COMMAND_STATUS_APPLIED
            assert hub.reports_total > sum(marks.values())  # counts survive the dead shard
        finally:
            await stopped(agents, tasks)
            await hub.stop()

    run(body())


def test_a_node_whose_agent_stops_goes_stale_in_the_merged_view() -> None:
    async def body() -> None:
        hub = sharded_hub(shards=1)
        port = await hub.start()
        agents = [make_agent("quiet", port), make_agent("busy", port)]
        tasks = await running(agents)
        try:
            await until(lambda: hub.connected_agents() == 2 and all(s.reports >= 2 for s in hub.nodes.values()))
            agents[0].stop()
            await tasks[0]
            await until(lambda: hub.nodes["quiet"].marked_stale, timeout=5)  # the sweep, no query
            assert not hub.nodes["busy"].marked_stale
            assert {g.node for g in summarise(hub).gpu_telemetry} == {"busy"}
        finally:
            await stopped(agents[1:], tasks[1:])
            await hub.stop()

    run(body())


def test_shards_that_cannot_bind_fail_start_cleanly_without_respawning() -> None:
    async def body() -> None:
        with socket.socket() as taken:  # a listener without SO_REUSEPORT: nobody may share its port
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            hub = ShardedHub(
                functools.partial(StaticTokenAuthenticator, {TOKEN: "sim"}), shards=2, port=taken.getsockname()[1]
            )
            with pytest.raises(RuntimeError, match="exited before serving"):
                await hub.start(timeout_s=30)
            assert hub.restarts == 0
            assert all(not p.is_alive() for p in hub._procs.values())

    run(body())
