"""Demand forecast per deployment: EWMA + burst detection + HPA-style stabilisation windows.

Placement must not chase noise (every replica change costs a cold start) and must not lag a
burst. Per deployment and per metric (input tokens/s, output tokens/s, requests/s):

* ``level`` is an EWMA with a time-based weight ``a = 1 - exp(-dt * ln2 / half_life_s)``, so
  irregular cycle lengths weigh correctly;
* a **burst** is an observation above ``burst_ratio * level`` (and above ``burst_floor``): the
  level jumps to the observation, so the decay starts from the burst, not from the past;
* the raw recommendation is ``max(level, observation)`` (never plan below what is being served);
* stabilisation, as the Kubernetes HPA does it: the forecast rises only to the *minimum* raw
  recommendation of the last ``scale_up_window_s`` (0 = immediately) and falls only to the
  *maximum* of the last ``scale_down_window_s`` (default 300 s: down slow).

The function is pure: the caller passes the previous :class:`ForecastState` (from the last plan)
and gets the next one back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from pydantic import Field

from policies.snapshot import Demand, Frozen, NonNegFloat, PosFloat, ServingTelemetry, Snapshot

Triple = tuple[float, float, float]  # (input tokens/s, output tokens/s, requests/s)


class ForecastConfig(Frozen):
    half_life_s: PosFloat = 120.0
    burst_ratio: PosFloat = 1.5
    burst_floor: NonNegFloat = 1.0  # output tokens/s below which nothing counts as a burst
    scale_up_window_s: NonNegFloat = 0.0
    scale_down_window_s: NonNegFloat = 300.0


class SeriesState(Frozen):
    """One deployment's memory: EWMA level, last forecast, and raw recommendations in the windows."""

    t: float
    level: Triple
    forecast: Triple
    history: tuple[tuple[float, Triple], ...] = ()  # (time, raw recommendation), oldest first


class ForecastState(Frozen):
    series: Mapping[str, SeriesState] = Field(default_factory=dict)


class Forecast(Frozen):
    demand: tuple[Demand, ...]
    state: ForecastState
    bursts: tuple[str, ...] = ()  # deployments whose latest observation was a burst


def observe(prev: SeriesState | None, t: float, obs: Triple, config: ForecastConfig) -> tuple[SeriesState, bool]:
    """Fold one observation at time ``t`` into a deployment's series; return the new state and burst flag."""
    if prev is None:
        raw = obs
        return SeriesState(t=t, level=obs, forecast=obs, history=((t, raw),)), False
    dt = max(t - prev.t, 0.0)
    a = 1.0 - math.exp(-dt * math.log(2) / config.half_life_s)
    burst = obs[1] > config.burst_floor and obs[1] > config.burst_ratio * prev.level[1]
    level = obs if burst else _triple(prev.level[i] + a * (obs[i] - prev.level[i]) for i in range(3))
    raw = _triple(max(level[i], obs[i]) for i in range(3))
    horizon = max(config.scale_up_window_s, config.scale_down_window_s)
    history = (*tuple(h for h in prev.history if t - h[0] <= horizon), (t, raw))
    up_window = [r for (ht, r) in history if t - ht <= config.scale_up_window_s]
    down_window = [r for (ht, r) in history if t - ht <= config.scale_down_window_s]
    forecast = []
    for i in range(3):
        up = min(r[i] for r in up_window)
        down = max(r[i] for r in down_window)
        cur = prev.forecast[i]
        if cur < up:
            cur = up
        if cur > down:
            cur = down
        forecast.append(cur)
    return SeriesState(t=t, level=level, forecast=_triple(forecast), history=history), burst


def forecast_demand(snapshot: Snapshot, config: ForecastConfig, state: ForecastState) -> Forecast:
    """Forecast every deployment's demand from ``snapshot.serving`` at ``snapshot.now``.

    Deployments without telemetry keep their last forecast (or appear with zero demand if never
    seen); deployments that disappeared are dropped from the state.
    """
    serving: dict[str, ServingTelemetry] = {s.deployment: s for s in snapshot.serving}
    series: dict[str, SeriesState] = {}
    demand: list[Demand] = []
    bursts: list[str] = []
    for d in snapshot.deployments:
        prev = state.series.get(d.name)
        obs_s = serving.get(d.name)
        if obs_s is None:
            if prev is not None:
                series[d.name] = prev
            f = prev.forecast if prev is not None else (0.0, 0.0, 0.0)
        else:
            obs = (obs_s.input_tokens_per_s, obs_s.output_tokens_per_s, obs_s.requests_per_s)
            new, burst = observe(prev, snapshot.now, obs, config)
            series[d.name] = new
            f = new.forecast
            if burst:
                bursts.append(d.name)
        demand.append(Demand(deployment=d.name, input_tokens_per_s=f[0], output_tokens_per_s=f[1],
                             requests_per_s=f[2]))
    return Forecast(demand=tuple(demand), state=ForecastState(series=series), bursts=tuple(bursts))


def _triple(values: Iterable[float]) -> Triple:
    v = list(values)
    return float(v[0]), float(v[1]), float(v[2])
