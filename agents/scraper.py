"""Engine metrics: scrape the Prometheus text that vLLM, SGLang and Ray Serve expose.

Parsing uses ``prometheus_client.parser`` (the real exposition format). Counters become rates
and histograms become p50/p99 over the interval between two scrapes (bucket deltas, linear
interpolation inside a bucket, as PromQL's ``histogram_quantile`` does); the first scrape of a
target uses the cumulative values. Series of one metric with different labels (per model, per
finish reason) are summed. Per-expert token counts use our own counter
``wattplane_expert_tokens_total{layer, expert}``, which an engine plug-in exports, because no
engine publishes them in Prometheus form today.

Prompt-phase share (``prefill_fraction``), which the power policy needs to split a GPU's draw into
prompt bursts (~TDP) and the token phase. Estimator::

    prefill_fraction = min(1, prompt tokens/s over the interval / prefill speed)
    prefill speed    = request_prompt_tokens_sum / request_prefill_time_seconds_sum   (cumulative)

The numerator is ``vllm:prompt_tokens_total``, counted as prompts are processed, so it follows
the interval closely; the per-request histograms (``vllm:request_prompt_tokens``,
``vllm:request_prefill_time_seconds``) are observed when requests finish, too late to time the
interval, but their long-run ratio is the engine's prompt speed (tokens per second of prefill),
and both count the same finished requests. Prompts prefilled together in one step each count the
whole step as their prefill time, so the speed reads low and the share high: an upper bound,
the safe side for a power budget. Without those histograms (SGLang, older engines) a target's
configured ``prefill_tokens_per_s`` is used; with neither the share stays unset (unknown).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from protos.wattplane.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

# Our field -> the sample names engines use for it (first found wins).
GAUGES: dict[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs", "ray_serve_replica_processing_queries"),
    "waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "ray_serve_deployment_queued_queries"),
    "kv_cache": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"),
}
COUNTERS: dict[str, tuple[str, ...]] = {
    "requests": (
        "vllm:request_success_total",
        "sglang:num_requests_total",
        "ray_serve_deployment_request_counter_total",
    ),
    "prompt_tokens": ("vllm:prompt_tokens_total", "sglang:prompt_tokens_total"),
    "generation_tokens": ("vllm:generation_tokens_total", "sglang:generation_tokens_total"),
    # histogram sums, cumulative like counters: the prefill-speed estimate (module docstring)
    "request_prompt_tokens": ("vllm:request_prompt_tokens_sum",),
    "prefill_seconds": ("vllm:request_prefill_time_seconds_sum",),
}
HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds"),
    "tpot": (
        "vllm:time_per_output_token_seconds",
        "vllm:inter_token_latency_seconds",
        "sglang:time_per_output_token_seconds",
        "sglang:inter_token_latency_seconds",
    ),
}
EXPERT_TOKENS = "wattplane_expert_tokens_total"


@dataclass(frozen=True)
class EngineTarget:
    deployment: str
    url: str
    replica: str = ""
    gpus: tuple[int, ...] = ()  # devices this engine runs on (its prompt share is theirs); empty: all
    prefill_tokens_per_s: float = 0.0  # prompt speed when the engine does not export prefill timings


@dataclass
class _Parsed:
    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)  # hist -> le -> cumulative count
    experts: dict[tuple[int, int], float] = field(default_factory=dict)


def parse_exposition(text: str) -> _Parsed:
    """Pick the samples we use out of one Prometheus text exposition."""
    wanted_gauges = {name: key for key, names in GAUGES.items() for name in names}
    wanted_counters = {name: key for key, names in COUNTERS.items() for name in names}
    wanted_hist = {name + "_bucket": key for key, names in HISTOGRAMS.items() for name in names}
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # key -> metric name -> sum
    buckets: dict[str, dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    out = _Parsed()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted_gauges:
                sums[wanted_gauges[s.name]][s.name] += s.value
            elif s.name in wanted_counters:
                sums[wanted_counters[s.name]][s.name] += s.value
            elif s.name in wanted_hist:
                le = float(s.labels.get("le", "+Inf"))
                buckets[wanted_hist[s.name]][s.name][le] += s.value
            elif s.name == EXPERT_TOKENS:
                slot = (int(s.labels.get("layer", "0")), int(s.labels.get("expert", "0")))
                out.experts[slot] = out.experts.get(slot, 0.0) + s.value
    for key, names in GAUGES.items():
        first = next((n for n in names if n in sums[key]), None)
        if first is not None:
            out.gauges[key] = sums[key][first]
    for key, names in COUNTERS.items():
        first = next((n for n in names if n in sums[key]), None)
        if first is not None:
            out.counters[key] = sums[key][first]
    for key, names in HISTOGRAMS.items():
        first = next((n + "_bucket" for n in names if n + "_bucket" in buckets[key]), None)
        if first is not None:
            out.buckets[key] = dict(buckets[key][first])
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """PromQL-style quantile from cumulative ``le -> count`` buckets; None without observations."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    total = buckets[edges[-1]]
    rank = q * total
    prev_edge, prev_count = 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if math.isinf(edge):
                return prev_edge  # beyond the last finite bucket: its upper edge is the best we know
            if count == prev_count:
                return edge
            return prev_edge + (edge - prev_edge) * (rank - prev_count) / (count - prev_count)
        prev_edge, prev_count = edge, count
    return prev_edge


