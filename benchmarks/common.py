"""The benchmark output contract (design §6) and shared options.

Every benchmark module exposes ``configure(parser)`` (its own options, beyond the common ones)
and ``run(args) -> list[Case]``; this module adds ``--json``, ``--quick`` and ``--data-dir``,
stamps the machine, and prints exactly one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

Metrics = dict[str, float]


@dataclass
class Case:
    """One benchmark case: ours is always ``wattplane``; baselines are named by their anchor."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Metrics] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "methods": self.methods}


def machine_info() -> dict[str, Any]:
    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "absent"

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ortools": v("ortools"),
        "wattplane": v("wattplane"),
    }


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object (design §6 contract)")
    parser.add_argument("--quick", action="store_true", help="a reduced run that finishes in under 60 s")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $WATTPLANE_DATA or ../shared/data)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for synthetic inputs")


def report(name: str, quick: bool, cases: list[Case], as_json: bool) -> str:
    doc = {"benchmark": name, "quick": quick, "machine": machine_info(), "cases": [c.to_json() for c in cases]}
    if as_json:
        return json.dumps(doc, sort_keys=False)
    return format_table(doc)


def format_table(doc: dict[str, Any]) -> str:
    """A terminal rendering: per case, one row per method, metrics as columns."""
    lines = [f"benchmark {doc['benchmark']} (quick={doc['quick']})"]
    for case in doc["cases"]:
        lines.append(f"\n== {case['name']}  {json.dumps(case['params'])}")
        metrics = sorted({m for vals in case["methods"].values() for m in vals})
        lines.append("method".ljust(22) + "".join(m[:18].rjust(20) for m in metrics))
        for method, vals in case["methods"].items():
            cells = "".join(_fmt(vals.get(m)).rjust(20) for m in metrics)
            lines.append(method.ljust(22) + cells)
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}"


def emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
