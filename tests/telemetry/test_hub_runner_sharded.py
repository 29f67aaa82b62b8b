"""The controller's hub runner with ``--hub-shards 2``: same interface, leadership gates the agents."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from agents.agent import Agent, AgentConfig
from agents.sources.simulated import SimulatedSource, constant_load
from controller.main import HubRunner
from controller.telemetry import StaticTokenAuthenticator
from controller.telemetry.shards import ShardedHub
from policies.plan import SetPowerCap

TOKEN = "secret"


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def test_sharded_runner_refuses_until_leader_then_serves_snapshot_and_caps() -> None:
    runner = HubRunner.start(
        None, "127.0.0.1", 0, None,  # type: ignore[arg-type]
        shards=2, auth_factory=functools.partial(StaticTokenAuthenticator, {TOKEN: "sim"}), accepting=False,
    )  # fmt: skip
    try:
        assert isinstance(runner.hub, ShardedHub) and runner.port > 0

        async def body() -> None:
            cfg = AgentConfig(
                node_name="n1", target=f"127.0.0.1:{runner.port}", token=TOKEN, report_interval_s=0.1,
                backoff_base_s=0.05, backoff_max_s=0.2,
            )  # fmt: skip
            agent = Agent(cfg, SimulatedSource(gpus=2, load=constant_load(0.1, 0.5), node_name="n1"))
            task = asyncio.create_task(agent.run())
            try:
                await until(lambda: agent.last_error is not None)
                assert "UNAVAILABLE" in agent.last_error and "not the leader" in agent.last_error  # type: ignore[operator]
                assert agent.connections == 0
                runner.set_accepting(True)  # we won the Lease
                await until(lambda: agent.connected)
                await until(lambda: len(runner.telemetry()[0]) == 2)
                gpus, _ = runner.telemetry()
                assert {(g.node, g.index) for g in gpus} == {("n1", 0), ("n1", 1)}
                runner.agents.set_power_cap(SetPowerCap(node="n1", gpu=1, power_limit_w=420.0))  # another thread's call
                await until(lambda: agent.source.sample()[1].power_limit_w == 420)
            finally:
                agent.stop()
                await task

        asyncio.run(body())
    finally:
        runner.stop()
    assert not runner.thread.is_alive()
    assert all(not p.is_alive() for p in runner.hub._procs.values())
