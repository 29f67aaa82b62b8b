"""Throughput at SLO and power at load per (model, GPU type, TP degree).

Placement, power capping, routing and the simulator all need the same answer to "how much can one
replica of model M on GPU G with TP t serve, and what does it draw?". A :class:`ProfileTable` holds
measured :class:`Profile` rows and answers :meth:`ProfileTable.lookup` for any combination:

1. an exact row (canonical model, canonical GPU, devices per replica) wins;
2. the same model and GPU with another device count scales per device::

       out(t') = out(t) * (t' / t) ** TP_EXPONENT          (TP_EXPONENT = 0.9)

   (per-device throughput roughly constant; the 0.9 leaves room for collective overhead -
   Splitwise llama2-70b on H100 at batch 16: token time 32.8 ms at TP4 vs 34.2 ms at TP8);
3. the same model measured on another GPU (the reference whose HBM bandwidth is closest)
   scales by the target's spec::

       out_target   = out_ref   * (hbm_target   / hbm_ref)   ** HBM_EXPONENT     (0.79)
       in_target    = in_ref    * (tflops_target / tflops_ref) ** FLOPS_EXPONENT  (0.60)
       power_target = power_ref / tdp_ref * tdp_target   (same fraction of TDP)

   Decode is memory-bound and prefill compute-bound. Both exponents are fitted to Splitwise's
   A100-80GB vs H100-80GB rows for llama2-70b TP4 (``splitwise_perf_model.csv``): token time
   48.7 vs 32.8 ms at batch 16 (ratio 0.675 = (2039/3350) ** 0.79) and prompt time 403 vs 201 ms
   for 2048 tokens (ratio 0.50 = (312/989) ** 0.60);
4. a model never measured gets a first-principles estimate, per device::

       out = K * hbm_gbps / active_params_b     (K = 15 dense, 4.5 MoE)
       in  = PREFILL_MFU * bf16_tflops * 1e12 / (2 * active_params_b * 1e9)   (PREFILL_MFU = 0.35)

   K is the low end of the ML.ENERGY v3 H100 rows at p99 ITL <= 100 ms (dense: Llama-3.1-70B 14,
   Qwen3-32B 20, Llama-3.1-8B 24 with active+KV params; MoE: Qwen3-30B-A3B and Qwen3-235B-A22B
   about 4.5 with ``active + 0.1 * total`` params, hence the MoE form uses that denominator).
   PREFILL_MFU: Splitwise llama2-70b H100 TP4, 2048-token prompt in 201 ms = 36% of bf16 peak.

A replica only gets a profile when its weights fit: ``params_b * bytes_per_param <=
WEIGHT_MEMORY_FRACTION * devices * memory_gib * 1.0737`` (GiB -> GB), leaving at least 15% of
device memory for KV cache. Power caps reduce capacity through :func:`cap_throughput_factor`.

The built-in table (:data:`DEFAULT_PROFILES`) is calibrated from the public data in
``../shared/data/power`` so the control plane runs on a fresh clone; every constant cites its
file and row. ``wattplane.profile_data`` rebuilds rows from those files (and a test checks the
constants against it). Users override per model (a ConfigMap) with
:meth:`ProfileTable.with_overrides`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from pydantic import Field

from policies.power_model import PROMPT_POWER_FRACTION, phase_speed
from policies.snapshot import AcceleratorSpec, Frozen, ModelDeployment, NonNegFloat, PosFloat, PosInt

TP_EXPONENT = 0.9
HBM_EXPONENT = 0.79
FLOPS_EXPONENT = 0.60
PREFILL_MFU = 0.35
K_DENSE = 15.0
K_MOE = 4.5
MOE_TOTAL_WEIGHT = 0.1
WEIGHT_MEMORY_FRACTION = 0.85
GIB_TO_GB = 1.073741824
CALIBRATION_TPOT_P99_MS = 100.0  # built-in rows: best throughput whose p99 ITL stays under this
TYPICAL_PROMPT_TOKENS = 1024  # TTFT estimate: a prompt of this size prefilling alone (Azure conv median ~1k)
SPLITWISE_CAP_FRACTION = 0.7  # the cap level assumed for Splitwise's h100-80gb-pcap rows
# Token-phase draw at a profile's operating point, x TDP: ML.ENERGY v3 Llama-3.1-70B H100 x4 at
# max_num_seqs 64 (the built-in row below) averages 2001.5 W over 4 GPUs = 500 W = 0.715 TDP. A cap
# above it leaves decode at full speed (Splitwise's pcap token time x1.00), a deeper one slows it.
DECODE_POWER_FRACTION = 2001.5 / 4 / 700.0
# The latency model placement plans with and the simulator serves with (one model, so a plan that
# is SLO-feasible here is SLO-feasible there):
#   TTFT p99 = ttft_ms * (1 + TTFT_P99_WAIT_FACTOR * u / (1 - u) / sqrt(n))   (M/M/1 p99 wait, n-replica pooling)
#   TPOT p99 = tpot_ms * (TPOT_P99_IDLE + TPOT_P99_SLOPE * u)                  (batch fills with utilisation u)
TTFT_P99_WAIT_FACTOR = -math.log(0.01)
TPOT_P99_IDLE, TPOT_P99_SLOPE = 0.6, 0.8  # p99 / median ITL: 0.6 near idle, 1.4 with a full batch


class Profile(Frozen):
    """What one replica of ``model`` on ``tp`` x ``pp`` devices of ``gpu`` serves at its SLO.

    Throughputs are per replica; powers are per device. ``source`` says where the figures came
    from (a data file and row, a scaling rule, or an override) so a plan can be audited.
    """

    model: str = Field(min_length=1)
    gpu: str = Field(min_length=1)
    tp: PosInt = 1
    pp: PosInt = 1
    output_tokens_per_s: PosFloat  # decode throughput at the TPOT SLO, per replica
    input_tokens_per_s: PosFloat  # prefill throughput, per replica
    power_w: PosFloat  # average draw per device at that load
    idle_power_w: NonNegFloat = 0.0  # draw per device with no load (0: use 20% of power_w's TDP)
    ttft_ms: PosFloat = 500.0  # prefill of a typical prompt alone
    tpot_ms: PosFloat = 50.0  # median inter-token latency at that load
    source: str = "override"

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    @property
    def key(self) -> tuple[str, str, int]:
        return canonical_model(self.model), canonical_gpu(self.gpu), self.devices

    def tokens_per_s_capacity(self, input_share: float) -> float:
        """Output tokens/s of capacity when each output token comes with ``input_share`` input tokens.

        A replica spends time on prefill and decode; with ``i`` input tokens per output token the
        time per output token is ``1/out + i/in``.
        """
        return 1.0 / (1.0 / self.output_tokens_per_s + max(input_share, 0.0) / self.input_tokens_per_s)


def slo_utilisation(profile: Profile, ttft_slo_ms: float, tpot_slo_ms: float, replicas: int = 1) -> float:
    """Highest utilisation at which ``replicas`` pooled replicas keep both p99s within the SLO.

    0 when the profile misses the SLO even idle (e.g. llama-3.1-8b on an L4: 253 ms median ITL
    against a 100 ms TPOT SLO), 1 when it meets it at full load. Placement scales a replica's
    capacity by this so it never counts on load a replica cannot serve within the SLO.
    """
    tpot_ratio = tpot_slo_ms / profile.tpot_ms
    if tpot_ratio < TPOT_P99_IDLE or ttft_slo_ms < profile.ttft_ms:
        return 0.0
    u_tpot = (tpot_ratio - TPOT_P99_IDLE) / TPOT_P99_SLOPE
    k = (ttft_slo_ms / profile.ttft_ms - 1.0) * math.sqrt(max(replicas, 1)) / TTFT_P99_WAIT_FACTOR
    u_ttft = k / (1.0 + k)
    return float(min(1.0, u_tpot, u_ttft))


def canonical_model(name: str) -> str:
    """``meta-llama/Llama-3.1-70B-Instruct`` -> ``llama-3.1-70b``: org, case and chat suffixes dropped."""
    n = name.strip().lower().rsplit("/", 1)[-1]
    for suffix in ("-fp8", "-2507", "-instruct", "-thinking", "-it", "-chat", "-hf", "-bf16"):
        while n.endswith(suffix):
            n = n[: -len(suffix)]
    return n


def canonical_gpu(name: str) -> str:
    """``H100-80GB`` / ``nvidia-h100`` / ``h100-80gb-pcap`` -> ``h100``."""
    n = name.strip().lower()
    n = n.removeprefix("nvidia-").removeprefix("nvidia ")
    return n.replace(" ", "-").split("-", 1)[0]


# -- reference accelerators (public spec sheets: dense bf16 TFLOP/s, HBM GB/s, TDP W) ---------------
REFERENCE_GPUS: dict[str, AcceleratorSpec] = {
    "h100": AcceleratorSpec(model="H100-80GB", memory_gib=80, bf16_tflops=989, hbm_gbps=3350, tdp_w=700,
                            min_power_w=200, max_power_w=700),
    "b200": AcceleratorSpec(model="B200", memory_gib=180, bf16_tflops=2250, hbm_gbps=8000, tdp_w=1000,
                            min_power_w=300, max_power_w=1000),
    "a100": AcceleratorSpec(model="A100-80GB", memory_gib=80, bf16_tflops=312, hbm_gbps=2039, tdp_w=400,
                            min_power_w=150, max_power_w=400),
    "l40s": AcceleratorSpec(model="L40S", memory_gib=48, bf16_tflops=362, hbm_gbps=864, tdp_w=350,
                            min_power_w=100, max_power_w=350),
    "l4": AcceleratorSpec(model="L4", memory_gib=24, bf16_tflops=121, hbm_gbps=300, tdp_w=72,
                          min_power_w=40, max_power_w=72),
}


def _ml(model: str, gpu: str, tp: int, out: float, power_total: float, itl_ms: float, row: str) -> Profile:
    """A built-in row from an ML.ENERGY v3 configuration (power there is the total over ``tp`` GPUs)."""
    spec = REFERENCE_GPUS[gpu]
    inp = tp * PREFILL_MFU * spec.bf16_tflops * 1e12 / (2 * _ACTIVE[model] * 1e9)
    return Profile(
        model=model, gpu=gpu, tp=tp, output_tokens_per_s=out, input_tokens_per_s=round(inp, 1),
        power_w=round(power_total / tp, 1), idle_power_w=round(spec.idle_fraction * spec.tdp_w, 1),
        ttft_ms=round(1000 * TYPICAL_PROMPT_TOKENS / inp, 1), tpot_ms=itl_ms, source=f"ML.ENERGY v3 {row}",
    )


# active parameters (B) of the built-in models, for the prefill estimate (ML.ENERGY file headers)
_ACTIVE: dict[str, float] = {
    "llama-3.1-8b": 8.0, "llama-3.1-70b": 70.0, "qwen3-32b": 32.0, "qwen3-30b-a3b": 3.0,
    "qwen3-235b-a22b": 22.0, "llama-3.1-405b": 405.0,
}

# Built-in table. ML.ENERGY rows: ``mlenergy-v3/<file>`` configuration with the highest
# output_throughput_tokens_per_sec whose p99_itl_ms <= 100 (CALIBRATION_TPOT_P99_MS); the row is
# named by (file, gpu_model x num_gpus, max_num_seqs). Figures: output tok/s, avg_power_watts (total), median ITL.
# Regenerate with ``python -m wattplane.profile_data``.
DEFAULT_PROFILES: tuple[Profile, ...] = (
    # meta-llama__Llama-3.1-8B-Instruct__lm-arena-chat.json
    _ml("llama-3.1-8b", "b200", 1, 9571.4, 576.5, 50.2, "Llama-3.1-8B B200 x1 seqs=512"),
    _ml("llama-3.1-8b", "h100", 1, 9248.0, 686.5, 37.7, "Llama-3.1-8B H100 x1 seqs=384"),
    # meta-llama__Llama-3.1-70B-Instruct__lm-arena-chat.json
    _ml("llama-3.1-70b", "b200", 2, 2597.8, 1810.8, 21.7, "Llama-3.1-70B B200 x2 seqs=64"),
    _ml("llama-3.1-70b", "h100", 4, 2510.5, 2001.5, 22.4, "Llama-3.1-70B H100 x4 seqs=64"),
    # Qwen__Qwen3-32B__lm-arena-chat.json
    _ml("qwen3-32b", "b200", 1, 6444.0, 971.3, 36.0, "Qwen3-32B B200 x1 seqs=256"),
    _ml("qwen3-32b", "h100", 1, 960.5, 599.4, 28.8, "Qwen3-32B H100 x1 seqs=32"),
    _ml("qwen3-32b", "h100", 2, 3905.3, 1073.7, 29.7, "Qwen3-32B H100 x2 seqs=128"),
    # Qwen__Qwen3-30B-A3B-Instruct-2507__lm-arena-chat.json (MoE; the x2 row is EP 2)
    _ml("qwen3-30b-a3b", "b200", 1, 8872.0, 910.3, 26.3, "Qwen3-30B-A3B B200 x1 seqs=256"),
    _ml("qwen3-30b-a3b", "h100", 1, 2658.8, 494.2, 32.1, "Qwen3-30B-A3B H100 x1 seqs=96"),
    _ml("qwen3-30b-a3b", "h100", 2, 9650.0, 953.2, 47.4, "Qwen3-30B-A3B H100 x2 seqs=512"),
    # Qwen__Qwen3-235B-A22B-Instruct-2507__lm-arena-chat.json (MoE, EP = num_gpus)
    _ml("qwen3-235b-a22b", "b200", 4, 2603.3, 3143.0, 47.1, "Qwen3-235B-A22B B200 x4 seqs=128"),
    _ml("qwen3-235b-a22b", "b200", 8, 5403.3, 5077.6, 43.5, "Qwen3-235B-A22B B200 x8 seqs=256"),
    _ml("qwen3-235b-a22b", "h100", 8, 2626.4, 3903.5, 46.6, "Qwen3-235B-A22B H100 x8 seqs=128"),
    # meta-llama__Llama-3.1-405B-Instruct__lm-arena-chat.json
    _ml("llama-3.1-405b", "b200", 8, 1052.4, 6734.6, 28.0, "Llama-3.1-405B B200 x8 seqs=32"),
)


def cap_throughput_factor(
    cap_fraction: float, decode_power_fraction: float = DECODE_POWER_FRACTION
) -> tuple[float, float]:
    """(decode, prefill) throughput multipliers for a GPU capped at ``cap_fraction`` of its TDP.

    One curve for the whole code base: each phase runs at
    :func:`policies.power_model.phase_speed` of (what it wants to draw, the cap), the curve the
    power policy and the simulator use. The prompt phase wants ~TDP (``PROMPT_POWER_FRACTION``),
    so a 70% cap stretches prompt time by 1.30, as in Splitwise's ``h100-80gb-pcap`` rows; the
    token phase wants ``decode_power_fraction`` of TDP (default: the profile's own operating
    point, :data:`DECODE_POWER_FRACTION`) and slows only when the cap is below that.
    """
    c = max(cap_fraction, 0.0)
    return phase_speed(decode_power_fraction, c), phase_speed(PROMPT_POWER_FRACTION, c)


def weights_fit(params_b: float, devices: int, accelerator: AcceleratorSpec, bytes_per_param: float = 2.0) -> bool:
    """Do the weights fit on ``devices`` devices with at least 15% of memory left for KV cache?"""
    return params_b * bytes_per_param <= WEIGHT_MEMORY_FRACTION * devices * accelerator.memory_gib * GIB_TO_GB


class ProfileTable(Frozen):
    """Measured profiles plus the documented scaling rules (module docstring) for everything else."""

    profiles: tuple[Profile, ...] = ()
    reference_gpus: Mapping[str, AcceleratorSpec] = Field(default_factory=lambda: dict(REFERENCE_GPUS))

    def with_overrides(self, overrides: Iterable[Profile]) -> ProfileTable:
        """A new table where each override replaces the row with the same (model, GPU, devices) key.

        Overrides for a model drop none of its other rows, so a user who measured one
        configuration (a ConfigMap per model) still gets scaled figures for the rest, now derived
        from their own measurement when it is the closest reference.
        """
        new = list(overrides)
        keys = {p.key for p in new}
        kept = tuple(p for p in self.profiles if p.key not in keys)
        return self.model_copy(update={"profiles": kept + tuple(new)})

    def measured(self, model: str) -> tuple[Profile, ...]:
        m = canonical_model(model)
        return tuple(p for p in self.profiles if canonical_model(p.model) == m)

    def spec(self, gpu: str) -> AcceleratorSpec | None:
        return self.reference_gpus.get(canonical_gpu(gpu))

    def lookup(
        self,
        model: str,
        accelerator: AcceleratorSpec,
        tp: int = 1,
        pp: int = 1,
        *,
        active_params_b: float | None = None,
        params_b: float | None = None,
        is_moe: bool = False,
    ) -> Profile | None:
        """The profile of ``model`` on ``tp`` x ``pp`` devices of ``accelerator`` (rules 1-4 above).

        Returns None only when the model is unknown and no parameter counts are given. Memory fit
        is not checked here (see :func:`weights_fit` and :meth:`for_deployment`).
        """
        devices = tp * pp
        gpu = canonical_gpu(accelerator.model)
        rows = self.measured(model)
        exact = [p for p in rows if canonical_gpu(p.gpu) == gpu and p.devices == devices]
        if exact:
            return exact[-1]
        same_gpu = [p for p in rows if canonical_gpu(p.gpu) == gpu]
        if same_gpu:
            ref = min(same_gpu, key=lambda p: (abs(math.log(p.devices / devices)), -p.devices))
            return _scale_devices(ref, devices, tp, pp)
        refs = [p for p in rows if self.spec(p.gpu) is not None]
        if refs:
            def distance(p: Profile) -> tuple[float, float, int]:
                s = self.spec(p.gpu)
                assert s is not None
                return abs(math.log(s.hbm_gbps / accelerator.hbm_gbps)), abs(math.log(p.devices / devices)), p.devices

            ref = min(refs, key=distance)
            ref_spec = self.spec(ref.gpu)
            assert ref_spec is not None
            return _scale_gpu(_scale_devices(ref, devices, tp, pp), ref_spec, accelerator)
        if active_params_b is None:
            return None
        return estimate(model, accelerator, tp, pp, active_params_b, params_b or active_params_b, is_moe)

    def for_deployment(
        self, deployment: ModelDeployment, accelerator: AcceleratorSpec, bytes_per_param: float = 2.0
    ) -> Profile | None:
        """Profile of a deployment's replica on ``accelerator``, or None when its weights do not fit."""
        shape = deployment.model
        par = deployment.parallelism
        if not weights_fit(shape.params_b, par.devices, accelerator, bytes_per_param):
            return None
        return self.lookup(
            shape.name, accelerator, par.tp, par.pp,
            active_params_b=shape.active_params_b, params_b=shape.params_b, is_moe=shape.is_moe,
        )


