"""The local guard and the fail-safe work without any controller (real agent loops, real time)."""

from __future__ import annotations

import asyncio
import socket
import time

from agents.agent import Agent, AgentConfig, backoff_delay
from agents.guard import GuardConfig, PowerGuard
from agents.limits import Limits
from agents.sources.simulated import SimulatedSource, constant_load
from controller.telemetry import HubConfig, StaticTokenAuthenticator, TelemetryHub, start_server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_power(source: SimulatedSource) -> float:
    return sum(s.power_w for s in source.sample())


def test_guard_caps_an_overdrawing_node_within_one_second_without_a_controller() -> None:
    share = 3000.0
    source = SimulatedSource(gpus=8, load=constant_load(1.0, 1.0))  # every GPU in prompt phase: ~TDP
    config = AgentConfig(
        node_name="hot", target=f"127.0.0.1:{closed_port()}", report_interval_s=0.1,
        guard=GuardConfig(share_w=share, hold_s=0.3, period_s=0.25, failsafe_after_s=60),
    )  # fmt: skip
    agent = Agent(config, source)
    assert node_power(source) > share

    async def body() -> float:
        task = asyncio.create_task(agent.run())
        start = time.monotonic()
        while node_power(source) > share:
            await asyncio.sleep(0.01)
            assert time.monotonic() - start < 1.0, "guard did not cap within 1 s"
        capped_after = time.monotonic() - start
        assert agent.guard.active and not agent.connected
        limits = [s.power_limit_w for s in source.sample()]
        assert all(200 <= w <= 700 for w in limits) and sum(limits) <= share
        source.set_load(constant_load(0.0, 0.0))  # load falls: idle ~20% TDP
        while agent.guard.active:
            await asyncio.sleep(0.05)
            assert time.monotonic() - start < 5.0, "guard never released"
        assert [s.power_limit_w for s in source.sample()] == [700.0] * 8
        agent.stop()
        await task
        return capped_after

    assert asyncio.run(body()) < 1.0


def test_failsafe_after_controller_loss_and_cleared_on_reconnect() -> None:
    port = closed_port()
    source = SimulatedSource(gpus=8, load=constant_load(0.0, 0.2))  # below the share: guard idle
    config = AgentConfig(
        node_name="lonely", target=f"127.0.0.1:{port}", report_interval_s=0.1, backoff_base_s=0.05, backoff_max_s=0.2,
        guard=GuardConfig(share_w=4000.0, failsafe_after_s=0.3, period_s=0.05),
    )  # fmt: skip
    agent = Agent(config, source)

    async def body() -> None:
        task = asyncio.create_task(agent.run())
        await asyncio.sleep(0.6)
        # uncapped devices could draw 8 x 700 W > 4000 W: not safe, so an even split is enforced
        assert [s.power_limit_w for s in source.sample()] == [500.0] * 8
        assert not agent.guard.active
        hub = TelemetryHub(StaticTokenAuthenticator({"t": "x"}), HubConfig())
        agent.config.token = "t"
        server, _ = await start_server(hub, f"127.0.0.1:{port}")
        deadline = time.monotonic() + 5
        while not agent.connected:
            await asyncio.sleep(0.02)
            assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
        assert [s.power_limit_w for s in source.sample()] == [700.0] * 8
        agent.stop()
        await task
        await server.stop(0)

    asyncio.run(asyncio.wait_for(body(), 15))


def test_failsafe_keeps_controller_caps_that_are_safe_on_their_own() -> None:
    source = SimulatedSource(gpus=8)
    limits = Limits(source)
    guard = PowerGuard(GuardConfig(share_w=4000.0, failsafe_after_s=1.0), limits)
    limits.controller_w = [450.0] * 8  # 3600 W at most: safe at any load
    assert not guard.failsafe(5.0)
    assert limits.failsafe_w == [None] * 8
    limits.controller_w = [600.0] * 8  # 4800 W possible: not safe
    assert guard.failsafe(5.0)
    assert [limits.effective_w(i) for i in range(8)] == [500.0] * 8
    assert guard.failsafe(None)  # controller back
    assert [limits.effective_w(i) for i in range(8)] == [600.0] * 8


def test_guard_never_caps_below_the_legal_minimum() -> None:
    source = SimulatedSource(gpus=4, load=constant_load(1.0, 1.0))
    limits = Limits(source)
    guard = PowerGuard(GuardConfig(share_w=300.0), limits)  # impossible: 4 x 200 W minimum
    assert guard.step(0.0, source.sample())
    limits.sync()
    assert [s.power_limit_w for s in source.sample()] == [200.0] * 4


def test_reports_buffer_is_bounded_while_disconnected() -> None:
    source = SimulatedSource(gpus=2)
    config = AgentConfig(node_name="b", target=f"127.0.0.1:{closed_port()}", report_interval_s=0.02, buffer_reports=5)
    agent = Agent(config, source)

    async def body() -> None:
        task = asyncio.create_task(agent.run())
        await asyncio.sleep(0.4)
        agent.stop()
        await task

    asyncio.run(body())
    assert len(agent.outbox) == 5
    assert agent.dropped_reports >= 3
    seqs = [m.report.seq for m in agent.outbox]
    assert seqs == list(range(agent._seq - 4, agent._seq + 1)), "the newest reports are kept, in order"


def test_backoff_is_jittered_exponential_and_capped() -> None:
    import random

    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(8.0, 0.1 * 2**attempt)
        delays = [backoff_delay(attempt, 0.1, 8.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4, "jitter spreads reconnects"
