"""Profiles: lookup rules, scaling laws, overrides, and the built-in constants against the public data."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from policies.profiles import (
    DECODE_POWER_FRACTION,
    DEFAULT_PROFILES,
    REFERENCE_GPUS,
    Profile,
    canonical_gpu,
    canonical_model,
    cap_throughput_factor,
    default_table,
    weights_fit,
)
from policies.snapshot import ModelDeployment, ModelShape, Parallelism

H100 = REFERENCE_GPUS["h100"]
A100 = REFERENCE_GPUS["a100"]
L4 = REFERENCE_GPUS["l4"]


@pytest.mark.parametrize(
    ("raw", "canon"),
    [
        ("meta-llama/Llama-3.1-70B-Instruct", "llama-3.1-70b"),
        ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "qwen3-235b-a22b"),
        ("google/gemma-3-27b-it", "gemma-3-27b"),
        ("llama-3.1-8b", "llama-3.1-8b"),
    ],
)
def test_canonical_model(raw: str, canon: str) -> None:
    assert canonical_model(raw) == canon


@pytest.mark.parametrize(("raw", "canon"), [("H100-80GB", "h100"), ("nvidia-a100-80gb", "a100"), ("L4", "l4"),
                                            ("h100-80gb-pcap", "h100")])
def test_canonical_gpu(raw: str, canon: str) -> None:
    assert canonical_gpu(raw) == canon


def test_exact_row_is_returned_unchanged() -> None:
    table = default_table()
    p = table.lookup("meta-llama/Llama-3.1-70B-Instruct", H100, tp=4)
    assert p is not None
    assert p.output_tokens_per_s == pytest.approx(2510.5)
    assert "ML.ENERGY" in p.source and "scaled" not in p.source


def test_device_scaling_is_sublinear_per_device() -> None:
    table = default_table()
    p4 = table.lookup("llama-3.1-70b", H100, tp=4)
    p8 = table.lookup("llama-3.1-70b", H100, tp=8)
    assert p4 is not None and p8 is not None
    ratio = p8.output_tokens_per_s / p4.output_tokens_per_s
    assert 1.0 < ratio < 2.0
    assert ratio == pytest.approx(2**0.9)
    assert p8.power_w == p4.power_w  # per device


def test_gpu_scaling_follows_bandwidth_flops_and_tdp() -> None:
    table = default_table()
    h = table.lookup("llama-3.1-70b", H100, tp=4)
    a = table.lookup("llama-3.1-70b", A100, tp=4)
    assert h is not None and a is not None
    # Splitwise llama2-70b TP4 batch 16: A100 token time 48.7 ms vs H100 32.8 ms -> decode ratio ~0.675
    assert a.output_tokens_per_s / h.output_tokens_per_s == pytest.approx(32.84 / 48.66, rel=0.03)
    assert a.input_tokens_per_s / h.input_tokens_per_s == pytest.approx(0.50, rel=0.05)
    assert a.power_w == pytest.approx(h.power_w * A100.tdp_w / H100.tdp_w)
    assert a.power_w <= A100.max_power_w
    assert "scaled" in a.source


def test_closest_reference_gpu_by_bandwidth_is_used() -> None:
    """L4 is far closer to H100 than to B200 in bandwidth, so H100 rows are the reference."""
    p = default_table().lookup("llama-3.1-8b", L4, tp=1)
    assert p is not None
    assert "H100" in p.source


def test_unknown_model_gets_estimate_or_none() -> None:
    table = default_table()
    assert table.lookup("my-model", H100, tp=1) is None
    dense = table.lookup("my-model", H100, tp=1, active_params_b=8.0, params_b=8.0)
    moe = table.lookup("my-moe", H100, tp=1, active_params_b=8.0, params_b=80.0, is_moe=True)
    assert dense is not None and moe is not None
    assert dense.source.startswith("estimate")
    # the estimate is conservative against the measured 8B row (K=15 vs 24 measured)
    measured = table.lookup("llama-3.1-8b", H100)
    assert measured is not None
    assert dense.output_tokens_per_s < measured.output_tokens_per_s
    assert moe.output_tokens_per_s < dense.output_tokens_per_s


def test_overrides_replace_by_key_and_keep_the_rest() -> None:
    table = default_table()
    mine = Profile(model="Llama-3.1-70B-Instruct", gpu="H100-80GB", tp=4, output_tokens_per_s=1000,
                   input_tokens_per_s=5000, power_w=500)
    new = table.with_overrides([mine])
    assert len(new.profiles) == len(table.profiles)
    p = new.lookup("llama-3.1-70b", H100, tp=4)
    assert p is not None and p.output_tokens_per_s == 1000
    # the original table is a value: unchanged
    q = table.lookup("llama-3.1-70b", H100, tp=4)
    assert q is not None and q.output_tokens_per_s == pytest.approx(2510.5)
    # an override for a new model adds a row
    other = mine.model_copy(update={"model": "custom"})
    assert len(new.with_overrides([other]).profiles) == len(table.profiles) + 1


def test_weights_fit_leaves_room_for_kv_cache() -> None:
    assert weights_fit(70, 4, H100)
    assert not weights_fit(70, 1, H100)
    assert weights_fit(8, 1, L4)  # 16 GB of bf16 weights on a 24 GiB card
    assert not weights_fit(14, 1, L4)  # 28 GB does not
    assert weights_fit(14, 2, L4)


def test_for_deployment_checks_memory() -> None:
    table = default_table()
    big = ModelDeployment(name="x", model=ModelShape(name="llama-3.1-70b", params_b=70, active_params_b=70),
                          parallelism=Parallelism(tp=1))
    assert table.for_deployment(big, H100) is None
    ok = big.model_copy(update={"parallelism": Parallelism(tp=4)})
    assert table.for_deployment(ok, H100) is not None


def test_cap_factor() -> None:
    assert cap_throughput_factor(1.0) == (1.0, 1.0)
    dec, pre = cap_throughput_factor(0.7)
    assert dec > 0.98  # decode is memory-bound: Splitwise's pcap token time x1.00
    assert pre == pytest.approx(1 / 1.30, rel=0.02)  # Splitwise h100-80gb-pcap prompt time x1.30
    d5, p5 = cap_throughput_factor(0.5)
    assert d5 < dec and p5 < pre
    # a lighter token phase (less power wanted) keeps full speed under a deeper cap
    assert cap_throughput_factor(0.5, decode_power_fraction=0.45)[0] == 1.0


@pytest.mark.parametrize("cap", [0.3, 0.45, 0.6, 0.7, 0.85, 1.0])
def test_cap_factor_is_the_power_models_curve(cap: float) -> None:
    """One curve: placement/routing factors equal the power model's throughput at the same cap."""
    from policies.power_model import phase_power_w, throughput_fraction

    dec, pre = cap_throughput_factor(cap)
    assert pre == pytest.approx(throughput_fraction(H100, cap * H100.tdp_w, prefill_fraction=1.0))
    # a token phase drawing what the profile's operating point draws
    u = next(u / 1000 for u in range(1, 1001)
             if phase_power_w(H100, 0.0, u / 1000)[1] >= DECODE_POWER_FRACTION * H100.tdp_w)
    assert dec == pytest.approx(throughput_fraction(H100, cap * H100.tdp_w, 0.0, u), abs=0.01)


