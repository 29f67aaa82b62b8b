"""A lowered PowerDomain budget scales the node's share down at the agent, controller or not (fast, no cluster).

The API server side (the agent's own list+watch) runs in ``test_budget_cut_cluster.py``; here the
budget reaches the agent through ``Agent.on_budget``, the handler the watch calls.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes.client import ApiClient

from agents.agent import Agent, AgentConfig
from agents.budget import BudgetWatch, budget_of
from agents.guard import GuardConfig, scaled_share
from agents.sources.simulated import SimulatedSource, constant_load
from controller.telemetry import HubAgentPort, HubConfig, StaticTokenAuthenticator, TelemetryHub, start_server
from controller.telemetry.shards import ShardedHub
from protos.wattplane.v1 import agent_pb2 as pb


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_power(source: SimulatedSource) -> float:
    return sum(s.power_w for s in source.sample())


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_agent(load: tuple[float, float] = (0.1, 0.6), clock: Clock | None = None,
               **guard: float) -> tuple[Agent, SimulatedSource]:
    source = SimulatedSource(gpus=8, load=constant_load(*load))
    config = AgentConfig(node_name="n", target=f"127.0.0.1:{closed_port()}", guard=GuardConfig(**guard))
    return Agent(config, source, clock=clock or Clock()), source


def share_command(watts: float, domain: str = "row", budget_w: float = 20_000.0) -> pb.Command:
    share = pb.SetNodeShare(watts=watts, power_domain=domain, domain_budget_w=budget_w)
    return pb.Command(id=f"s-{watts}-{budget_w}", set_node_share=share)


@pytest.mark.parametrize(
    ("share", "basis", "budget", "want"),
    [
        (5000.0, 20_000.0, 10_000.0, 2500.0),  # budget halved: share halved
        (5000.0, 20_000.0, 20_000.0, 5000.0),  # unchanged
        (5000.0, 20_000.0, 30_000.0, 5000.0),  # raised: never up (the controller's job)
        (5000.0, 0.0, 10_000.0, 5000.0),  # basis unknown (static share, older controller): left alone
        (5000.0, 20_000.0, None, 5000.0),  # budget unread or the domain gone
        (0.0, 20_000.0, 10_000.0, 0.0),  # no share: the guard stays off
    ],
)
def test_scaled_share(share: float, basis: float, budget: float | None, want: float) -> None:
    assert scaled_share(share, basis, budget) == pytest.approx(want)


def test_budget_of_reads_only_a_positive_number() -> None:
    assert budget_of({"spec": {"budgetW": 8020}}) == 8020.0
    assert budget_of({"spec": {"budgetW": 0}}) is None
    assert budget_of({"spec": {"budgetW": "8k"}}) is None
    assert budget_of({"spec": {}}) is None and budget_of({}) is None


def test_a_budget_cut_scales_the_share_and_caps_the_node_at_once() -> None:
    agent, source = make_agent()
    draw = node_power(source)  # ~4,700 W
    result = agent.applier.apply(share_command(5600.0))
    assert result.status == pb.COMMAND_STATUS_APPLIED
    assert agent.guard.config.share_w == 5600.0 and (agent.share_domain, agent.share_budget_w) == ("row", 20_000.0)
    agent.on_budget("row", 20_000.0)  # the watch's first read: same budget, nothing changes
    assert agent.guard.config.share_w == 5600.0 and agent.budget_cuts == 0 and not agent.guard.active

    agent.on_budget("other-row", 1_000.0)  # not this node's domain
    assert agent.guard.config.share_w == 5600.0

    agent.on_budget("row", 10_000.0)  # an operator halves the budget; no controller connected
    assert not agent.connected
    assert agent.guard.config.share_w == pytest.approx(2800.0) and agent.budget_cuts == 1
    # the guard ran right away (not at its next period): the node is already under its new share
    assert agent.guard.active and draw > 2800.0 >= node_power(source)

    agent.on_budget("row", 30_000.0)  # raised above the basis: back to the controller's share, no higher
    assert agent.guard.config.share_w == 5600.0


def test_a_fresh_controller_share_replaces_the_scaled_one_but_a_stale_one_stays_scaled() -> None:
    agent, _ = make_agent()
    agent.applier.apply(share_command(5600.0))
    agent.on_budget("row", 10_000.0)
    assert agent.guard.config.share_w == pytest.approx(2800.0)
    # a controller that still saw the old budget: its share is scaled by the budget read since
    agent.applier.apply(share_command(5000.0, budget_w=20_000.0))
    assert agent.guard.config.share_w == pytest.approx(2500.0)
    # one computed from the new budget is taken as it is
    agent.applier.apply(share_command(3100.0, budget_w=10_000.0))
    assert agent.guard.config.share_w == 3100.0


def test_a_connected_controller_gets_the_grace_to_act_on_a_cut_first() -> None:
    """Over budget the controller keeps the old shares and caps by priority; the agent's scaled share
    waits ``cut_grace_s`` for it (or for the stream to drop), and a share of the new budget ends the cut."""
    clock = Clock()
    agent, source = make_agent(clock=clock, cut_grace_s=10.0)
    agent._on_welcome(pb.Welcome(node_share_w=5600.0, power_domain="row", domain_budget_w=20_000.0))
    assert agent.connected and (agent.share_domain, agent.share_budget_w) == ("row", 20_000.0)
    agent.on_budget("row", 10_000.0)
    assert agent.guard.config.share_w == 5600.0 and agent.budget_cuts == 0  # the controller's move first
    clock.now += 9.0
    agent.guard_step()
    assert agent.guard.config.share_w == 5600.0 and not agent.guard.active
    clock.now += 1.0  # the grace is over and no share of the new budget came: the agent acts
    agent.guard_step()
    assert agent.guard.config.share_w == pytest.approx(2800.0) and agent.guard.active and agent.budget_cuts == 1
    assert node_power(source) <= 2800.0

    # another cut, and this time the controller hands out shares of the new budget within the grace
    fresh, _ = make_agent(clock=clock, cut_grace_s=10.0)
    fresh._on_welcome(pb.Welcome(node_share_w=5600.0, power_domain="row", domain_budget_w=20_000.0))
    fresh.on_budget("row", 10_000.0)
    clock.now += 3.0
    fresh.applier.apply(share_command(4700.0, budget_w=10_000.0))
    clock.now += 30.0
    fresh.guard_step()
    assert fresh.guard.config.share_w == 4700.0 and fresh.budget_cuts == 0

    # a cut within the grace, and then the stream drops: the agent acts at its next guard step
    lost, _ = make_agent(clock=clock, cut_grace_s=10.0)
    lost._on_welcome(pb.Welcome(node_share_w=5600.0, power_domain="row", domain_budget_w=20_000.0))
    lost.on_budget("row", 10_000.0)
    clock.now += 1.0
    lost.guard_step()
    assert lost.guard.config.share_w == 5600.0
    lost.connected = False
    lost.guard_step()
    assert lost.guard.config.share_w == pytest.approx(2800.0) and lost.budget_cuts == 1


def test_a_cut_in_force_stays_when_the_controller_comes_back() -> None:
    """Applied without a controller, the scaled share is not lifted by a reconnect's grace."""
    clock = Clock()
    agent, _ = make_agent(clock=clock, cut_grace_s=10.0)
    agent.applier.apply(share_command(5600.0))
    agent.on_budget("row", 10_000.0)
    assert agent.guard.config.share_w == pytest.approx(2800.0)
    clock.now += 1.0
    agent._on_welcome(pb.Welcome(node_share_w=5600.0, power_domain="row", domain_budget_w=20_000.0))
    agent.guard_step()
    assert agent.guard.config.share_w == pytest.approx(2800.0) and agent.budget_cuts == 1