def estimate(
    model: str, accelerator: AcceleratorSpec, tp: int, pp: int, active_params_b: float, params_b: float, is_moe: bool
) -> Profile:
    """Rule 4: a first-principles profile for a model nobody measured (module docstring)."""
    devices = tp * pp
    weight = active_params_b + (MOE_TOTAL_WEIGHT * params_b if is_moe else 0.0)
    k = K_MOE if is_moe else K_DENSE
    out = devices**TP_EXPONENT * k * accelerator.hbm_gbps / weight
    inp = devices**TP_EXPONENT * PREFILL_MFU * accelerator.bf16_tflops * 1e12 / (2 * active_params_b * 1e9)
    return Profile(
        model=model, gpu=accelerator.model, tp=tp, pp=pp, output_tokens_per_s=out, input_tokens_per_s=inp,
        power_w=0.8 * accelerator.tdp_w, idle_power_w=accelerator.idle_fraction * accelerator.tdp_w,
        ttft_ms=1000 * TYPICAL_PROMPT_TOKENS / inp, tpot_ms=CALIBRATION_TPOT_P99_MS / 2,
        source=f"estimate: K={k} * hbm / {weight:g}B params, prefill MFU {PREFILL_MFU}",
    )


def _scale_devices(ref: Profile, devices: int, tp: int, pp: int) -> Profile:
    """Rule 2: same GPU, other device count; per-device power unchanged."""
    if ref.devices == devices and (ref.tp, ref.pp) == (tp, pp):
        return ref
    f = (devices / ref.devices) ** TP_EXPONENT
    return ref.model_copy(update={
        "tp": tp, "pp": pp,
        "output_tokens_per_s": ref.output_tokens_per_s * f,
        "input_tokens_per_s": ref.input_tokens_per_s * f,
        "ttft_ms": ref.ttft_ms / f,
        "source": f"{ref.source}; scaled {ref.devices}->{devices} devices ** {TP_EXPONENT}",
    })