def test_capacity_mixes_prefill_and_decode() -> None:
    p = Profile(model="m", gpu="h100", output_tokens_per_s=1000, input_tokens_per_s=10000, power_w=500)
    assert p.tokens_per_s_capacity(0.0) == pytest.approx(1000)
    assert p.tokens_per_s_capacity(10.0) == pytest.approx(500)


def _data_dir() -> Path | None:
    from wattplane.datasets import default_data_dir

    d = default_data_dir()
    if d is None or not (d / "power" / "mlenergy-v3").is_dir():
        msg = "ML.ENERGY v3 data missing (ml-energy/leaderboard public/data/models/); see ../shared/data/README.md"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return d


def test_builtin_constants_match_the_public_data() -> None:
    """Every built-in row is what the loader derives from the cited ML.ENERGY file."""
    d = _data_dir()
    from wattplane.profile_data import load_mlenergy, load_splitwise

    loaded = {p.key: p for p in load_mlenergy(d).profiles}
    for p in DEFAULT_PROFILES:
        q = loaded[p.key]
        assert q.output_tokens_per_s == pytest.approx(p.output_tokens_per_s, abs=0.1), p.key
        assert q.power_w == pytest.approx(p.power_w, abs=0.1), p.key
        assert q.input_tokens_per_s == pytest.approx(p.input_tokens_per_s, rel=1e-3), p.key
    # the scaling exponents reproduce Splitwise's A100 / H100 ratios
    sw = load_splitwise(d)
    a, h = sw[("llama2-70b", "a100-80gb", 4, 512, 16)], sw[("llama2-70b", "h100-80gb", 4, 512, 16)]
    decode_ratio = h.token_ms / a.token_ms
    assert decode_ratio == pytest.approx((A100.hbm_gbps / H100.hbm_gbps) ** 0.79, rel=0.08)
    a1, h1 = sw[("llama2-70b", "a100-80gb", 4, 2048, 1)], sw[("llama2-70b", "h100-80gb", 4, 2048, 1)]
    assert h1.prompt_ms / a1.prompt_ms == pytest.approx((A100.bf16_tflops / H100.bf16_tflops) ** 0.60, rel=0.05)
    cap = sw[("llama2-70b", "h100-80gb-pcap", 4, 2048, 1)]
    assert cap.token_ms == pytest.approx(h1.token_ms, rel=1e-6)
    assert h1.prompt_ms / cap.prompt_ms == pytest.approx(cap_throughput_factor(0.7)[1], rel=0.03)
    assert math.isfinite(decode_ratio)


