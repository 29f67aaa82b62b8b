"""A phase-based GPU power model for LLM inference, calibrated from public measurements.

Why phases: a prompt (prefill) pass is compute-bound and drives a GPU to its power limit, while
the token (decode) phase is memory-bound and draws less, rising with the decode batch. So power
caps hurt prompt throughput far more than token throughput, and a cap a fifth to a third below
TDP costs little end-to-end (Splitwise, ISCA'24; POLCA, 2023). Every constant below cites the
rows of ``../shared/data/power/`` it comes from; the model is shared by the power policy, its
POLCA baseline, the benchmark and the simulated GPU source, so all of them agree on physics.

Vocabulary. ``prefill_fraction`` is the share of an interval the GPU spends in prompt passes;
``decode_utilisation`` is the load of the token phase in the rest of the interval: output tokens/s
over the GPU's saturated-batch output tokens/s (0 means idle, 1 a full batch). A cap ``cap_w`` is a board power limit;
``None`` means uncapped. Values are clamped to the device's legal range ``[min_power_w,
max_power_w]``.
"""

from __future__ import annotations

import math

from policies.snapshot import AcceleratorSpec

# -- calibration (fractions of TDP) -----------------------------------------------------------

# Prompt phase draws ~TDP. splitwise_perf_model.csv, a100-80gb rows: peak_power 1.02
# (llama2-70b, prompt 2048, batch 1), 1.05 (llama2-70b, 4096 x 1), 1.02 (bloom-176b, 2048 x 1);
# normalised to the device's rating, so we take 1.0.
PROMPT_POWER_FRACTION = 1.0

# Token phase at a saturated batch. mlenergy-v3 meta-llama__Llama-3.1-70B-Instruct, H100 x 4,
# max_num_seqs 1024: avg_power_watts 2548 -> 637 W per GPU = 0.91 x 700 W TDP.
TOKEN_PEAK_POWER_FRACTION = 0.91

# Token-phase power rises steeply with the first sequences, then flattens. Same file, per GPU
# against output tokens/s relative to the max_num_seqs 1024 row (6827 tok/s): 8 seqs -> 0.069 of
# saturated throughput at 441 W (0.63 TDP); 64 -> 0.37 at 500 W (0.71); 128 -> 0.57 at 546 W
# (0.78); 512 -> 0.87 at 623 W (0.89); 1024 -> 1.0 at 637 W (0.91). Least squares over all 12 H100
# rows of idle + (peak - idle) * utilisation ** g gives g = 0.25 (worst row off by 0.07 TDP).
TOKEN_UTILISATION_EXPONENT = 0.25

# Throughput under a cap. splitwise_perf_model.csv: h100-80gb-pcap vs h100-80gb rows have
# prompt_time x1.30 (e.g. llama2-70b 2048 x 1: 280 vs 215 ms; bloom-176b 512 x 8: 816 vs 628 ms)
# and token_time x1.00 at every batch size. The Splitwise paper caps those machines at 70% of
# rated power (the CSV itself does not record the level: an assumption, stated). A phase that
# wants more power than the cap runs at speed (cap / demand) ** beta with
# 0.7 ** beta = 1 / 1.30 -> beta = ln(1/1.30) / ln(0.7) = 0.736 (concave: speed >= power share).
CAP_SPEED_EXPONENT = math.log(1 / 1.30) / math.log(0.7)

# Typical prompt-phase share of busy time on a conversation service, used when a caller does not
# know its mix: Azure conv trace (median 1020 context, 129 generated tokens) on Splitwise's
# h100-80gb llama2-70b timings (prompt ~215 ms per 2k tokens, ~33 ms per token at batch 1-16
# where ~8 requests share a token iteration) gives ~0.15.
DEFAULT_PREFILL_FRACTION = 0.15

# Maximum SM clocks (MHz) by accelerator model prefix, from public spec sheets, for the
# frequency-lock form of a cap. Unknown models use DEFAULT_MAX_CLOCK_MHZ.
MAX_CLOCK_MHZ: dict[str, float] = {
    "H200": 1980.0,
    "H100": 1980.0,
    "B200": 1965.0,
    "A100": 1410.0,
    "L40S": 2520.0,
    "L4": 2040.0,
    "A10": 1695.0,
    "T4": 1590.0,
    "V100": 1530.0,
}
DEFAULT_MAX_CLOCK_MHZ = 1800.0
MIN_CLOCK_FRACTION = 0.25  # drivers refuse to lock clocks far below this


def legal_cap_w(spec: AcceleratorSpec, cap_w: float | None) -> float | None:
    """A cap clamped to the device's legal power-limit range (``None`` stays uncapped)."""
    if cap_w is None:
        return None
    return min(max(cap_w, spec.min_power_w), spec.max_power_w)


def phase_power_w(spec: AcceleratorSpec, prefill_fraction: float, decode_utilisation: float) -> tuple[float, float]:
    """Uncapped (prompt-phase draw, token-phase draw) in W for this load."""
    u = _unit(decode_utilisation)
    idle = spec.idle_fraction * spec.tdp_w
    prompt = PROMPT_POWER_FRACTION * spec.tdp_w if prefill_fraction > 0 else idle
    rise = u**TOKEN_UTILISATION_EXPONENT if u else 0.0
    token = idle + max(TOKEN_PEAK_POWER_FRACTION * spec.tdp_w - idle, 0.0) * rise
    return prompt, token


