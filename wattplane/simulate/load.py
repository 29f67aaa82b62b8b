"""Request load per deployment and time step: synthetic (calibrated) or replayed from a real trace.

Bundled scenarios must run on a fresh clone, so their load is synthetic, calibrated once from the
Azure LLM inference trace 2023, conversation service (``AzureLLMInferenceTrace_conv.csv``, 19,366
requests over 3,502 s, Splitwise ISCA'24, CC-BY 4.0; ``../shared/data/azure-llm-2023/``):

* arrivals: 5.53 requests/s on average; per-second counts have variance/mean 1.39, explained by a
  slowly varying rate — the per-minute counts' log has sd 0.22 with lag-1 autocorrelation 0.85.
  We draw a per-minute log-rate AR(1) (phi 0.85, stationary sd 0.22), interpolate it linearly and
  draw Poisson counts per step (the trace's inter-arrival CV is 1.09, close to Poisson's 1.0);
* prompt tokens: lognormal, log-mean 6.633, log-sd 0.985 (mean 1,155, median 1,020, p99 4,142),
  clipped to the trace's range [2, 14,050];
* output tokens: lognormal, log-mean 5.019, log-sd 0.859 (mean 211, median 129, p99 601), clipped
  to [7, 1,000]; prompt and output lengths are nearly independent (log correlation 0.09), so they
  are drawn independently.

A scenario may instead replay the trace itself (``load.trace``); ``rate_scale`` replays
``ceil(scale)`` copies of it with seeded time offsets (the last copy thinned), which keeps the
trace's own burstiness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wattplane.simulate.scenario import Burst, Scenario, SyntheticLoad, TraceLoad

# -- constants measured on AzureLLMInferenceTrace_conv.csv (see module docstring) ---------------
AZURE_CONV_REQUESTS_PER_S = 5.53
AZURE_CONV_MINUTE_LOG_SD = 0.22
AZURE_CONV_MINUTE_AR1 = 0.85
AZURE_CONV_INPUT_LOG_MU = 6.633
AZURE_CONV_INPUT_LOG_SD = 0.985
AZURE_CONV_INPUT_RANGE = (2, 14050)
AZURE_CONV_OUTPUT_LOG_MU = 5.019
AZURE_CONV_OUTPUT_LOG_SD = 0.859
AZURE_CONV_OUTPUT_RANGE = (7, 1000)


@dataclass(frozen=True)
class LoadSeries:
    """Arrivals per (deployment, step): request counts and their summed prompt/output tokens."""

    deployments: tuple[str, ...]
    step_s: float
    requests: np.ndarray  # [deployment, step]
    input_tokens: np.ndarray
    output_tokens: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.requests.shape[1])


def generate_load(scenario: Scenario, seed: int, base_dir: Path | None = None, data_dir: str | None = None
                  ) -> LoadSeries:
    """The load of a scenario for the given seed (same seed, same load)."""
    steps = math.ceil(scenario.duration_s / scenario.step_s)
    names = tuple(d.name for d in scenario.deployments)
    shares = np.array([d.load.share for d in scenario.deployments], dtype=float)
    shares = shares / shares.sum() if shares.sum() > 0 else shares
    rng = np.random.default_rng(seed)
    if scenario.load.synthetic is not None:
        counts = _synthetic_counts(scenario.load.synthetic, names, shares, steps, scenario.step_s, rng)
        bursts = scenario.load.synthetic.bursts
    else:
        assert scenario.load.trace is not None
        counts = _trace_counts(scenario.load.trace, shares, steps, scenario.step_s, rng, base_dir, data_dir)
        bursts = scenario.load.trace.bursts
        if bursts:  # bursts on a replayed trace: thin/boost counts by the factor
            counts = rng.poisson(counts * _burst_factor(bursts, names, steps, scenario.step_s)).astype(float)
    inp = np.zeros_like(counts)
    out = np.zeros_like(counts)
    for k, d in enumerate(scenario.deployments):
        inp[k] = _token_sums(counts[k], AZURE_CONV_INPUT_LOG_MU, AZURE_CONV_INPUT_LOG_SD, AZURE_CONV_INPUT_RANGE,
                             rng) * d.load.input_scale
        out[k] = _token_sums(counts[k], AZURE_CONV_OUTPUT_LOG_MU, AZURE_CONV_OUTPUT_LOG_SD,
                             AZURE_CONV_OUTPUT_RANGE, rng) * d.load.output_scale
    return LoadSeries(deployments=names, step_s=scenario.step_s, requests=counts, input_tokens=inp,
                      output_tokens=out)


def _synthetic_counts(spec: SyntheticLoad, names: tuple[str, ...], shares: np.ndarray, steps: int, step_s: float,
                      rng: np.random.Generator) -> np.ndarray:
    t = np.arange(steps) * step_s
    sd = AZURE_CONV_MINUTE_LOG_SD if spec.rate_cv is None else math.sqrt(math.log1p(spec.rate_cv**2))
    minutes = int(t[-1] // 60) + 2 if steps else 2
    rates = np.empty((len(shares), steps))
    for k, share in enumerate(shares):
        # AR(1) log-rate per minute, stationary sd `sd`, mean-corrected so the average rate is kept
        z = np.empty(minutes)
        z[0] = rng.normal(0.0, sd)
        innov = sd * math.sqrt(1 - AZURE_CONV_MINUTE_AR1**2)
        for m in range(1, minutes):
            z[m] = AZURE_CONV_MINUTE_AR1 * z[m - 1] + rng.normal(0.0, innov)
        mult = np.exp(np.interp(t / 60.0, np.arange(minutes), z) - sd * sd / 2)
        rates[k] = spec.requests_per_s * share * mult
    if spec.diurnal_amplitude:
        rates *= 1 + spec.diurnal_amplitude * np.sin(2 * np.pi * t / spec.diurnal_period_s)
    rates *= _burst_factor(spec.bursts, names, steps, step_s)
    return rng.poisson(rates * step_s).astype(float)


def _burst_factor(bursts: tuple[Burst, ...], names: tuple[str, ...], steps: int, step_s: float) -> np.ndarray:
    """Per (deployment, step) rate multiplier of the scenario's bursts (ramped in/out over ``ramp_s``)."""
    f = np.ones((len(names), steps))
    t = np.arange(steps) * step_s
    for b in bursts:
        ramp = np.ones(steps)
        if b.ramp_s > 0:
            ramp = np.clip(np.minimum(t - b.at_s, b.at_s + b.duration_s - t) / b.ramp_s, 0.0, 1.0)
        inside = (t >= b.at_s) & (t < b.at_s + b.duration_s)
        g = np.where(inside, 1 + (b.factor - 1) * ramp, 1.0)
        for k, name in enumerate(names):
            if not b.deployments or name in b.deployments:
                f[k] *= g
    return f