def test_welcome_carries_the_basis_and_another_domain_forgets_the_old_budget() -> None:
    agent, _ = make_agent(cut_grace_s=0.0)
    agent._on_welcome(pb.Welcome(node_share_w=4000.0, power_domain="row", domain_budget_w=16_000.0))
    agent.on_budget("row", 8_000.0)
    assert agent.guard.config.share_w == pytest.approx(2000.0)
    agent.applier.apply(share_command(4000.0, domain="row-b", budget_w=16_000.0))  # the node moved
    assert agent.share_domain == "row-b" and agent.observed_budget_w is None
    assert agent.guard.config.share_w == 4000.0


def test_the_failsafe_split_follows_a_share_cut_while_the_controller_is_away() -> None:
    agent, source = make_agent(load=(0.0, 0.2), failsafe_after_s=0.0)  # idle: the guard has nothing to do
    agent.applier.apply(share_command(4000.0))
    agent.guard_step()  # never connected: fail-safe, an even split of the share
    assert [s.power_limit_w for s in source.sample()] == [500.0] * 8
    agent.on_budget("row", 10_000.0)  # share 2,000 W: the split follows (the guard may hold them lower)
    assert agent.limits.failsafe_w == [250.0] * 8
    assert all(s.power_limit_w <= 250.0 for s in source.sample())


def test_reports_carry_the_share_in_force_and_the_budget_read() -> None:
    agent, _ = make_agent()
    agent.applier.apply(share_command(5600.0))
    agent.on_budget("row", 10_000.0)
    asyncio.run(agent._report_once())
    report = agent.outbox[-1].report
    assert report.node_share_w == pytest.approx(2800.0) and report.observed_budget_w == 10_000.0


