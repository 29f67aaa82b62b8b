"""Forecast: EWMA, bursts, up-fast/down-slow stabilisation, state round-trip."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.forecast import ForecastConfig, ForecastState, forecast_demand, observe
from policies.snapshot import ModelDeployment, ModelShape, ServingTelemetry, Snapshot

DEP = ModelDeployment(name="chat", model=ModelShape(name="llama-3.1-8b", params_b=8, active_params_b=8))


def snap(t: float, out: float, inp: float | None = None) -> Snapshot:
    serving = (ServingTelemetry(deployment="chat", output_tokens_per_s=out,
                                input_tokens_per_s=out * 4 if inp is None else inp, requests_per_s=out / 200),)
    return Snapshot(now=t, deployments=(DEP,), serving=serving)


def run(series: list[float], config: ForecastConfig, dt: float = 30.0) -> list[float]:
    state = ForecastState()
    out = []
    for i, v in enumerate(series):
        f = forecast_demand(snap(i * dt, v), config, state)
        state = ForecastState.model_validate_json(f.state.model_dump_json())  # persisted as JSON between cycles
        out.append(f.demand[0].output_tokens_per_s)
    return out


def test_up_fast() -> None:
    f = run([100, 100, 100, 400], ForecastConfig())
    assert f[-1] == 400


def test_down_slow_holds_for_the_window_then_decays() -> None:
    cfg = ForecastConfig(scale_down_window_s=300, half_life_s=60)
    f = run([1000] * 5 + [100] * 20, cfg)
    # within 300 s of the drop (10 cycles of 30 s) the forecast holds the old peak
    assert all(v == 1000 for v in f[5:15])
    # then it decays towards the new level, monotonically, and not below it
    tail = f[15:]
    assert tail[0] < 1000
    assert all(a >= b for a, b in itertools.pairwise(tail))
    assert tail[-1] >= 100 and tail[-1] < 200


def test_burst_resets_the_level() -> None:
    cfg = ForecastConfig(burst_ratio=1.5)
    state = None
    state, burst = observe(state, 0, (400, 100, 1), cfg)
    assert not burst
    state, burst = observe(state, 30, (1000, 300, 3), cfg)
    assert burst
    assert state.level == (1000, 300, 3)
    state, burst = observe(state, 60, (440, 110, 1.1), cfg)
    assert not burst


def test_no_flapping_on_noise() -> None:
    """Alternating +-20% noise: the forecast never drops, so replicas never flap down."""
    f = run([100 if i % 2 else 120 for i in range(30)], ForecastConfig())
    assert all(b >= a for a, b in itertools.pairwise(f))
    assert max(f) == 120


def test_missing_telemetry_keeps_last_forecast_and_unknown_is_zero() -> None:
    cfg = ForecastConfig()
    f1 = forecast_demand(snap(0, 500), cfg, ForecastState())
    f2 = forecast_demand(Snapshot(now=30, deployments=(DEP,)), cfg, f1.state)
    assert f2.demand[0].output_tokens_per_s == 500
    f0 = forecast_demand(Snapshot(now=0, deployments=(DEP,)), cfg, ForecastState())
    assert f0.demand[0].output_tokens_per_s == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e5, allow_nan=False), min_size=1, max_size=30))
def test_forecast_bounded_by_window_extremes(series: list[float]) -> None:
    """The forecast is never above the largest observation nor below the smallest of the down window."""
    cfg = ForecastConfig()
    f = run(series, cfg)
    for i, v in enumerate(f):
        seen = series[: i + 1]
        assert v <= max(seen) + 1e-6
        window = series[max(0, i - 10): i + 1]  # 300 s at 30 s cycles
        assert v >= min(window) - 1e-6
    assert run(series, cfg) == f  # deterministic
