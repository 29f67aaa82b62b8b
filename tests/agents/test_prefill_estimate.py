"""The prompt-phase share: estimated from vLLM's Prometheus text, known by the simulated source, sent to the hub."""

from __future__ import annotations

import asyncio

import pytest

from agents.agent import _gpu_sample
from agents.scraper import EngineScraper, EngineTarget, prefill_fraction
from agents.sources import DeviceSample
from agents.sources.simulated import SimulatedSource, constant_load

LABELS = 'engine="0",model_name="meta-llama/Llama-3.1-70B-Instruct"'
PREFILL_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0)


def vllm_page(prompt_total: float, finished: int, prompt_sum: float, prefill_sum: float) -> str:
    """A vLLM v1 /metrics page (names, types and label sets as vLLM exports them) for the prefill estimate."""
    lines = [
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{LABELS}}} {prompt_total}",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{LABELS}}} 1000.0",
        "# HELP vllm:request_prompt_tokens Number of prefill tokens processed.",
        "# TYPE vllm:request_prompt_tokens histogram",
    ]
    for edge in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000):
        lines.append(f'vllm:request_prompt_tokens_bucket{{{LABELS},le="{edge}.0"}} {finished if edge >= 2000 else 0}.0')
    lines += [
        f'vllm:request_prompt_tokens_bucket{{{LABELS},le="+Inf"}} {finished}.0',
        f"vllm:request_prompt_tokens_count{{{LABELS}}} {finished}.0",
        f"vllm:request_prompt_tokens_sum{{{LABELS}}} {prompt_sum}",
        "# HELP vllm:request_prefill_time_seconds Histogram of time spent in PREFILL phase for request.",
        "# TYPE vllm:request_prefill_time_seconds histogram",
    ]
    for edge in PREFILL_BUCKETS:
        lines.append(f'vllm:request_prefill_time_seconds_bucket{{{LABELS},le="{edge}"}} {finished}.0')
    lines += [
        f'vllm:request_prefill_time_seconds_bucket{{{LABELS},le="+Inf"}} {finished}.0',
        f"vllm:request_prefill_time_seconds_count{{{LABELS}}} {finished}.0",
        f"vllm:request_prefill_time_seconds_sum{{{LABELS}}} {prefill_sum}",
    ]
    return "\n".join(lines) + "\n"


def scrape_twice(first: str, second: str, dt: float, target: EngineTarget) -> list[float | None]:
    now = [0.0]
    pages = iter([first, second])
    scraper = EngineScraper([target], fetch=lambda _u: next(pages), clock=lambda: now[0])
    out: list[float | None] = []
    for _ in range(2):
        sample = asyncio.run(scraper.scrape())[0]
        out.append(sample.prefill_fraction if sample.HasField("prefill_fraction") else None)
        now[0] += dt
    return out


def test_vllm_prompt_rate_over_its_prefill_speed() -> None:
    # 400 finished requests: 800,000 prompt tokens in 80 s of prefill -> 10,000 tok/s of prompt speed.
    # In the 2 s interval 6,000 prompt tokens were processed: 3,000 tok/s -> 30% of the time in prompts.
    first = vllm_page(800_000.0, 400, 800_000.0, 80.0)
    second = vllm_page(806_000.0, 402, 804_000.0, 80.4)
    shares = scrape_twice(first, second, 2.0, EngineTarget("llama", "http://e/metrics", "r0"))
    assert shares[0] is None  # one scrape gives no rate
    assert shares[1] == pytest.approx(3_000 / (804_000 / 80.4))


def test_share_saturates_and_is_unknown_without_timings_or_configured_speed() -> None:
    assert prefill_fraction(50_000.0, {"request_prompt_tokens": 1e6, "prefill_seconds": 100.0}) == 1.0
    assert prefill_fraction(0.0, {"request_prompt_tokens": 1e6, "prefill_seconds": 100.0}) == 0.0
    assert prefill_fraction(3_000.0, {}) is None  # no timings (SGLang, an old vLLM)
    assert prefill_fraction(3_000.0, {}, fallback_speed=6_000.0) == pytest.approx(0.5)  # configured speed
    assert prefill_fraction(3_000.0, {"prefill_seconds": 0.0}) is None  # nothing finished yet


def test_engine_share_goes_to_the_engines_gpus_and_the_source_wins() -> None:
    scraper = EngineScraper([EngineTarget("a", "u1", "r1", gpus=(0, 1)), EngineTarget("b", "u2", "r2")],
                            fetch=lambda _u: "")
    from protos.wattplane.v1 import agent_pb2 as pb

    replicas = [pb.ReplicaSample(deployment="a", replica="r1", prefill_fraction=0.3),
                pb.ReplicaSample(deployment="b", replica="r2", prefill_fraction=0.1)]
    shares = scraper.prefill_by_gpu(replicas, [0, 1, 2, 3])
    assert shares == {0: 0.3, 1: 0.3, 2: 0.1, 3: 0.1}  # r2 names no GPUs: all; overlap takes the higher
    # an engine without an estimate leaves its devices unknown
    assert scraper.prefill_by_gpu([pb.ReplicaSample(deployment="a", replica="r1")], [0, 1]) == {}
    known = DeviceSample(0, 500.0, 1.0, 0.5, 10.0, 1500.0, 50.0, 700.0, prefill_fraction=0.2)
    assert _gpu_sample(known, 0.9).prefill_fraction == pytest.approx(0.2)
    unknown = DeviceSample(0, 500.0, 1.0, 0.5, 10.0, 1500.0, 50.0, 700.0)
    assert _gpu_sample(unknown, 0.4).prefill_fraction == pytest.approx(0.4)
    assert not _gpu_sample(unknown, None).HasField("prefill_fraction")


def test_simulated_source_reports_its_phase_mix() -> None:
    src = SimulatedSource(gpus=2, load=constant_load(0.25, 0.5))
    assert [s.prefill_fraction for s in src.sample()] == [0.25, 0.25]


def test_engine_flag_names_the_gpus_an_engine_runs_on() -> None:
    from agents.main import parse_engine

    t = parse_engine("ns/llama:0,1,2,3=http://127.0.0.1:8000/metrics")
    assert t is not None and t.gpus == (0, 1, 2, 3)
    assert (t.deployment, t.url) == ("ns/llama", "http://127.0.0.1:8000/metrics")
    t = parse_engine("ns/llama=http://127.0.0.1:8000/metrics")
    assert t is not None and t.gpus == ()  # all of the node's GPUs
    assert parse_engine("ns/llama:a=http://x") is None
    assert parse_engine("ns/llama:-1=http://x") is None
    assert parse_engine("no-url") is None
