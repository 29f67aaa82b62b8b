"""``wattplane simulate --cluster``: the quickstart through the real controller, agents and API server."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.kube import Kube, KubeError
from wattplane.cli import main
from wattplane.simulate.crs import SIM_LABEL
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "scenarios" / "quickstart.yaml"
MEASURED = ("slo_attainment", "cost_per_hour", "energy_kwh", "tokens_per_joule", "over_budget_s", "migrations",
            "fallback_share", "solver_ms_p99", "cost_per_million_tokens", "caps_applied", "ttft_p99_ms",
            "tpot_p99_ms", "replica_changes", "guard_node_s", "quality")
NOT_MEASURED = ("expert_copies", "policy_fallback_share")


@pytest.fixture(scope="module")
def test_cluster() -> Iterator[TestCluster]:
    """A cluster of its own for these runs: a scenario driven through the controller measures that
    scenario only if the cluster holds nothing else — the session cluster carries other tests' pods
    (pending ones among them, which the rescheduling stage then works on) and their fleet objects."""
    cluster = TestCluster.start(die_with_parent=True)
    try:
        yield cluster
    finally:
        cluster.stop()


def _unique_quickstart(tmp_path: Path, **changes: Any) -> Path:
    """The quickstart with pool and domain names of its own, so no other test's objects are reused."""
    uid = uuid.uuid4().hex[:4]
    data = yaml.safe_load(QUICKSTART.read_text())
    rename = {p["name"]: f"{p['name']}-{uid}" for p in data["pools"]}
    for p in data["pools"]:
        p["name"] = rename[p["name"]]
        p["power_domain"] = f"row-{uid}"
    data["power_domains"][0]["name"] = f"row-{uid}"
    for d in data["deployments"]:
        d["initial_replicas"] = {rename[k]: v for k, v in d.get("initial_replicas", {}).items()}
    data.update(changes)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _leftovers(kube: Kube, run_label: str | None = None) -> dict[str, list[str]]:
    selector = f"{SIM_LABEL}={run_label}" if run_label else SIM_LABEL
    out = {kind: [o["metadata"]["name"] for o in kube.list(kind, labelSelector=selector)["items"]]
           for kind in ("Node", "AcceleratorPool", "PowerDomain")}
    out["Namespace"] = [n["metadata"]["name"] for n in kube.request("GET", "/api/v1/namespaces",
                                                                     query={"labelSelector": selector})["items"]]
    return {k: v for k, v in out.items() if v}


def _wait_clean(kube: Kube, timeout_s: float = 90.0) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = _leftovers(kube)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _fleet_policy(kube: Kube) -> dict[str, Any] | None:
    try:
        return dict(kube.get("FleetPolicy", "default").get("spec") or {})
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


def test_quickstart_converges_on_the_cluster_and_cleans_up(test_cluster: TestCluster, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    kube = Kube(test_cluster.api_client())
    before = _fleet_policy(kube) if _crds_installed(kube) else None
    path = _unique_quickstart(tmp_path)
    code = main(["simulate", str(path), "--cluster", str(test_cluster.kubeconfig), "--json", "--duration", "120",
                 "--time-scale", "4", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, (out, sorted(tmp_path.glob("out/controller-*.log")))
    doc = json.loads(out)
    entry = doc["policy_sets"]["wattplane"]
    metrics = entry["metrics"]
    for k in MEASURED:
        assert isinstance(metrics[k], float | int) and math.isfinite(metrics[k]), (k, metrics[k])
    for k in NOT_MEASURED:  # unmeasurable here: null and listed, never a made-up number
        assert metrics[k] is None and k in doc["cluster"]["not_measured"]
    assert set(doc["cluster"]["metric_sources"]) >= {"energy_kwh", "migrations", "fallback_share"}
    # the controller placed replicas (Running kwok pods hold GPUs), agents reported power over gRPC
    assert metrics["cost_per_hour"] > 0 and metrics["energy_kwh"] > 0 and metrics["requests"] > 0
    assert 0.0 <= metrics["fallback_share"] <= 1.0
    assert not any("before convergence" in n or "still changing" in n for n in doc["cluster"]["notes"])
    # converged: the warm-up ended because every desired replica was Ready and nothing changed for two
    # control periods (not by its timeout), and every deployment then served its load. SLO figures are the
    # policies' outcome on this cluster (docs/benchmarks.md), not a property of the run to pin here.
    for name, dep in entry["deployments"].items():
        assert dep["requests"] > 0 and dep["output_tokens"] > 0, (name, dep)
    assert metrics["dropped_share"] < 0.5 and metrics["routing_table_stale_s"] >= 0
    final = doc["cluster"]["final"]  # read from the cluster at the end: every deployment has Ready replicas
    assert sum(p["gpus_running"] for p in final["pools"].values()) > 0
    for name in entry["deployments"]:
        assert sum(r["ready"] for r in final["replicas"][name].values()) >= 1, (name, final)
    assert entry["invariant_violations"] == []
    assert (tmp_path / "out" / "report.html").exists()
    assert _wait_clean(kube) == {}
    assert _fleet_policy(kube) == before


def _default_sigint() -> None:
    """In the child: Ctrl-C as a terminal delivers it. A harness started in the background by a
    non-interactive shell (nohup, `cmd &`) runs with SIGINT ignored, which children inherit, and
    Python then never raises KeyboardInterrupt: the run went on driving load after the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_removes_what_the_run_created(test_cluster: TestCluster, tmp_path: Path) -> None:
    kube = Kube(test_cluster.api_client())
    path = _unique_quickstart(tmp_path)
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "wattplane", "simulate", str(path), "--cluster",
                             str(test_cluster.kubeconfig), "--json", "--duration", "600", "--time-scale", "2",
                             "--out", str(tmp_path / "out")], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not _leftovers(kube).get("Node") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _leftovers(kube).get("Node"), "the run created no nodes"
        time.sleep(3)  # the controller and agents are starting
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(90) == 130
        except subprocess.TimeoutExpired:  # say where it hangs: faulthandler dumps every thread's stack
            proc.send_signal(signal.SIGABRT)
            proc.wait(10)
            tail = (tmp_path / "run.log").read_text()[-6000:]
            raise AssertionError(f"no exit 90 s after SIGINT; its stacks:\n{tail}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "run.log").read_text()
    assert "interrupted" in text
    assert _wait_clean(kube) == {}


def _crds_installed(kube: Kube) -> bool:
    try:
        kube.list("FleetPolicy")
        return True
    except KubeError:
        return False
