"""Machine-readable chaos records: one JSON line per fault tried, turned into the ``make chaos`` table.

Each line: ``{"test", "fault", "tried": 1, "survived", "data_lost", "time_to_converge_s", "detail"}``.
A fault is "survived" when every check after it held; the attempt context records a failure too
(survived false) before re-raising, so a red run still shows in the table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_RESULTS = "WATTPLANE_CHAOS_RESULTS"


@dataclass
class Attempt:
    fault: str
    data_lost: int = 0
    converge_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChaosRecorder:
    path: Path
    test: str
    written: int = 0

    def write(self, fault: str, survived: bool, data_lost: int, converge_s: float | None,
              detail: dict[str, Any] | None = None) -> None:
        line = {"test": self.test, "fault": fault, "tried": 1, "survived": survived, "data_lost": data_lost,
                "time_to_converge_s": None if converge_s is None else round(converge_s, 3),
                "detail": detail or {}, "at": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        self.written += 1

    @contextmanager
    def attempt(self, fault: str) -> Iterator[Attempt]:
        a = Attempt(fault)
        try:
            yield a
        except BaseException as exc:
            a.detail.setdefault("error", f"{type(exc).__name__}: {str(exc)[:300]}")
            self.write(fault, False, a.data_lost, a.converge_s, a.detail)
            raise
        self.write(fault, True, a.data_lost, a.converge_s, a.detail)


def results_path(default: Path) -> Path:
    env = os.environ.get(ENV_RESULTS)
    return Path(env) if env else default


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure is one that was measured)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * q // 100) - 1))]


def table(records: list[dict[str, Any]]) -> str:
    """One row per fault (in first-seen order) and a total: tried, survived, data lost, converge p50/p99."""
    order: list[str] = []
    by_fault: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if rec["fault"] not in by_fault:
            order.append(rec["fault"])
        by_fault.setdefault(rec["fault"], []).append(rec)

    def row(name: str, recs: list[dict[str, Any]]) -> str:
        times = [float(r["time_to_converge_s"]) for r in recs if r.get("time_to_converge_s") is not None]
        conv = f"{percentile(times, 50):.2f} / {percentile(times, 99):.2f}" if times else "—"
        tried = sum(int(r["tried"]) for r in recs)
        survived = sum(int(r["tried"]) for r in recs if r["survived"])
        lost = sum(int(r["data_lost"]) for r in recs)
        return f"| {name} | {tried} | {survived} | {lost} | {conv} |"

    lines = ["| fault | tried | survived | data lost | time to converge p50 / p99 (s) |", "|---|---|---|---|---|"]
    lines += [row(f, by_fault[f]) for f in order]
    if records:
        lines.append(row("**all faults**", records))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else results_path(Path("out/chaos-results.jsonl"))
    records = load(path)
    print(f"\nchaos summary ({len(records)} faults tried, from {path}):\n")
    print(table(records))
    lost = sum(int(r["data_lost"]) for r in records)
    failed = [r for r in records if not r["survived"]]
    if lost or failed:
        print(f"\nNOT OK: {len(failed)} fault(s) not survived, {lost} item(s) of data lost")
        return 1
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