def _p99s(prof: Profile, u: float, replicas: int) -> tuple[float, float]:
    """The latency model written out independently: (TTFT p99, TPOT p99) at utilisation ``u``."""
    ttft = prof.ttft_ms * (1 + -math.log(0.01) * u / (1 - u) / math.sqrt(replicas))
    tpot = prof.tpot_ms * (0.6 + 0.8 * u)
    return ttft, tpot


@pytest.mark.parametrize(("model", "size", "tp", "gpu"), [("llama-3.1-70b", 70, 4, H100), ("llama-3.1-8b", 8, 1, A100),
                                                          ("llama-3.1-70b", 70, 4, A100)])
@pytest.mark.parametrize("replicas", [1, 4])
@pytest.mark.parametrize(("ttft_slo", "tpot_slo"), [(2000.0, 100.0), (600.0, 40.0), (300.0, 60.0)])
def test_slo_utilisation_is_the_edge_of_the_latency_model(model: str, size: float, tp: int, gpu: object,
                                                          replicas: int, ttft_slo: float, tpot_slo: float) -> None:
    from policies.profiles import slo_utilisation

    dep = ModelDeployment(name="d", model=ModelShape(name=model, params_b=size, active_params_b=size),
                          parallelism=Parallelism(tp=tp))
    prof = default_table().for_deployment(dep, gpu)  # type: ignore[arg-type]
    assert prof is not None
    u = slo_utilisation(prof, ttft_slo, tpot_slo, replicas)
    assert 0.0 <= u <= 1.0
    if 0.0 < u < 1.0:
        ttft, tpot = _p99s(prof, u * 0.999, replicas)
        assert ttft <= ttft_slo and tpot <= tpot_slo  # within the SLO just below the edge
        ttft, tpot = _p99s(prof, min(u * 1.01, 0.999), replicas)
        assert ttft > ttft_slo or tpot > tpot_slo  # and out of it just above
    # pooling more replicas never lowers the utilisation the SLO allows
    assert slo_utilisation(prof, ttft_slo, tpot_slo, replicas * 4) >= u


def test_slo_utilisation_rules_out_a_profile_that_misses_even_idle() -> None:
    from policies.profiles import slo_utilisation

    dep = ModelDeployment(name="d", model=ModelShape(name="llama-3.1-8b", params_b=8, active_params_b=8))
    l4 = default_table().for_deployment(dep, L4)
    assert l4 is not None and l4.tpot_ms * 0.6 > 100.0  # median ITL on an L4 is far above the SLO
    assert slo_utilisation(l4, 2000.0, 100.0, 8) == 0.0
    h100 = default_table().for_deployment(dep, H100)
    assert h100 is not None and slo_utilisation(h100, 2000.0, 100.0, 1) > 0.5