def gpu_power_w(
    spec: AcceleratorSpec, prefill_fraction: float, decode_utilisation: float, cap_w: float | None = None
) -> float:
    """Average board power (W) over an interval with this phase mix; never above a cap.

    Idle (both arguments 0) is ``spec.idle_fraction * TDP``. Under a cap each phase draws
    ``min(demand, cap)`` (the GPU lowers clocks until it fits), so the average is at most the cap.
    """
    p = _unit(prefill_fraction)
    prompt, token = phase_power_w(spec, p, decode_utilisation)
    cap = legal_cap_w(spec, cap_w)
    if cap is not None:
        prompt, token = min(prompt, cap), min(token, cap)
    return p * prompt + (1 - p) * token


def load_from_power(spec: AcceleratorSpec, power_w: float) -> float:
    """Decode load (0..1) that would draw ``power_w`` in the token phase: the curve's inverse.

    Draw at or above the saturated token-phase level reads as a fully loaded GPU; draw at idle
    reads as 0. Lets a policy tell a busy GPU (where a cap builds a queue) from a light one.
    """
    idle = spec.idle_fraction * spec.tdp_w
    span = TOKEN_PEAK_POWER_FRACTION * spec.tdp_w - idle
    if span <= 0 or power_w >= idle + span:
        return 1.0
    if power_w <= idle:
        return 0.0
    return float(((power_w - idle) / span) ** (1 / TOKEN_UTILISATION_EXPONENT))


def phase_speed(demand_w: float, cap_w: float | None) -> float:
    """Relative speed of a phase that wants ``demand_w`` under ``cap_w`` (1.0 when it fits)."""
    if cap_w is None or demand_w <= cap_w or demand_w <= 0:
        return 1.0
    return float((cap_w / demand_w) ** CAP_SPEED_EXPONENT)


def mix_power_w(prefill_fraction: float, prompt_w: float, token_w: float, cap_w: float | None = None) -> float:
    """Average draw of a prompt/token mix whose phases draw ``prompt_w`` / ``token_w``, each clipped at a cap.

    A cap above the average but below the prompt phase still saves power: it clips the prompt
    bursts (POLCA's and Splitwise's observation), which an average-only model cannot see.
    """
    p = _unit(prefill_fraction)
    if cap_w is None:
        return p * prompt_w + (1 - p) * token_w
    return p * min(prompt_w, cap_w) + (1 - p) * min(token_w, cap_w)


def mix_speed(prefill_fraction: float, prompt_w: float, token_w: float, cap_w: float | None) -> float:
    """Relative throughput of that mix under a cap: each phase's time stretched by its own slowdown."""
    p = _unit(prefill_fraction)
    return 1.0 / (p / phase_speed(prompt_w, cap_w) + (1 - p) / phase_speed(token_w, cap_w))


def throughput_fraction(
    spec: AcceleratorSpec,
    cap_w: float | None,
    prefill_fraction: float = DEFAULT_PREFILL_FRACTION,
    decode_utilisation: float = 1.0,
) -> float:
    """Throughput at a cap relative to uncapped (1.0 uncapped); concave, non-decreasing in the cap.

    Work is split by time share: prompt passes (``prefill_fraction``) and token iterations at the
    given decode load, each slowed by :func:`phase_speed`. The defaults describe a busy GPU with a
    conversation-service mix, the case that loses most; a lightly loaded GPU whose token phase
    draws less than the cap loses only on its prompt passes.
    """
    cap = legal_cap_w(spec, cap_w)
    if cap is None:
        return 1.0
    p = _unit(prefill_fraction)
    prompt, token = phase_power_w(spec, max(p, 1e-9), decode_utilisation)
    slowed_time = p / phase_speed(prompt, cap) + (1 - p) / phase_speed(token, cap)
    return 1.0 / slowed_time


def clock_for_cap(spec: AcceleratorSpec, cap_w: float | None) -> float:
    """SM clock (MHz) to lock for the frequency form of a cap (the max clock when uncapped).

    Compute-bound speed scales with clock, so the clock that holds a fully loaded GPU (drawing
    TDP) at ``cap_w`` is ``max_clock * phase_speed(TDP, cap)``.
    """
    max_clock = max_clock_mhz(spec)
    cap = legal_cap_w(spec, cap_w)
    if cap is None:
        return max_clock
    return max_clock * max(phase_speed(spec.tdp_w, cap), MIN_CLOCK_FRACTION)


def max_clock_mhz(spec: AcceleratorSpec) -> float:
    """Maximum SM clock of the accelerator model (longest matching prefix of the table)."""
    name = spec.model.upper()
    best = ""
    for prefix in MAX_CLOCK_MHZ:
        if name.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return MAX_CLOCK_MHZ[best] if best else DEFAULT_MAX_CLOCK_MHZ


def _unit(x: float) -> float:
    return min(max(x, 0.0), 1.0)
