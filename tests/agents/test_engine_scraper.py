"""Engine metrics in real Prometheus text format (vLLM and SGLang names) become replica samples."""

from __future__ import annotations

import asyncio

import pytest

from agents.scraper import EngineScraper, EngineTarget, histogram_quantile, parse_exposition

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0)


def vllm_text(requests: int, prompt: int, generated: int, ttft: dict[float, int], experts: list[list[int]]) -> str:
    """A vLLM-style /metrics page; ``ttft`` maps bucket upper edge -> observations in that bucket."""
    labels = 'engine="0",model_name="meta-llama/Llama-3.1-70B-Instruct"'
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{labels}}} 12.0",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{labels}}} 3.0",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{labels}}} 0.42",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{{labels},finished_reason="stop"}} {requests - 10}.0',
        f'vllm:request_success_total{{{labels},finished_reason="length"}} 10.0',
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{labels}}} {prompt}.0",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{labels}}} {generated}.0",
        "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
        "# TYPE vllm:time_to_first_token_seconds histogram",
    ]
    cumulative = 0
    for edge in BUCKETS:
        cumulative += ttft.get(edge, 0)
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{{labels},le="{edge}"}} {cumulative}.0')
    lines.append(f'vllm:time_to_first_token_seconds_bucket{{{labels},le="+Inf"}} {cumulative}.0')
    lines.append(f"vllm:time_to_first_token_seconds_count{{{labels}}} {cumulative}.0")
    lines.append(f"vllm:time_to_first_token_seconds_sum{{{labels}}} 1.0")
    lines.append("# TYPE wattplane_expert_tokens_total counter")
    for layer, row in enumerate(experts):
        for e, n in enumerate(row):
            lines.append(f'wattplane_expert_tokens_total{{layer="{layer}",expert="{e}"}} {n}.0')
    return "\n".join(lines) + "\n"


def test_two_scrapes_give_rates_window_percentiles_and_expert_deltas() -> None:
    now = [100.0]
    pages = iter(
        [
            vllm_text(110, 50_000, 8_000, {0.05: 900}, [[10, 20], [5, 5]]),
            vllm_text(150, 62_000, 9_000, {0.05: 900, 0.25: 100}, [[30, 20], [5, 45]]),
        ]
    )
    scraper = EngineScraper(
        [EngineTarget("llama", "http://engine/metrics", "r0")], fetch=lambda _u: next(pages), clock=lambda: now[0]
    )
    first = asyncio.run(scraper.scrape())[0]
    assert (first.running_batch, first.queue_depth, first.kv_cache_use) == (12, 3, 0.42)
    assert first.requests_per_s == 0  # no rate from a single scrape
    now[0] += 2.0
    second = asyncio.run(scraper.scrape())[0]
    assert second.requests_per_s == pytest.approx(40 / 2)  # both finish reasons summed
    assert second.input_tokens_per_s == pytest.approx(12_000 / 2)
    assert second.output_tokens_per_s == pytest.approx(1_000 / 2)
    # this window's 100 observations all fell in (0.1, 0.25]: interpolated inside that bucket
    assert second.ttft_p50_ms == pytest.approx(1000 * (0.1 + 0.15 * 0.5))
    assert second.ttft_p99_ms == pytest.approx(1000 * (0.1 + 0.15 * 0.99))
    assert [list(layer.tokens) for layer in second.expert_tokens] == [[20, 0], [0, 40]]
    assert (second.deployment, second.replica) == ("llama", "r0")


def test_sglang_names_and_an_unreachable_engine() -> None:
    page = "\n".join(
        [
            "# TYPE sglang:num_running_reqs gauge",
            'sglang:num_running_reqs{model_name="qwen"} 7.0',
            "# TYPE sglang:num_queue_reqs gauge",
            'sglang:num_queue_reqs{model_name="qwen"} 2.0',
            "# TYPE sglang:token_usage gauge",
            'sglang:token_usage{model_name="qwen"} 0.5',
        ]
    )

    def fetch(url: str) -> str:
        if "down" in url:
            raise ConnectionRefusedError(url)
        return page + "\n"

    scraper = EngineScraper(
        [EngineTarget("qwen", "http://down/metrics"), EngineTarget("qwen", "http://up/metrics")], fetch=fetch
    )
    samples = asyncio.run(scraper.scrape())
    assert len(samples) == 1 and scraper.errors == 1
    assert (samples[0].running_batch, samples[0].queue_depth, samples[0].kv_cache_use) == (7, 2, 0.5)


def test_histogram_quantile_matches_promql_interpolation() -> None:
    buckets = {0.1: 10.0, 0.5: 30.0, float("inf"): 40.0}
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)  # rank 10 ends the first bucket
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 10 / 20)
    assert histogram_quantile(0.99, buckets) == 0.5  # in +Inf: the last finite edge
    assert histogram_quantile(0.5, {1.0: 0.0}) is None
    assert parse_exposition("").gauges == {}
