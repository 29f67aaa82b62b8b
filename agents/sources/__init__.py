"""Where device readings come from: one interface, a real NVML source and a simulated one.

The agent only talks to :class:`GPUSource`, so the simulated source exercises exactly the code
that drives real GPUs (reporting, command application, the local guard).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class SourceUnavailable(RuntimeError):
    """The source cannot start here (no driver, no library, no device); the message says which."""


class SourceError(RuntimeError):
    """A device call failed (e.g. the driver refused a power limit)."""


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    uuid: str
    model: str
    memory_gib: float
    tdp_w: float
    min_power_w: float
    max_power_w: float
    min_clock_mhz: float
    max_clock_mhz: float
    driver: str


@dataclass(frozen=True)
class DeviceSample:
    index: int
    power_w: float
    energy_j: float
    utilisation: float
    memory_used_gib: float
    sm_clock_mhz: float
    temperature_c: float
    power_limit_w: float
    clock_limit_mhz: float = 0.0  # 0: clocks not locked
    prefill_fraction: float | None = None  # share of the interval in prompt passes, when the source knows it


class GPUSource(Protocol):
    name: str

    def devices(self) -> Sequence[DeviceInfo]: ...

    def sample(self) -> list[DeviceSample]: ...

    def set_power_limit(self, index: int, watts: float) -> None: ...

    def set_clock_limit(self, index: int, max_mhz: float | None) -> None:
        """Lock the SM clock at or below ``max_mhz``; None unlocks."""
        ...

    def close(self) -> None: ...