def test_hub_sends_the_share_basis_in_commands_and_welcomes() -> None:
    async def body() -> None:
        hub = TelemetryHub(StaticTokenAuthenticator({"t": "sim"}), HubConfig(report_interval_s=0.05))
        server, port = await start_server(hub)
        agent = Agent(AgentConfig(node_name="a", target=f"127.0.0.1:{port}", token="t", report_interval_s=0.05),
                      SimulatedSource(gpus=8, load=constant_load(0.1, 0.6), node_name="a"))
        task = asyncio.create_task(agent.run())
        try:
            while not agent.connected:
                await asyncio.sleep(0.02)
            (cid,) = hub.set_node_shares({"a": 5000.0}, "row", 20_000.0)
            assert (await hub.wait_result(cid, 5)).status == pb.COMMAND_STATUS_APPLIED
            assert (agent.share_w, agent.share_domain, agent.share_budget_w) == (5000.0, "row", 20_000.0)
            assert hub.set_node_shares({"a": 5000.0}, "row", 20_000.0) == []  # nothing changed: nothing sent
            (cid,) = hub.set_node_shares({"a": 5000.0}, "row", 18_000.0)  # same watts, new basis: sent
            await hub.wait_result(cid, 5)
            assert agent.share_budget_w == 18_000.0
            welcome = hub._welcome(pb.NodeHello(node_name="a"), 0).welcome
            assert (welcome.node_share_w, welcome.power_domain, welcome.domain_budget_w) == (5000.0, "row", 18_000.0)
        finally:
            agent.stop()
            await task
            await server.stop(0)

    asyncio.run(asyncio.wait_for(body(), 20))


def test_sharded_hub_and_port_carry_the_share_basis_to_agents() -> None:
    """Shard processes answer the hellos: the basis must reach them too (Welcome), and commands carry it."""
    async def body() -> None:
        config = HubConfig(report_interval_s=0.05)
        hub = ShardedHub(functools.partial(StaticTokenAuthenticator, {"t": "sim"}), config, shards=1, flush_s=0.05)
        port = await hub.start()
        HubAgentPort(hub).set_domain_shares("row", 20_000.0, {"a": 5000.0})  # before the agent connects
        agent = Agent(AgentConfig(node_name="a", target=f"127.0.0.1:{port}", token="t", report_interval_s=0.05,
                                  backoff_base_s=0.05, backoff_max_s=0.2),
                      SimulatedSource(gpus=4, load=constant_load(0.1, 0.6), node_name="a"))
        task = asyncio.create_task(agent.run())
        try:
            while not agent.connected:
                await asyncio.sleep(0.02)
            assert (agent.share_w, agent.share_domain, agent.share_budget_w) == (5000.0, "row", 20_000.0)
            HubAgentPort(hub).set_domain_shares("row", 12_000.0, {"a": 3000.0})
            while agent.share_budget_w != 12_000.0:
                await asyncio.sleep(0.02)
            assert agent.share_w == 3000.0
        finally:
            agent.stop()
            await task
            await hub.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_budget_watch_retries_with_backoff_and_stops_promptly() -> None:
    """No API server: the watch keeps retrying (no exception escapes), backing off rather than spinning."""
    calls: list[float] = []

    def unreachable() -> ApiClient:
        calls.append(time.monotonic())
        raise ConnectionRefusedError("no API server")

    watch = BudgetWatch(unreachable, lambda d, w: None, backoff_base_s=0.05, backoff_max_s=0.2)
    watch.follow("row")
    time.sleep(1.0)
    started = time.monotonic()
    watch.stop()
    assert time.monotonic() - started < 1.0
    # 0.05, 0.1, 0.2, 0.2, ... s apart (half of it jitter): a handful of tries a second, not thousands
    assert 3 <= len(calls) <= 15 and watch.errors == len(calls)
    assert all(b - a >= 0.02 for a, b in itertools.pairwise(calls))


def test_the_agent_runs_without_the_kubernetes_client_when_not_watching() -> None:
    """The watch is optional: without ``--watch-budget`` the agent must not need the kubernetes package."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'kubernetes' or name.startswith('kubernetes.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import asyncio, agents.main\n"
        "from agents.agent import Agent, AgentConfig\n"
        "from agents.sources.simulated import SimulatedSource\n"
        "agent = Agent(AgentConfig(node_name='n', target='127.0.0.1:1'), SimulatedSource(gpus=2))\n"
        "async def main():\n"
        "    task = asyncio.create_task(agent.run())\n"
        "    await asyncio.sleep(0.2)\n"
        "    agent.stop()\n"
        "    await task\n"
        "asyncio.run(main())\n"
        "print('kubernetes' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
