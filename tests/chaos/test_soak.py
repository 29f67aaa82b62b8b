"""Soak, short versions (issue 12 item 6): the simulated fleet over four simulated hours and the real
controller under ~2.5 minutes of ModelDeployment and node churn. Each prints what it tried and what it
measured, appends a record to ``$WATTPLANE_CHAOS_RESULTS`` when set, and fails past the stated bounds.
The long runs (24 simulated hours, 30 minutes of churn) are ``wattplane soak sim|churn``; their
figures are in docs/reliability.md ``## Soak``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.chaos.records import ChaosRecorder
from wattplane.soak.command import format_report
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.chaos


def _show(kind: str, report: dict[str, Any]) -> None:
    print(f"\n{format_report({'soak': kind, 'quick': True, **report})}", flush=True)


def _record(chaos: ChaosRecorder, fault: str, report: dict[str, Any]) -> None:
    chaos.write(fault, not report["failures"], int(report.get("data_lost", 0)), report.get("time_to_converge_s"),
                {"failures": report["failures"], "memory": report["memory"], "latency": report["latency"]})


def test_sim_soak_short_memory_flat_latency_steady(chaos: ChaosRecorder) -> None:
    from wattplane.soak.sim import run_sim_soak

    # without the burst: a run of a few hours must be stationary for first vs last to mean anything
    report = run_sim_soak(gpus=400, hours=4.0, seed=3, window_h=1.0, burst=False)
    _show("sim", report)
    _record(chaos, "soak: simulated 400 GPUs x 4 h", report)
    assert report["run"]["cycles"] == 239 and report["run"]["invariant_violations"] == 0
    containers = report["containers"]
    # the fleet's own tables may grow with the load; the simulator's caches must not outgrow it
    assert containers["sim._pod_cache"]["last_mean"] <= containers["fleet.replicas"]["last_mean"] + 8
    assert report["failures"] == [], json.dumps(report["failures"])


@pytest.mark.cluster
def test_controller_churn_soak_short(test_cluster: TestCluster, chaos: ChaosRecorder) -> None:
    from wattplane.soak.churn import run_churn_soak

    report = run_churn_soak(minutes=2.5, sample_s=5.0, window_s=45.0, nodes=12, seed=11, cluster=test_cluster,
                            progress=True)
    _show("churn", report)
    _record(chaos, "soak: controller churn 2.5 min", report)
    churn = report["churn"]
    tried = {k for k in churn if not k.startswith(("error", "skipped"))}
    assert {"created", "scaled", "edited", "deleted", "nodes_added", "bad_cel_refused"} <= tried, churn
    assert report["data_lost"] == 0 and report["orphans"] == 0
    assert report["failures"] == [], json.dumps(report["failures"])