def _token_sums(counts: np.ndarray, mu: float, sd: float, bounds: tuple[int, int],
                rng: np.random.Generator) -> np.ndarray:
    total = int(counts.sum())
    if total == 0:
        return np.zeros_like(counts)
    if total > 20_000_000:  # central limit: sum of n draws ~ normal(n*mean, n*var)
        draws = np.clip(rng.lognormal(mu, sd, 200_000), *bounds)
        m, v = draws.mean(), draws.var()
        out: np.ndarray = np.maximum(counts * m + np.sqrt(counts * v) * rng.standard_normal(counts.shape), 0.0)
        return out
    draws = np.clip(np.round(rng.lognormal(mu, sd, total)), *bounds)
    csum = np.concatenate(([0.0], np.cumsum(draws)))
    ends = np.cumsum(counts.astype(np.int64))
    starts = ends - counts.astype(np.int64)
    return csum[ends] - csum[starts]


def _trace_counts(spec: TraceLoad, shares: np.ndarray, steps: int, step_s: float, rng: np.random.Generator,
                  base_dir: Path | None, data_dir: str | None) -> np.ndarray:
    from wattplane.datasets import data_file, load_azure_trace

    path = resolve_path(spec.path, base_dir, data_dir, data_file)
    requests = load_azure_trace(path)
    t = np.array([r.t for r in requests])
    span = float(t[-1]) + 1.0 if len(t) else 1.0
    horizon = steps * step_s
    copies = math.ceil(spec.rate_scale)
    counts = np.zeros((len(shares), steps))
    for c in range(copies):
        keep = np.ones(len(t), dtype=bool)
        if c == copies - 1 and spec.rate_scale < copies:
            keep = rng.random(len(t)) < spec.rate_scale - (copies - 1)
        offset = 0.0 if c == 0 else rng.uniform(0, span)
        times = (t[keep] + offset) % span
        reps = math.ceil(horizon / span)
        times = np.concatenate([times + r * span for r in range(reps)])
        times = times[times < horizon]
        who = rng.choice(len(shares), size=len(times), p=shares)
        idx = (times // step_s).astype(int)
        np.add.at(counts, (who, idx), 1.0)
    return counts


def resolve_path(text: str, base_dir: Path | None, data_dir: str | None, data_file: object) -> Path:
    """``data:REL`` -> under the data directory; relative -> beside the scenario file."""
    if text.startswith("data:"):
        return data_file(text.removeprefix("data:"), data_dir)  # type: ignore[operator, no-any-return]
    p = Path(text)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


__all__ = ["AZURE_CONV_REQUESTS_PER_S", "LoadSeries", "generate_load", "resolve_path"]
