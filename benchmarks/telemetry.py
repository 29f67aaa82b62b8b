"""``wattplane bench telemetry``: how many 1 Hz, 8-GPU node agents one hub process sustains.

The hub runs in its own process (so its CPU is measured alone) and simulated agents run many per
process with ``grpc.aio``, each on its own stream, reports pre-serialised with the send time
patched into the fixed64 ``sent_unix_ns`` field in place, so the generator stays cheap. For each
node count the agents connect (hello, auth, welcome), send at 1 Hz with random phases for a
warm-up, then for a measured window; the hub records report-to-state lag (hub receive-and-store
time minus the agent's send stamp; one clock, one machine). A node count is *sustained* when lag
p99 < 1 s and the hub ingests >= 95% of the offered reports. The anchor ``bare_grpc`` is a
``grpc.aio`` streaming server doing no processing beyond reading the send stamp: the cost floor
the hub's validation, state, ring buffer and command plumbing add to.

``wattplane_sharded`` is the hub sharded by node over ``--shards`` worker processes on one port
(``controller.telemetry.shards``); its lag is measured where the controller reads it, in the merged
view (so it includes the shards' flush interval), and its CPU is the controller process plus all
shards.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import struct
import time
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.common import Case

TOKEN = "bench-token"
CONNECT_METHOD = "/wattplane.v1.AgentService/Connect"
SENTINEL = 0x5A5A5A5A5A5A5A5A
GPUS_PER_NODE = 8


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, nargs="+", default=None, help="node counts to try, ascending")
    parser.add_argument("--generators", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--agents-per-channel", type=int, default=100, help="agent streams sharing one HTTP/2 connection"
    )
    parser.add_argument("--warmup", type=float, default=None, help="seconds at load before measuring")
    parser.add_argument("--measure", type=float, default=None, help="measured seconds per node count")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="hub variants to measure"
    )
    parser.add_argument("--shards", type=int, default=2, help="worker processes of wattplane_sharded")


METHODS = ("wattplane", "wattplane_sharded", "bare_grpc")


# -- the messages ---------------------------------------------------------------------------------
def hello_bytes(node: str) -> bytes:
    from protos.wattplane.v1 import agent_pb2 as pb

    accs = [
        pb.AcceleratorInfo(
            index=i, uuid=f"GPU-{node}-{i}", model="H100-80GB", memory_gib=80, tdp_w=700,
            min_power_limit_w=200, max_power_limit_w=700, min_sm_clock_mhz=495, max_sm_clock_mhz=1980,
            driver_version="bench",
        )
        for i in range(GPUS_PER_NODE)
    ]  # fmt: skip
    hello = pb.NodeHello(protocol_version=1, node_name=node, accelerators=accs, source="bench", report_interval_s=1)
    return pb.AgentMessage(hello=hello).SerializeToString()


def report_template(seed: int) -> tuple[bytearray, int]:
    """A realistic 8-GPU report with one serving replica, and the offset of its send stamp."""
    from protos.wattplane.v1 import agent_pb2 as pb

    rng = random.Random(seed)
    gpus = []
    for i in range(GPUS_PER_NODE):
        p = rng.uniform(250, 650)
        gpus.append(
            pb.GPUSample(
                index=i, power_w=p, energy_j=rng.uniform(1e6, 1e8), utilisation=rng.uniform(0.3, 1.0),
                memory_used_gib=rng.uniform(40, 78), sm_clock_mhz=rng.uniform(1400, 1980),
                temperature_c=rng.uniform(45, 80), power_limit_w=700,
            )
        )  # fmt: skip
    replica = pb.ReplicaSample(
        deployment="llama-3.1-70b", replica="r0", requests_per_s=12.5, input_tokens_per_s=12000,
        output_tokens_per_s=1500, queue_depth=3, running_batch=48, ttft_p50_ms=180, ttft_p99_ms=900,
        tpot_p50_ms=28, tpot_p99_ms=60, kv_cache_use=0.62,
    )  # fmt: skip
    report = pb.NodeReport(
        sent_unix_ns=SENTINEL, seq=0, sampled_unix_ns=1, gpus=gpus, replicas=[replica],
        node_power_w=sum(g.power_w for g in gpus),
    )  # fmt: skip
    raw = pb.AgentMessage(report=report).SerializeToString()
    offset = raw.index(struct.pack("<Q", SENTINEL))
    return bytearray(raw), offset


def stamp_offset(raw: bytes) -> int | None:
    """Where ``sent_unix_ns`` sits in a serialised report AgentMessage (field 2, then field 1 fixed64)."""
    if not raw or raw[0] != 0x12:
        return None
    i = 1
    while raw[i] & 0x80:
        i += 1
    i += 1
    return i + 1 if i < len(raw) and raw[i] == 0x09 else None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# -- the hub process --------------------------------------------------------------------------------
def _hub_process(conn: Connection, method: str, shards: int = 2) -> None:
    asyncio.run(_hub_main(conn, method, shards))


async def _hub_main(conn: Connection, method: str, shards: int = 2) -> None:
    import grpc

    loop = asyncio.get_running_loop()
    lags: list[float] = []
    count = [0]
    sharded: Any = None

    def shard_cpu() -> float:  # the shards' CPU seconds as of their last flush (<= 0.25 s old)
        return sum(sharded.shard_cpu_s.values()) if sharded is not None else 0.0

    from controller.telemetry import HubConfig

    # agents idle between connecting and the "go" signal (seconds at 10,000 nodes): not a staleness test
    hub_config = HubConfig(lag_samples=5_000_000, stale_after_s=120.0)
    if method == "wattplane_sharded":
        import functools

        from controller.telemetry import StaticTokenAuthenticator
        from controller.telemetry.shards import ShardedHub

        sharded = ShardedHub(
            functools.partial(StaticTokenAuthenticator, {TOKEN: "bench"}), hub_config,
            shards=shards, flush_s=0.25,
        )  # fmt: skip
        port = await sharded.start()

        class _Stopper:
            async def stop(self, grace: float | None) -> None:
                await sharded.stop(grace)

        server: Any = _Stopper()

        def drain() -> tuple[list[float], int]:
            return sharded.lag.drain(), sharded.reports_total

    elif method == "wattplane":
        from controller.telemetry import StaticTokenAuthenticator, TelemetryHub, start_server

        hub = TelemetryHub(StaticTokenAuthenticator({TOKEN: "bench"}), hub_config)
        server, port = await start_server(hub)

        def drain() -> tuple[list[float], int]:
            return hub.lag.drain(), hub.reports_total

    else:

        async def bare(request_iterator: Any, context: Any) -> Any:
            first = True
            async for raw in request_iterator:
                if first:
                    first = False
                    yield b"\x0a\x00"  # an empty Welcome
                    continue
                off = stamp_offset(raw)
                if off is not None:
                    lags.append((time.time_ns() - struct.unpack_from("<Q", raw, off)[0]) / 1e6)
                count[0] += 1

        handler = grpc.method_handlers_generic_handler(
            "wattplane.v1.AgentService", {"Connect": grpc.stream_stream_rpc_method_handler(bare)}
        )
        server = grpc.aio.server(handlers=[handler])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        def drain() -> tuple[list[float], int]:
            out = list(lags)
            lags.clear()
            return out, count[0]

    if method != "bare_grpc":  # as the controller's hub runner and the shard workers do
        from controller.telemetry.gctune import tune_for_streams

        tune_for_streams()
    conn.send(port)
    cpu0, wall0, n0, shard0 = time.process_time(), time.perf_counter(), 0, 0.0
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd == "reset":
            _, n0 = drain()
            cpu0, wall0, shard0 = time.process_time(), time.perf_counter(), shard_cpu()
        elif cmd == "stats":
            samples, n = drain()
            wall = time.perf_counter() - wall0
            main_cpu = time.process_time() - cpu0
            shards_cpu = shard_cpu() - shard0
            conn.send(
                {
                    "reports": n - n0,
                    "wall": wall,
                    "cpu_pct": 100.0 * (main_cpu + shards_cpu) / wall,
                    "cpu_s": main_cpu + shards_cpu,
                    "main_cpu_pct": 100.0 * main_cpu / wall,
                    "lag_p50_ms": percentile(samples, 50),
                    "lag_p99_ms": percentile(samples, 99),
                    "lag_samples": len(samples),
                }
            )
        else:
            break
    await server.stop(0)


# -- the load generator -------------------------------------------------------------------------------
def _generator_process(conn: Connection, port: int, names: list[str], per_channel: int, seed: int) -> None:
    # asyncio, not uvloop: grpc.aio on uvloop 0.23 ingested about half the reports here.
    asyncio.run(_generator_main(conn, port, names, per_channel, seed))


async def _generator_main(conn: Connection, port: int, names: list[str], per_channel: int, seed: int) -> None:
    import grpc

    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(0, len(names), per_channel)
    ]
    sem = asyncio.Semaphore(200)
    calls: list[Any] = [None] * len(names)
    failures = [0]

    async def connect(i: int, name: str) -> None:
        async with sem:
            mc = channels[i // per_channel].stream_stream(CONNECT_METHOD)
            call = mc(metadata=(("authorization", f"Bearer {TOKEN}"),))
            await call.write(hello_bytes(name))
            await call.read()  # the Welcome
            calls[i] = call

    t0 = time.perf_counter()
    results = await asyncio.gather(*(connect(i, n) for i, n in enumerate(names)), return_exceptions=True)
    failures[0] = sum(1 for r in results if isinstance(r, BaseException))
    conn.send({"connected": len(names) - failures[0], "connect_s": time.perf_counter() - t0})

    sent = [0]
    slips: list[float] = []
    running = asyncio.Event()

    async def agent(i: int) -> None:
        call = calls[i]
        if call is None:
            return
        buf, off = report_template(seed * 100_003 + i)
        await running.wait()
        next_t = time.time() + rng.random()  # random phase within the first second
        while True:
            delay = next_t - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now_ns = time.time_ns()
            slips.append(now_ns / 1e9 - next_t)
            struct.pack_into("<Q", buf, off, now_ns)
            try:
                await call.write(bytes(buf))
            except Exception:
                failures[0] += 1
                return
            sent[0] += 1
            next_t += 1.0

    tasks = [asyncio.create_task(agent(i)) for i in range(len(names))]
    cpu0, wall0, sent0 = time.process_time(), time.perf_counter(), 0
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd == "go":
            running.set()
        elif cmd == "mark":
            cpu0, wall0, sent0 = time.process_time(), time.perf_counter(), sent[0]
            slips.clear()
        elif cmd == "stats":
            wall = time.perf_counter() - wall0
            conn.send(
                {
                    "sent": sent[0] - sent0,
                    "cpu_pct": 100.0 * (time.process_time() - cpu0) / wall,
                    "cpu_s": time.process_time() - cpu0,
                    "slip_p99_ms": 1000 * percentile(slips, 99),
                    "failures": failures[0],
                }
            )
        else:
            break
    for t in tasks:
        t.cancel()
    for ch in channels:
        await ch.close(None)


# -- orchestration ---------------------------------------------------------------------------------------
def measure(method: str, nodes: int, args: argparse.Namespace, warmup: float, window: float) -> dict[str, float]:
    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    hub_conn, hub_child = ctx.Pipe()
    # the sharded hub's process has children (its shards), which a daemonic process may not
    hub = ctx.Process(target=_hub_process, args=(hub_child, method, args.shards), daemon=method != "wattplane_sharded")
    hub.start()
    gens: list[tuple[Any, Connection]] = []
    try:
        port = hub_conn.recv()
        names = [f"node-{i:05d}" for i in range(nodes)]
        k = max(1, args.generators)
        for g in range(k):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_generator_process,
                args=(child, port, names[g::k], args.agents_per_channel, args.seed * 1000 + g),
                daemon=True,
            )
            proc.start()
            gens.append((proc, parent))
        connected = [c.recv() for _, c in gens]
        for _, c in gens:
            c.send("go")
        time.sleep(warmup)
        hub_conn.send("reset")
        for _, c in gens:
            c.send("mark")
        time.sleep(window)
        hub_conn.send("stats")
        for _, c in gens:
            c.send("stats")
        h = hub_conn.recv()
        gs = [c.recv() for _, c in gens]
    finally:
        for proc, c in gens:
            c.send("stop")
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
        hub_conn.send("stop")
        hub.join(10)
        if hub.is_alive():
            hub.terminate()
    reports_per_s = h["reports"] / h["wall"]
    sustained = h["lag_p99_ms"] < 1000.0 and reports_per_s >= 0.95 * nodes
    return {
        "nodes": nodes,
        "connected": sum(c["connected"] for c in connected),
        "connect_s": max(c["connect_s"] for c in connected),
        "reports_per_s": round(reports_per_s, 1),
        "sent_per_s": round(sum(g["sent"] for g in gs) / h["wall"], 1),  # written by the agents
        "lag_p50_ms": round(h["lag_p50_ms"], 2),
        "lag_p99_ms": round(h["lag_p99_ms"], 2),
        "hub_cpu_pct": round(h["cpu_pct"], 1),  # with shards: the controller process plus every shard
        "hub_main_process_cpu_pct": round(h["main_cpu_pct"], 1),
        "generator_cpu_pct": round(sum(g["cpu_pct"] for g in gs), 1),
        # CPU cost per report: what the machine's load does not change much (unlike the lag)
        "hub_cpu_us_per_report": round(1e6 * h["cpu_s"] / max(1, h["reports"]), 1),
        "generator_cpu_us_per_report": round(1e6 * sum(g["cpu_s"] for g in gs) / max(1, sum(g["sent"] for g in gs)), 1),
        "generator_slip_p99_ms": round(max(g["slip_p99_ms"] for g in gs), 2),
        "stream_failures": sum(g["failures"] for g in gs),
        "sustained": 1.0 if sustained else 0.0,
        "machine_load_1m": round(load_before, 2),  # other work on the machine before this run
    }


def run(args: argparse.Namespace) -> list[Case]:
    quick = bool(args.quick)
    steps = args.nodes or ([2500] if quick else [1000, 2500, 5000, 7500, 10000, 12500, 15000, 17500, 20000])
    warmup = args.warmup if args.warmup is not None else (2.0 if quick else 4.0)
    window = args.measure if args.measure is not None else (4.0 if quick else 10.0)
    cases: list[Case] = []
    best: dict[str, float] = {m: 0.0 for m in args.methods}
    failed: dict[str, int] = {}  # method -> the first node count it did not sustain

    def params(n: int) -> dict[str, Any]:
        return {"nodes": n, "gpus_per_node": GPUS_PER_NODE, "report_hz": 1.0, "generators": args.generators,
                "agents_per_channel": args.agents_per_channel, "warmup_s": warmup, "measure_s": window,
                "shards": args.shards}  # fmt: skip

    for n in sorted(steps):
        methods: dict[str, dict[str, float]] = {}
        for method in args.methods:
            if method in failed:
                continue  # past its limit: a bigger load only takes longer to fail
            result = measure(method, n, args, warmup, window)
            methods[method] = result
            if result["sustained"]:
                best[method] = n
            else:
                failed[method] = n
        if not methods:
            break
        cases.append(Case(name=f"{n}-nodes-1hz", params=params(n), methods=methods))
    if not quick:  # one bisection step between the last sustained and the first failed count
        for method, bad in failed.items():
            mid = int(round((best[method] + bad) / 2 / 250) * 250)
            if best[method] < mid < bad:
                result = measure(method, mid, args, warmup, window)
                cases.append(Case(name=f"{mid}-nodes-1hz", params=params(mid), methods={method: result}))
                if result["sustained"]:
                    best[method] = mid
    cases.append(
        Case(
            name="max-sustained-nodes",
            params={"criterion": "lag_p99_ms < 1000 and reports_per_s >= 0.95 * nodes", "tried": sorted(steps)},
            methods={m: {"nodes": v} for m, v in best.items()},
        )
    )
    return cases
