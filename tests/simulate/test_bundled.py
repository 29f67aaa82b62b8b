"""Every bundled scenario runs from a fresh clone (synthetic load, no data) and reports every metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from wattplane.cli import main

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "examples" / "scenarios").glob("*.yaml"))
METRICS = ("slo_attainment", "cost_per_hour", "energy_kwh", "tokens_per_joule", "over_budget_s", "migrations",
           "expert_copies", "fallback_share", "solver_ms_p99", "cost_per_million_tokens", "caps_applied",
           "ttft_p99_ms", "tpot_p99_ms")


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_bundled_scenario_runs_and_reports_every_metric(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # two control cycles of each scenario: enough to run every enabled stage once
    assert main(["simulate", str(path), "--json", "--duration", "75"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (name, entry), = doc["policy_sets"].items()
    assert name == "wattplane"
    for k in METRICS:
        assert k in entry["metrics"], k
        assert math.isfinite(entry["metrics"][k]) or k.endswith("_ms"), (k, entry["metrics"][k])
    assert entry["invariant_violations"] == []
