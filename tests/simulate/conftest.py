"""Small scenarios for fast simulator tests (a few simulated minutes on a few nodes)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from wattplane.simulate.scenario import Scenario, parse_scenario

SMALL: dict[str, Any] = {
    "name": "small",
    "duration_s": 240,
    "step_s": 1,
    "control_period_s": 30,
    "replica_startup_s": 30,
    "seed": 3,
    "power_domains": [{"name": "row", "budget_w": 9000, "safety_margin": 0.05}],
    "pools": [
        {"name": "h100", "accelerator": "H100-80GB", "nodes": 2, "gpus_per_node": 8, "cost_per_device_hour": 4.0,
         "power_domain": "row"},
        {"name": "a100", "accelerator": "A100-80GB", "nodes": 2, "gpus_per_node": 8, "cost_per_device_hour": 2.2,
         "power_domain": "row"},
    ],
    "deployments": [
        {"name": "big", "model": "llama-3.1-70b", "parallelism": {"tp": 4}, "priority": "latency-critical",
         "min_replicas": 1, "max_replicas": 6, "initial_replicas": {"h100": 2},
         "fallback": {"deployment": "small", "quality_floor": 0.9}, "load": {"share": 0.7}},
        {"name": "small", "model": "llama-3.1-8b", "priority": "best-effort", "min_replicas": 1, "max_replicas": 8,
         "initial_replicas": {"a100": 1}, "load": {"share": 0.3}},
    ],
    "load": {"synthetic": {"requests_per_s": 8, "bursts": [{"at_s": 90, "duration_s": 60, "factor": 2.0}]}},
    "policies": {"rescheduling": {"method": "wattplane", "period_s": 120,
                                  "config": {"time_limit_s": 0.2, "mnl": 3}}},
}


def make_scenario(**overrides: Any) -> Scenario:
    data = {**SMALL, **overrides}
    return parse_scenario(yaml.safe_dump(data), source="small.yaml")


@pytest.fixture
def small() -> Scenario:
    return make_scenario()
