"""Ray Serve started for real on loopback: the router, HTTP and the routing loop are real; models are stand-ins.

One module-scoped Ray (``num_cpus=2``) serves every test here; it is shut down in the finaliser. The
router runs as ROUTER_REPLICAS replicas behind Serve's proxy, all serving one shared table.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from controller.dataplane.client import HttpRouterPort  # noqa: E402
from controller.dataplane.serve_app import MAX_BODY_BYTES, build_app  # noqa: E402
from controller.dataplane.standin import LatencyModel, count_tokens, latency_model  # noqa: E402
from controller.dataplane.table import RoutingTable  # noqa: E402
from policies.plan import SetRoutingShare  # noqa: E402
from policies.profiles import REFERENCE_GPUS, default_table  # noqa: E402
from policies.routing import RoutingState, plan_routing  # noqa: E402
from policies.snapshot import (  # noqa: E402
    Demand,
    Fallback,
    ModelDeployment,
    ModelShape,
    Node,
    Parallelism,
    Pool,
    ReplicaSet,
    Snapshot,
)
from wattplane.testcluster.cluster import free_port  # noqa: E402

pytestmark = pytest.mark.ray

H100 = REFERENCE_GPUS["h100"]
LARGE = ModelDeployment(
    name="big", model=ModelShape(name="llama-3.1-70b", params_b=70, active_params_b=70),
    parallelism=Parallelism(tp=4), target_utilisation=0.8, fallback=Fallback(deployment="small", quality_floor=0.8),
)
SMALL = ModelDeployment(name="small", model=ModelShape(name="llama-3.1-8b", params_b=8, active_params_b=8))
OUTPUT_TOKENS = 50
PROMPT_WORDS = 100
# Stand-in time runs 1/TIME_SCALE as fast as the profile's: a 100-word prompt with 50 output tokens
# holds a large-model slot ~0.4 s, so one large replica serves ~10 requests/s.
TIME_SCALE = 3.3
LARGE_SLOTS = 4
SMALL_SLOTS = 8
SLO_P99_S = 2.0  # end-to-end p99 latency target of this test's service (5x the unloaded 0.4 s)
CONTROL_PERIOD_S = 0.5
ROUTER_REPLICAS = 2
REFRESH_S = 0.2  # a router replica re-reads the shared table at most this often

WORDS = (
    "integral", "derivative", "theorem", "proof", "history", "treaty", "war", "king", "enzyme", "protein", "cell",
    "law", "court", "contract", "market", "price", "inflation", "poem", "novel", "author", "molecule", "atom",
    "charge", "velocity", "mass", "energy", "ethics", "duty", "virtue", "ocean", "climate", "river", "graph",
    "vertex", "algorithm", "memory", "compiler", "probability", "variance", "estimator",
)


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS - 1)) + " Answer:"


def profiles() -> tuple[LatencyModel, LatencyModel]:
    table = default_table()
    large = table.for_deployment(LARGE, H100)
    small = table.for_deployment(SMALL, H100)
    assert large is not None and small is not None
    return (latency_model("big", large, LARGE_SLOTS, TIME_SCALE),
            latency_model("small", small, SMALL_SLOTS, TIME_SCALE))


@dataclass
class Served:
    base_url: str
    large: LatencyModel
    small: LatencyModel


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="wattplane-test")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        large, small = profiles()
        serve.run(build_app(large, small, "big", "small", router_replicas=ROUTER_REPLICAS, refresh_s=REFRESH_S),
                  name="wattplane-router", route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", large, small)
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(client: httpx.Client, text: str, max_tokens: int = OUTPUT_TOKENS) -> httpx.Response:
    return client.post("/v1/chat/completions", json={
        "model": "big", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
    })


def push(served: Served, version: int, share: float, threshold: float, ttl: float = 60.0) -> None:
    """Push through whichever replica the proxy picks, then give every replica time to re-read the store."""
    ok = HttpRouterPort(served.base_url, ttl_s=ttl).push(RoutingTable(
        version=version, deployment="big", fallback="small", threshold=threshold, fallback_share=share, ttl_s=ttl))
    assert ok
    time.sleep(2 * REFRESH_S)


_version = [100]


def next_version() -> int:
    _version[0] += 1
    return _version[0]


def test_malformed_requests_get_openai_400(served: Served) -> None:
    with httpx.Client(base_url=served.base_url, timeout=30) as c:
        bad = [
            c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
            c.post("/v1/chat/completions", json={"model": "big"}),
            c.post("/v1/chat/completions", json={"model": "big", "messages": []}),
            c.post("/v1/chat/completions", json={"model": "big", "messages": [{"role": "wizard", "content": "x"}]}),
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
            c.post("/v1/chat/completions", json={"model": "big", "messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": -3}),
            c.post("/v1/completions", json={"model": "big", "prompt": 42}),
        ]
        for r in bad:
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"]
        assert bad[1].json()["error"]["param"] == "messages"
        assert bad[4].json()["error"]["param"] == "model"
        # a body over the router's bound: refused unread, OpenAI-style (declared and streamed without a length)
        huge = {"model": "big", "prompt": "x" * MAX_BODY_BYTES}
        declared = c.post("/v1/completions", json=huge)
        streamed = c.post("/v1/completions", content=iter([json.dumps(huge).encode()]),
                          headers={"content-type": "application/json"})
        for r in (declared, streamed):
            assert r.status_code == 413, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
        # a completion request in the right shape works
        ok = c.post("/v1/completions", json={"model": "big", "prompt": "2+2=", "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["object"] == "text_completion"


def test_routing_follows_pushed_tables(served: Served) -> None:
    rng = random.Random(1)
    with httpx.Client(base_url=served.base_url, timeout=30) as c:
        push(served, next_version(), share=1.0, threshold=1e9)
        r = chat(c, prompt(rng), max_tokens=5)
        assert r.status_code == 200
        assert r.headers["x-wattplane-served-by"] == "small"
        assert r.headers["x-wattplane-route-reason"] == "below-threshold"
        small_replica = r.headers["x-wattplane-router-replica"]
        assert r.json()["model"] == "small" and r.json()["choices"][0]["message"]["role"] == "assistant"
        v = next_version()
        push(served, v, share=0.0, threshold=-1e9)
        r = chat(c, prompt(rng), max_tokens=5)
        assert r.headers["x-wattplane-served-by"] == "big"
        assert r.headers["x-wattplane-route-reason"] == "above-threshold"
        big_replica = r.headers["x-wattplane-router-replica"]
        assert r.headers["x-wattplane-table-version"] == str(v)
        # an older version is refused and the newer one stays in force
        assert not HttpRouterPort(served.base_url).push(RoutingTable(
            version=v - 1, deployment="big", fallback="small", threshold=1e9, fallback_share=1.0))
        assert chat(c, prompt(rng), max_tokens=5).headers["x-wattplane-served-by"] == "big"
        # prometheus metrics per route, per router replica (Prometheus scrapes each; here: the proxy's pick)
        text = metrics_of(c, small_replica)
        assert 'wattplane_router_requests_total{reason="below-threshold",route="small"}' in text
        assert f"wattplane_router_table_version {float(v)}" in text
        text = metrics_of(c, big_replica)
        assert 'wattplane_router_requests_total{reason="above-threshold",route="big"}' in text
        assert f"wattplane_router_table_version {float(v)}" in text


def metrics_of(c: httpx.Client, replica: str) -> str:
    """/metrics of one router replica: scrape through the proxy until it picks that one."""
    for _ in range(60):
        text = c.get("/metrics").text
        if f'wattplane_router_info{{replica="{replica}"}} 1.0' in text:
            return text
    raise AssertionError(f"the proxy never routed /metrics to replica {replica}")


def test_stale_table_falls_back_to_large_only(served: Served) -> None:
    rng = random.Random(2)
    with httpx.Client(base_url=served.base_url, timeout=30) as c:
        push(served, next_version(), share=1.0, threshold=1e9, ttl=1.5)
        assert chat(c, prompt(rng), max_tokens=5).headers["x-wattplane-served-by"] == "small"
        time.sleep(1.5)
        r = chat(c, prompt(rng), max_tokens=5)
        assert r.status_code == 200
        assert r.headers["x-wattplane-served-by"] == "big"
        assert r.headers["x-wattplane-route-reason"] == "stale-table"


async def _fan_out(served: Served, n: int) -> list[httpx.Response]:
    rng = random.Random(n)
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as c:
        return list(await asyncio.gather(*(
            c.post("/v1/chat/completions", json={"model": "big", "max_tokens": 5,
                                                 "messages": [{"role": "user", "content": prompt(rng)}]})
            for _ in range(n))))


def test_every_router_replica_serves_the_latest_table(served: Served) -> None:
    """A push reaches one replica through the proxy; every replica must route by it (and count load)."""
    time.sleep(2 * REFRESH_S)  # earlier tests' counts reach the store first (else "before" is short of them)
    with httpx.Client(base_url=served.base_url, timeout=30) as c:
        before = c.get("/v1/router/stats").json()["requests"]
    seen: set[str] = set()
    sent = 0
    for share, served_by in ((1.0, "small"), (0.0, "big"), (1.0, "small")):
        v = next_version()
        push(served, v, share=share, threshold=1e9 if share else -1e9)  # waits 2 x REFRESH_S
        responses = asyncio.run(_fan_out(served, 40))
        sent += len(responses)
        assert all(r.status_code == 200 for r in responses)
        assert {r.headers["x-wattplane-table-version"] for r in responses} == {str(v)}
        assert {r.headers["x-wattplane-served-by"] for r in responses} == {served_by}
        seen |= {r.headers["x-wattplane-router-replica"] for r in responses}
    assert len(seen) == ROUTER_REPLICAS, f"the proxy used {len(seen)} replica(s); the test needs all of them"
    time.sleep(2 * REFRESH_S)  # counters reach the store within REFRESH_S
    with httpx.Client(base_url=served.base_url, timeout=30) as c:
        assert c.get("/v1/router/stats").json()["requests"] - before == sent  # load summed over replicas
        tables = [c.get("/v1/router/table").json() for _ in range(6)]
    assert {t["table"]["version"] for t in tables} == {_version[0]}


def snapshot(now: float, out_tok_s: float, in_tok_s: float) -> Snapshot:
    return Snapshot(
        now=now,
        pools=(Pool(name="h100", accelerator=H100, gpus_per_node=8, cost_per_device_hour=2.0),),
        nodes=(Node(name="n0", pool="h100", gpus=8),),
        deployments=(LARGE, SMALL),
        replicas=(ReplicaSet(deployment="big", pool="h100", replicas=1),
                  ReplicaSet(deployment="small", pool="h100", replicas=1)),
        demand=(Demand(deployment="big", input_tokens_per_s=in_tok_s, output_tokens_per_s=out_tok_s),),
    )


async def burst(served: Served, rate: float, seconds: float, control: bool) -> tuple[list[float], list[str]]:
    """Open-loop Poisson arrivals at ``rate``/s; with ``control``, a routing loop every CONTROL_PERIOD_S."""
    rng = random.Random(7)
    port = HttpRouterPort(served.base_url, ttl_s=30.0)
    latencies: list[float] = []
    routes: list[str] = []
    stop = asyncio.Event()
    floors: list[bool] = []

    async def controller() -> None:
        state = RoutingState()
        last = await asyncio.to_thread(port.stats)
        t_last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(CONTROL_PERIOD_S)
            now_stats = await asyncio.to_thread(port.stats)
            now = time.monotonic()
            dt = now - t_last
            # observed offered load, converted to profile time (the stand-ins run 1/TIME_SCALE as fast)
            out_rate = (now_stats["output_tokens"] - last["output_tokens"]) / dt * TIME_SCALE
            in_rate = (now_stats["prompt_tokens"] - last["prompt_tokens"]) / dt * TIME_SCALE
            last, t_last = now_stats, now
            plan = plan_routing(snapshot(now, out_rate, in_rate), state=state)
            state = RoutingState.model_validate(plan.state)
            for a in plan.actions:
                if isinstance(a, SetRoutingShare):
                    assert LARGE.fallback is not None
                    floors.append(a.expected_quality >= LARGE.fallback.quality_floor - 1e-9)
                    a = a.model_copy(update={"version": a.version + next_version()})
                    await asyncio.to_thread(port.set_routing_share, a)

    async with httpx.AsyncClient(base_url=served.base_url, timeout=60,
                                 limits=httpx.Limits(max_connections=500)) as c:
        async def one(text: str) -> None:
            t0 = time.monotonic()
            r = await c.post("/v1/chat/completions", json={
                "model": "big", "messages": [{"role": "user", "content": text}], "max_tokens": OUTPUT_TOKENS})
            assert r.status_code == 200, r.text
            latencies.append(time.monotonic() - t0)
            routes.append(r.headers["x-wattplane-served-by"])

        ctl = asyncio.create_task(controller()) if control else None
        tasks = []
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            tasks.append(asyncio.create_task(one(prompt(rng))))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        stop.set()
        if ctl is not None:
            await ctl
            assert floors and all(floors), "a pushed table went below the quality floor"
    return latencies, routes


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def test_burst_shifts_to_fallback_and_keeps_p99_under_slo(served: Served) -> None:
    assert count_tokens(prompt(random.Random(0))) == PROMPT_WORDS
    capacity = served.large.requests_per_s(PROMPT_WORDS, OUTPUT_TOKENS)
    assert 8.0 < capacity < 12.0
    rate = 2.0 * capacity
    # large only: a table that routes nothing
    push(served, next_version(), share=0.0, threshold=-1e9)
    lat_large, routes_large = asyncio.run(burst(served, rate, 4.0, control=False))
    assert set(routes_large) == {"big"}
    time.sleep(1.0)
    # ours: the controller loop measures load each period and pushes the LP's table
    lat_ours, routes_ours = asyncio.run(burst(served, rate, 4.0, control=True))
    share = routes_ours.count("small") / len(routes_ours)
    print(f"burst {rate:.1f} req/s for 4 s: large only p99 {p99(lat_large):.2f} s; routed p99 {p99(lat_ours):.2f} s "
          f"with {share:.0%} on the fallback (SLO {SLO_P99_S} s)")
    assert p99(lat_large) > SLO_P99_S, f"large only should violate the SLO: p99 {p99(lat_large):.2f}s"
    assert p99(lat_ours) <= SLO_P99_S, f"p99 {p99(lat_ours):.2f}s with {share:.0%} on the fallback"
    # the plan needs ~1 - 0.8 * capacity / rate = 60% on the fallback once it reacts
    assert 0.35 < share < 0.85
