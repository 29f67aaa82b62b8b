"""A simulated GPU node driven by the shared phase power model (``policies.power_model``).

Power follows the load: prompt passes draw ~TDP, token phases less, idle ~20% of TDP; limits and
clock locks take effect at once, as a real board's power-limit loop settles within milliseconds
(well inside the guard's one-second budget). The load is a function of elapsed time, either
constant, pushed by a test with :meth:`SimulatedSource.set_load`, or replayed from a request
trace (Azure LLM inference trace columns) with :func:`trace_load`.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from agents.sources import DeviceInfo, DeviceSample, SourceError
from policies.power_model import MIN_CLOCK_FRACTION, gpu_power_w, max_clock_mhz
from policies.snapshot import AcceleratorSpec

# (prefill_fraction, decode_utilisation) at ``elapsed`` seconds, for GPU ``index``.
Load = Callable[[float, int], tuple[float, float]]

H100_SXM = AcceleratorSpec(
    model="H100-80GB", memory_gib=80, bf16_tflops=989, hbm_gbps=3350, tdp_w=700, min_power_w=200, max_power_w=700
)


def constant_load(prefill_fraction: float, decode_utilisation: float) -> Load:
    return lambda _t, _i: (prefill_fraction, decode_utilisation)


class SimulatedSource:
    name = "simulated"

    def __init__(
        self,
        spec: AcceleratorSpec = H100_SXM,
        gpus: int = 8,
        load: Load | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        node_name: str = "sim",
    ) -> None:
        self.spec = spec
        self._clock = clock
        self._start = clock()
        self._load: Load = load or constant_load(0.0, 0.0)
        top = max_clock_mhz(spec)
        self._devices = [
            DeviceInfo(
                index=i,
                uuid=f"GPU-sim-{node_name}-{i}",
                model=spec.model,
                memory_gib=spec.memory_gib,
                tdp_w=spec.tdp_w,
                min_power_w=spec.min_power_w,
                max_power_w=spec.max_power_w,
                min_clock_mhz=round(top * MIN_CLOCK_FRACTION),
                max_clock_mhz=top,
                driver="simulated",
            )
            for i in range(gpus)
        ]
        self._limits = [spec.tdp_w] * gpus
        self._clock_limits = [0.0] * gpus
        self._energy = [0.0] * gpus
        self._last_power = [self._power(i, 0.0) for i in range(gpus)]
        self._last_t = self._start
        self.limit_calls = 0  # how many times a limit was written (tests check for churn)

    def set_load(self, load: Load) -> None:
        self._load = load

    def devices(self) -> Sequence[DeviceInfo]:
        return self._devices

    def _power(self, index: int, elapsed: float) -> float:
        prefill, decode = self._load(elapsed, index)
        cap = self._limits[index]
        if self._clock_limits[index]:
            cap = min(cap, self.spec.tdp_w * self._clock_limits[index] / self._devices[index].max_clock_mhz)
        return gpu_power_w(self.spec, prefill, decode, cap_w=cap)

    def sample(self) -> list[DeviceSample]:
        now = self._clock()
        dt = max(0.0, now - self._last_t)
        elapsed = now - self._start
        out = []
        for dev in self._devices:
            i = dev.index
            prefill, decode = self._load(elapsed, i)
            power = self._power(i, elapsed)
            self._energy[i] += 0.5 * (power + self._last_power[i]) * dt  # trapezoid between samples
            self._last_power[i] = power
            busy = min(1.0, prefill + (1.0 - prefill) * decode)
            clock = dev.max_clock_mhz * (min(1.0, power / self._limits[i]) if busy else 0.3)
            if self._clock_limits[i]:
                clock = min(clock, self._clock_limits[i])
            out.append(
                DeviceSample(
                    index=i,
                    power_w=power,
                    energy_j=self._energy[i],
                    utilisation=busy,
                    memory_used_gib=dev.memory_gib * (0.05 + 0.85 * min(1.0, decode + prefill)),
                    sm_clock_mhz=clock,
                    temperature_c=30.0 + 45.0 * power / self.spec.tdp_w,
                    power_limit_w=self._limits[i],
                    clock_limit_mhz=self._clock_limits[i],
                    prefill_fraction=min(1.0, max(0.0, prefill)),  # the simulator knows its phase mix
                )
            )
        self._last_t = now
        return out

    def set_power_limit(self, index: int, watts: float) -> None:
        dev = self._devices[index]
        if not dev.min_power_w <= watts <= dev.max_power_w:
            raise SourceError(f"GPU {index}: {watts} W outside [{dev.min_power_w}, {dev.max_power_w}]")
        self._limits[index] = watts
        self.limit_calls += 1

    def set_clock_limit(self, index: int, max_mhz: float | None) -> None:
        dev = self._devices[index]
        if max_mhz is not None and not dev.min_clock_mhz <= max_mhz <= dev.max_clock_mhz:
            raise SourceError(f"GPU {index}: {max_mhz} MHz outside [{dev.min_clock_mhz}, {dev.max_clock_mhz}]")
        self._clock_limits[index] = 0.0 if max_mhz is None else max_mhz

    def close(self) -> None:
        pass


def trace_load(path: str | Path, *, peak_prefill: float = 0.5, phase_shift_s: float = 7.0) -> Load:
    """Replay a request trace (``TIMESTAMP, ContextTokens, GeneratedTokens``) as per-second load.

    Prompt tokens per second, normalised by the trace's busiest second, scale the prefill share
    (up to ``peak_prefill``); generated tokens per second scale the decode occupancy. GPU ``i``
    is shifted by ``i * phase_shift_s`` so a node's devices are not in lock step. Loops the trace.
    """
    prompt: dict[int, float] = {}
    generated: dict[int, float] = {}
    start: float | None = None
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            t = _seconds(row["TIMESTAMP"])
            start = t if start is None else start
            second = int(t - start)
            prompt[second] = prompt.get(second, 0.0) + float(row["ContextTokens"])
            generated[second] = generated.get(second, 0.0) + float(row["GeneratedTokens"])
    if not prompt:
        raise ValueError(f"{path}: no requests")
    length = max(prompt) + 1
    p_peak = max(prompt.values())
    g_peak = max(generated.values())
    prefill = [peak_prefill * prompt.get(s, 0.0) / p_peak for s in range(length)]
    decode = [generated.get(s, 0.0) / g_peak for s in range(length)]

    def load(elapsed: float, index: int) -> tuple[float, float]:
        s = int(elapsed + index * phase_shift_s) % length
        return prefill[s], decode[s]

    return load


def _seconds(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    head, _, frac = text.partition(".")
    base = datetime.fromisoformat(head).timestamp()
    return base + (float("0." + "".join(c for c in frac if c.isdigit())) if frac else 0.0)
