"""The hub's admission and de-duplication rules, over real sockets, fast.

Stream limit, per-stream report rate, quarantine of an identity whose streams keep being rejected,
and dropping re-sent reports the hub already stored (per agent instance).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import grpc

from controller.telemetry import HubConfig, StaticTokenAuthenticator, TelemetryHub, start_server
from controller.telemetry.hub import CONNECT_METHOD
from protos.wattplane.v1 import agent_pb2 as pb

TOKENS = {"good": "good", "bad": "bad"}


def run(coro: Awaitable[None], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def hello(name: str, instance: str = "i1") -> bytes:
    accs = [pb.AcceleratorInfo(index=0, model="H100", tdp_w=700, min_power_limit_w=200, max_power_limit_w=700)]
    msg = pb.NodeHello(protocol_version=1, node_name=name, accelerators=accs, instance_id=instance)
    return pb.AgentMessage(hello=msg).SerializeToString()


def report(seq: int) -> bytes:
    gpus = [pb.GPUSample(index=0, power_w=300, power_limit_w=700)]
    return pb.AgentMessage(report=pb.NodeReport(seq=seq, gpus=gpus)).SerializeToString()


async def open_stream(channel: grpc.aio.Channel, token: str, first: bytes) -> tuple[Any, pb.Welcome]:
    call = channel.stream_stream(CONNECT_METHOD, response_deserializer=pb.ControllerMessage.FromString)(
        metadata=(("authorization", f"Bearer {token}"),)
    )
    await call.write(first)
    msg = await call.read()
    if msg is grpc.aio.EOF:
        await call.code()
        raise AssertionError(f"stream ended without a welcome: {await call.code()}")
    return call, msg.welcome


async def status_of(channel: grpc.aio.Channel, token: str, messages: list[bytes]) -> grpc.StatusCode:
    """Send ``messages`` as the request iterator (so gRPC, not this client, notices an early end)."""
    call = channel.stream_stream(CONNECT_METHOD)(iter(messages), metadata=(("authorization", f"Bearer {token}"),))
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return await call.code()


async def until(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_streams_beyond_the_limit_get_resource_exhausted() -> None:
    async def body() -> None:
        hub = TelemetryHub(StaticTokenAuthenticator(TOKENS), HubConfig(max_streams=2))
        server, port = await start_server(hub)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            a, _ = await open_stream(ch, "good", hello("a"))
            b, _ = await open_stream(ch, "good", hello("b"))
            code = await status_of(ch, "good", [hello("c")])
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert hub.shed["overloaded"] == 1 and "c" not in hub.nodes
            a.cancel()
            await until(lambda: hub.connected_agents() == 1)
            c, _ = await open_stream(ch, "good", hello("c"))  # room again once a stream ended
            assert "c" in hub.nodes
            b.cancel()
            c.cancel()
        await server.stop(0)

    run(body())


def test_a_stream_flooding_reports_is_ended_with_resource_exhausted() -> None:
    async def body() -> None:
        hub = TelemetryHub(StaticTokenAuthenticator(TOKENS), HubConfig(report_interval_s=10.0, report_burst=5))
        server, port = await start_server(hub)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            # exactly one report over the burst: a client still writing when the hub ends the stream sees
            # its own failed write (INTERNAL) instead of the status, a gRPC client behaviour
            code = await status_of(ch, "good", [hello("fast"), *(report(i) for i in range(1, 7))])
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert hub.rejected["rate_limited"] == 1
        assert hub.nodes["fast"].reports == 5  # the burst was accepted, the rest refused
        await server.stop(0)

    run(body())


def test_an_identity_rejected_too_often_is_quarantined_without_hurting_others() -> None:
    async def body() -> None:
        hub = TelemetryHub(StaticTokenAuthenticator(TOKENS), HubConfig(reject_budget=3, reject_window_s=60))
        server, port = await start_server(hub)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            codes = [await status_of(ch, "bad", [hello("evil"), b"\xff\xff\xff"]) for _ in range(5)]
            assert codes[:3] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
            assert codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
            assert hub.rejected["quarantined"] == 2
            good, welcome = await open_stream(ch, "good", hello("fine"))
            assert welcome.report_interval_s > 0
            good.cancel()
        await server.stop(0)

    run(body())


def test_reports_resent_after_a_reconnect_are_stored_once() -> None:
    async def body() -> None:
        hub = TelemetryHub(StaticTokenAuthenticator(TOKENS), HubConfig(history=100))
        server, port = await start_server(hub)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            first, welcome = await open_stream(ch, "good", hello("n", "i1"))
            assert welcome.last_seq == 0
            for s in (1, 2, 3):
                await first.write(report(s))
            await until(lambda: hub.nodes["n"].last_seq == 3)
            first.cancel()
            again, welcome = await open_stream(ch, "good", hello("n", "i1"))
            assert welcome.last_seq == 3  # the agent re-sends only what came after
            for s in (2, 3, 4):  # an agent that re-sent too much anyway
                await again.write(report(s))
            await until(lambda: hub.nodes["n"].last_seq == 4)
            assert [r.seq for r in hub.nodes["n"].history] == [1, 2, 3, 4]
            assert hub.duplicates == 2
            again.cancel()
            restarted, welcome = await open_stream(ch, "good", hello("n", "i2"))  # a new agent process
            assert welcome.last_seq == 0
            await restarted.write(report(1))
            await until(lambda: hub.nodes["n"].last_seq == 1)
            restarted.cancel()
        await server.stop(0)

    run(body())
