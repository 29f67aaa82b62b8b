"""Real devices through NVML (``nvidia-ml-py``): read-only queries plus the power/clock setters.

``nvml`` is the ``pynvml`` module by default; tests pass a fake with the same functions so this
exact code path runs where no GPU exists. Without the driver library the constructor raises
:class:`SourceUnavailable` naming ``libnvidia-ml.so.1`` instead of crashing the agent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from agents.sources import DeviceInfo, DeviceSample, SourceError, SourceUnavailable

MIB = 1024 * 1024
GIB = 1024 * MIB


def _load_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a pinned dependency
        raise SourceUnavailable("the nvidia-ml-py package (module pynvml) is not installed") from exc
    return pynvml


class NvmlSource:
    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml if nvml is not None else _load_pynvml()
        n = self._nvml
        try:
            n.nvmlInit()
        except n.NVMLError as exc:
            raise SourceUnavailable(_init_error_message(n, exc)) from exc
        try:
            count = n.nvmlDeviceGetCount()
            self._handles = [n.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            driver = _text(n.nvmlSystemGetDriverVersion())
            self._devices = [self._describe(i, h, driver) for i, h in enumerate(self._handles)]
        except n.NVMLError as exc:
            n.nvmlShutdown()
            raise SourceUnavailable(f"NVML initialised but querying devices failed: {exc}") from exc
        if not self._devices:
            n.nvmlShutdown()
            raise SourceUnavailable("NVML found no GPUs on this node (is the device plugin exposing them?)")
        self._clock_limits = [0.0] * len(self._devices)

    def _describe(self, index: int, handle: Any, driver: str) -> DeviceInfo:
        n = self._nvml
        lo_mw, hi_mw = n.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        clocks = self._supported_sm_clocks(handle)
        return DeviceInfo(
            index=index,
            uuid=_text(n.nvmlDeviceGetUUID(handle)),
            model=_text(n.nvmlDeviceGetName(handle)),
            memory_gib=n.nvmlDeviceGetMemoryInfo(handle).total / GIB,
            tdp_w=n.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000.0,
            min_power_w=lo_mw / 1000.0,
            max_power_w=hi_mw / 1000.0,
            min_clock_mhz=float(min(clocks)) if clocks else 0.0,
            max_clock_mhz=float(max(clocks)) if clocks else float(n.nvmlDeviceGetMaxClockInfo(handle, n.NVML_CLOCK_SM)),
            driver=driver,
        )

    def _supported_sm_clocks(self, handle: Any) -> list[int]:
        n = self._nvml
        try:
            mem_clocks = n.nvmlDeviceGetSupportedMemoryClocks(handle)
            return list(n.nvmlDeviceGetSupportedGraphicsClocks(handle, max(mem_clocks))) if mem_clocks else []
        except n.NVMLError:
            return []

    def devices(self) -> Sequence[DeviceInfo]:
        return self._devices

    def sample(self) -> list[DeviceSample]:
        n = self._nvml
        out = []
        for dev, handle in zip(self._devices, self._handles, strict=True):
            try:
                util = n.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
                out.append(
                    DeviceSample(
                        index=dev.index,
                        power_w=n.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                        energy_j=n.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0,
                        utilisation=min(1.0, max(0.0, util)),
                        memory_used_gib=n.nvmlDeviceGetMemoryInfo(handle).used / GIB,
                        sm_clock_mhz=float(n.nvmlDeviceGetClockInfo(handle, n.NVML_CLOCK_SM)),
                        temperature_c=float(n.nvmlDeviceGetTemperature(handle, n.NVML_TEMPERATURE_GPU)),
                        power_limit_w=n.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0,
                        clock_limit_mhz=self._clock_limits[dev.index],
                    )
                )
            except n.NVMLError as exc:
                raise SourceError(f"NVML read of GPU {dev.index} failed: {exc}") from exc
        return out

    def set_power_limit(self, index: int, watts: float) -> None:
        dev = self._devices[index]
        if not dev.min_power_w <= watts <= dev.max_power_w:
            raise SourceError(f"GPU {index}: {watts} W outside [{dev.min_power_w}, {dev.max_power_w}]")
        try:
            self._nvml.nvmlDeviceSetPowerManagementLimit(self._handles[index], round(watts * 1000))
        except self._nvml.NVMLError as exc:
            raise SourceError(
                f"GPU {index}: setting power limit {watts} W failed (needs root/CAP_SYS_ADMIN?): {exc}"
            ) from exc

    def set_clock_limit(self, index: int, max_mhz: float | None) -> None:
        n = self._nvml
        dev = self._devices[index]
        try:
            if max_mhz is None:
                n.nvmlDeviceResetGpuLockedClocks(self._handles[index])
                self._clock_limits[index] = 0.0
            else:
                n.nvmlDeviceSetGpuLockedClocks(self._handles[index], round(dev.min_clock_mhz), round(max_mhz))
                self._clock_limits[index] = max_mhz
        except n.NVMLError as exc:
            raise SourceError(f"GPU {index}: locking clocks failed: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def _init_error_message(n: Any, exc: Exception) -> str:
    not_found = getattr(n, "NVMLError_LibraryNotFound", None)
    if not_found is not None and isinstance(exc, not_found):
        return (
            "NVIDIA driver library libnvidia-ml.so.1 (NVML) not found: install the NVIDIA driver / "
            "container toolkit on this node, or run the agent with --source simulated"
        )
    driver_missing = getattr(n, "NVMLError_DriverNotLoaded", None)
    if driver_missing is not None and isinstance(exc, driver_missing):
        return "NVIDIA kernel driver not loaded (NVML): load the nvidia module or run with --source simulated"
    return f"NVML initialisation failed: {exc} (run with --source simulated where there is no GPU)"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