class EngineScraper:
    """Turns successive scrapes of each target into ``ReplicaSample`` rates and percentiles."""

    def __init__(
        self,
        targets: Sequence[EngineTarget],
        *,
        fetch: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 0.5,
    ) -> None:
        self.targets = list(targets)
        self._fetch = fetch or (lambda url: _http_get(url, timeout_s))
        self._clock = clock
        self._previous: dict[str, tuple[float, _Parsed]] = {}
        self.errors = 0

    async def scrape(self) -> list[pb.ReplicaSample]:
        """One sample per reachable target; an unreachable engine is logged and skipped."""
        out = []
        for target in self.targets:
            try:
                text = await asyncio.to_thread(self._fetch, target.url)
                out.append(self.sample(target, text))
            except Exception as exc:  # transport error or a malformed page: the engine may be restarting
                self.errors += 1
                log.debug("scrape of %s failed: %s", target.url, exc)
        return out

    def prefill_by_gpu(self, replicas: Sequence[pb.ReplicaSample], devices: Sequence[int]) -> dict[int, float]:
        """Each device's prompt share from the replica running on it (a target's ``gpus``; none: all).

        Every device of a tensor-parallel replica runs the same prompt passes, so they share its
        estimate; a device claimed by two replicas takes the higher share (the safe side).
        """
        by_replica = {r.replica: r.prefill_fraction for r in replicas if r.HasField("prefill_fraction")}
        out: dict[int, float] = {}
        for target in self.targets:
            share = by_replica.get(target.replica or target.url)
            if share is None:
                continue
            for gpu in target.gpus or tuple(devices):
                out[gpu] = max(out.get(gpu, 0.0), share)
        return out

    def sample(self, target: EngineTarget, text: str) -> pb.ReplicaSample:
        now = self._clock()
        cur = parse_exposition(text)
        prev_t, prev = self._previous.get(target.url, (None, None))
        self._previous[target.url] = (now, cur)
        dt = (now - prev_t) if prev_t is not None else 0.0
        sample = pb.ReplicaSample(
            deployment=target.deployment,
            replica=target.replica or target.url,
            queue_depth=max(0.0, cur.gauges.get("waiting", 0.0)),
            running_batch=max(0.0, cur.gauges.get("running", 0.0)),
            kv_cache_use=min(1.0, max(0.0, cur.gauges.get("kv_cache", 0.0))),
        )
        if prev is not None and dt > 0:
            sample.requests_per_s = _rate(cur.counters, prev.counters, "requests", dt)
            sample.input_tokens_per_s = _rate(cur.counters, prev.counters, "prompt_tokens", dt)
            sample.output_tokens_per_s = _rate(cur.counters, prev.counters, "generation_tokens", dt)
            share = prefill_fraction(sample.input_tokens_per_s, cur.counters, target.prefill_tokens_per_s)
            if share is not None:
                sample.prefill_fraction = share
        for key, p50_field, p99_field in (
            ("ttft", "ttft_p50_ms", "ttft_p99_ms"),
            ("tpot", "tpot_p50_ms", "tpot_p99_ms"),
        ):
            window = _delta_buckets(cur.buckets.get(key, {}), prev.buckets.get(key, {}) if prev else {})
            for q, name in ((0.5, p50_field), (0.99, p99_field)):
                v = histogram_quantile(q, window)
                if v is not None:
                    setattr(sample, name, v * 1000.0)
        if cur.experts:
            layers = 1 + max(layer for layer, _ in cur.experts)
            experts = 1 + max(e for _, e in cur.experts)
            for layer in range(layers):
                row = sample.expert_tokens.add(layer=layer)
                for e in range(experts):
                    now_v = cur.experts.get((layer, e), 0.0)
                    before = prev.experts.get((layer, e), 0.0) if prev else 0.0
                    row.tokens.append(int(max(0.0, now_v - before if now_v >= before else now_v)))
        return sample


def prefill_fraction(prompt_tokens_per_s: float, counters: dict[str, float], fallback_speed: float = 0.0
                     ) -> float | None:
    """Share of the interval spent in prompt passes (module docstring); None when it cannot be told."""
    seconds = counters.get("prefill_seconds", 0.0)
    tokens = counters.get("request_prompt_tokens", 0.0)
    speed = tokens / seconds if seconds > 0 and tokens > 0 else fallback_speed
    if speed <= 0 or not math.isfinite(speed):
        return None
    return min(1.0, max(0.0, prompt_tokens_per_s / speed))


def _rate(cur: dict[str, float], prev: dict[str, float], key: str, dt: float) -> float:
    if key not in cur:
        return 0.0
    delta = cur[key] - prev.get(key, 0.0)
    if delta < 0:  # counter reset (engine restart): count from zero
        delta = cur[key]
    return delta / dt


def _delta_buckets(cur: dict[float, float], prev: dict[float, float]) -> dict[float, float]:
    if not prev or any(cur.get(le, 0.0) < v for le, v in prev.items()):
        return cur  # first scrape or a reset: use the cumulative histogram
    return {le: v - prev.get(le, 0.0) for le, v in cur.items()}


def _http_get(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read(8 * 1024 * 1024)
        return body.decode("utf-8", errors="replace")
