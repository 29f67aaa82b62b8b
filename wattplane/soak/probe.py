"""What a soak samples from a process (/proc) and how it judges growth and drift over a run.

A leak shows as a steady slope after warm-up, not as a high first value: caches fill, replicas
start and the allocator settles in the first window. So every series is judged on two things:
the mean of the last window against the first one, and the least-squares slope after the first
window. Both are reported; the verdict applies the bounds the caller states.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """RSS (MiB) and thread count of a process, from /proc/PID/status (Linux only)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            out["rss_mib"] = int(value.split()[0]) / 1024.0
        elif key == "Threads":
            out["threads"] = float(value.split()[0])
    return out


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of a process (utime + stime from /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


@dataclass
class Growth:
    """One series judged over a run: first vs last window, slope per hour after warm-up."""

    name: str
    unit: str
    first_mean: float
    last_mean: float
    growth: float  # last_mean - first_mean
    slope_per_h: float  # least squares over samples after the first window, per hour of the run's clock
    samples: int

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def windows(t: Sequence[float] | np.ndarray, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the first and last ``window_s`` of a run (a quarter of the run when it is shorter than 2 windows)."""
    ta = np.asarray(t, dtype=float)
    if not len(ta):
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    start, end = float(ta.min()), float(ta.max())
    w = min(window_s, (end - start) / 4) if end - start < 2 * window_s else window_s
    return ta <= start + w, ta >= end - w


def growth(name: str, unit: str, t: Sequence[float], v: Sequence[float], window_s: float) -> Growth:
    ta, va = np.asarray(t, dtype=float), np.asarray(v, dtype=float)
    first, last = windows(ta, window_s)
    after = ~first
    slope = 0.0
    if after.sum() >= 3 and np.ptp(ta[after]) > 0:
        slope = float(np.polyfit(ta[after] / 3600.0, va[after], 1)[0])
    fm = float(va[first].mean()) if first.any() else float("nan")
    lm = float(va[last].mean()) if last.any() else float("nan")
    return Growth(name, unit, fm, lm, lm - fm, slope, len(va))


@dataclass
class Drift:
    """A latency series: mean, p50 and p99 in the first and last window and their ratios.

    The pipeline's cycles are bimodal (a cheap cycle when only the fast stages are due, a costly
    one when placement, MoE or rescheduling run too), so a window's p50 moves with the stage mix;
    the mean over whole stage periods does not, which is why verdicts use ``mean_ratio``."""

    name: str
    unit: str
    first_p50: float
    first_p99: float
    last_p50: float
    last_p99: float
    samples: int
    first_mean: float = float("nan")
    last_mean: float = float("nan")
    mean_ratio: float = field(init=False)
    p50_ratio: float = field(init=False)
    p99_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.mean_ratio = self.last_mean / self.first_mean if self.first_mean > 0 else float("nan")
        self.p50_ratio = self.last_p50 / self.first_p50 if self.first_p50 > 0 else float("nan")
        self.p99_ratio = self.last_p99 / self.first_p99 if self.first_p99 > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def drift(name: str, unit: str, t: Sequence[float], v: Sequence[float], window_s: float) -> Drift:
    ta, va = np.asarray(t, dtype=float), np.asarray(v, dtype=float)
    first, last = windows(ta, window_s)
    return Drift(name, unit, percentile(va[first], 50), percentile(va[first], 99), percentile(va[last], 50),
                 percentile(va[last], 99), len(va), float(va[first].mean()) if first.any() else float("nan"),
                 float(va[last].mean()) if last.any() else float("nan"))


def write_chaos_records(records: list[dict[str, Any]]) -> Path | None:
    """Append JSON lines (fault, tried, survived, data_lost, time_to_converge_s, ...) to the file
    ``WATTPLANE_CHAOS_RESULTS`` names, the chaos suite's results table; nothing when it is unset."""
    path = os.environ.get("WATTPLANE_CHAOS_RESULTS")
    if not path:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return Path(path)


__all__ = ["Drift", "Growth", "cpu_seconds", "drift", "growth", "open_fds", "percentile", "proc_status",
           "windows", "write_chaos_records"]