def _scale_gpu(ref: Profile, ref_spec: AcceleratorSpec, target: AcceleratorSpec) -> Profile:
    """Rule 3: another GPU type, by HBM bandwidth (decode), FLOPs (prefill) and TDP (power)."""
    f_out = (target.hbm_gbps / ref_spec.hbm_gbps) ** HBM_EXPONENT
    f_in = (target.bf16_tflops / ref_spec.bf16_tflops) ** FLOPS_EXPONENT
    f_pow = target.tdp_w / ref_spec.tdp_w
    return ref.model_copy(update={
        "gpu": target.model,
        "output_tokens_per_s": ref.output_tokens_per_s * f_out,
        "input_tokens_per_s": ref.input_tokens_per_s * f_in,
        "power_w": min(ref.power_w * f_pow, target.max_power_w),
        "idle_power_w": target.idle_fraction * target.tdp_w,
        "ttft_ms": ref.ttft_ms / f_in,
        "tpot_ms": ref.tpot_ms / f_out,
        "source": f"{ref.source}; scaled {ref_spec.model}->{target.model} by hbm**{HBM_EXPONENT}, "
        f"flops**{FLOPS_EXPONENT}, tdp",
    })


def default_table() -> ProfileTable:
    """The built-in table: works on a fresh clone, without ``../shared/data``."""
    return ProfileTable(profiles=DEFAULT_PROFILES)


__all__ = [
    "DECODE_POWER_FRACTION", "DEFAULT_PROFILES", "REFERENCE_GPUS", "Profile", "ProfileTable", "canonical_gpu",
    "canonical_model", "cap_throughput_factor", "default_table", "estimate", "weights_fit",
]
