"""Power end to end on the real local API server: agents -> gRPC hub -> power policy -> caps -> PowerDomain status.

Two fake GPU nodes (kwok) in a pool, a PowerDomain over them, and two real agents with simulated
GPUs streaming to the controller process's telemetry hub (TokenReview-authenticated). The status
shows their draw; when the budget drops below it, the power policy's caps travel to the agents
as commands, the agents acknowledge and apply them, and the status counts them.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from agents.agent import Agent, AgentConfig
from agents.sources.simulated import SimulatedSource, constant_load
from controller.kube import Kube
from controller.main import AGENT_TOKEN_AUDIENCE
from policies.power_model import gpu_power_w
from tests.controller.cluster_helpers import ControllerProcess, pool_body, wait_for
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster

PREFILL, DECODE = 0.1, 0.6  # each simulated GPU's load: 10% of the time in prompts, token phase at 60%


@pytest.fixture
def power_on(kube: Kube) -> Iterator[None]:
    """FleetPolicy with the power stage on; the previous one (or none) is restored afterwards."""
    try:
        old: dict[str, Any] | None = kube.get("FleetPolicy", "default")
    except Exception:
        old = None
    if old is None:
        kube.create("FleetPolicy", {"apiVersion": "wattplane.io/v1alpha1", "kind": "FleetPolicy",
                                    "metadata": {"name": "default"}, "spec": {"policies": {"power": True}}})
    else:
        kube.patch("FleetPolicy", "default", {"spec": {"policies": {"power": True}}})
    yield
    if old is None:
        kube.delete("FleetPolicy", "default")
    else:
        kube.patch("FleetPolicy", "default", {"spec": {"policies": old["spec"].get("policies", {})}})


class AgentThread:
    """Real agents on one event loop in a thread of their own, streaming to the controller's hub."""

    def __init__(self, agents: list[Agent]) -> None:
        self.agents = agents
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="agents", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.gather(*(a.run() for a in self.agents)))

    def stop(self) -> None:
        for a in self.agents:
            self.loop.call_soon_threadsafe(a.stop)
        self.thread.join(10)


@pytest.fixture
def start_agents() -> Iterator[Callable[..., AgentThread]]:
    started: list[AgentThread] = []

    def start(agents: list[Agent]) -> AgentThread:
        t = AgentThread(agents)
        started.append(t)
        return t

    yield start
    for t in started:
        t.stop()


def simulated_draws(agents: dict[str, Agent]) -> dict[str, float]:
    """Each node's GPU draw at the limits its devices hold (the simulated devices' own power model)."""
    out = {}
    for n, a in agents.items():
        src = a.source
        assert isinstance(src, SimulatedSource)
        out[n] = sum(gpu_power_w(src.spec, PREFILL, DECODE, limit) for limit in src._limits)
    return out


def _agent_token(test_cluster: TestCluster) -> str:
    core = client.CoreV1Api(test_cluster.api_client())
    ns = test_cluster.create_namespace(f"agents-{uuid.uuid4().hex[:6]}")
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="agent")))
    req = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[AGENT_TOKEN_AUDIENCE],
                                                                             expiration_seconds=3600))
    return str(core.create_namespaced_service_account_token("agent", ns, req).status.token)


def _hub_port(proc: ControllerProcess) -> int:
    def port() -> int | None:
        m = re.search(r"telemetry hub on [\d.]+:(\d+)", proc.log_path.read_text(errors="replace"))
        return int(m.group(1)) if m else None

    return int(wait_for(port, 30, what="the hub's port in the controller log"))


def _status(kube: Kube, name: str) -> dict[str, Any]:
    return dict(kube.get("PowerDomain", name).get("status") or {})


def _cond(status: dict[str, Any], type_: str) -> str:
    return next((c["status"] for c in status.get("conditions") or [] if c["type"] == type_), "")


def test_agents_draw_shows_in_status_and_over_budget_caps_are_acknowledged(
    test_cluster: TestCluster, kube: Kube, power_on: None, start_agents: Callable[..., AgentThread], tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:6]
    pool, row = f"pp-{uid}", f"row-{uid}"
    kube.create("AcceleratorPool", pool_body(pool, 8))
    nodes = test_cluster.add_gpu_nodes(pool, 2, gpus=8, labels={"wattplane.io/row": row})
    kube.create("PowerDomain", {"apiVersion": "wattplane.io/v1alpha1", "kind": "PowerDomain",
                                "metadata": {"name": row},
                                "spec": {"budgetW": 20_000, "safetyMargin": 0.02,
                                         "nodeSelector": {"wattplane.io/row": row}}})
    proc = ControllerProcess(test_cluster.kubeconfig, tmp_path, f"power-{uid}", f"pc-{uid}", resync_s=30.0)
    try:
        token = _agent_token(test_cluster)
        port = _hub_port(proc)
        sources = {n: SimulatedSource(gpus=8, load=constant_load(PREFILL, DECODE), node_name=n) for n in nodes}
        agents = [Agent(AgentConfig(node_name=n, target=f"127.0.0.1:{port}", token=token), s)
                  for n, s in sources.items()]
        start_agents(agents)
        per_gpu = gpu_power_w(next(iter(sources.values())).spec, PREFILL, DECODE)
        expected = 16 * per_gpu

        # 1. the status shows the agents' draw, under budget, nobody capped
        def observed() -> dict[str, Any] | None:
            s = _status(kube, row)
            ok = s.get("nodesReporting") == 2 and s.get("drawWindowS", 0) >= 3
            return s if ok else None

        s = wait_for(observed, 60, 0.5, what=f"PowerDomain {row} status with both nodes' draw")
        assert s["measuredW"] == pytest.approx(expected, rel=0.01)
        assert s["drawP50W"] == pytest.approx(expected, rel=0.01) and s["drawP99W"] >= s["drawP50W"]
        assert s["headroomW"] == pytest.approx(20_000 - s["measuredW"], abs=0.2)
        assert s["capsApplied"] == 0 and s.get("overBudgetSeconds", 0) == 0
        assert _cond(s, "Reporting") == "True" and _cond(s, "OverBudget") == "False" and _cond(s, "Capping") == "False"
        # each agent's guard got its share of the budget: room to rise, all within the budget
        shares = wait_for(lambda: (v := [a.guard.config.share_w for a in agents]) and all(v) and v, 30, 0.5,
                          what="node shares at the agents")
        assert sum(shares) <= 20_000 and all(w >= expected / 2 for w in shares)

        # 2. the budget drops below the draw: caps go out as commands, are acknowledged, counted
        budget = round(0.85 * expected)
        kube.patch("PowerDomain", row, {"spec": {"budgetW": budget}})

        def capped() -> dict[str, Any] | None:
            s = _status(kube, row)
            settled = (s.get("capsApplied", 0) > 0 and s.get("capsPending", 1) == 0 and s.get("budgetW") == budget
                       and s.get("measuredW", 1e9) <= budget)
            return s if settled else None

        s = wait_for(capped, 60, 0.5, what=f"caps acknowledged and draw under {budget} W")
        limits = {f"{n}/{i}": src._limits[i] for n, src in sources.items() for i in range(8)}
        in_force = sorted(k for k, w in limits.items() if w < 700 - 0.5)
        assert s["cappedGpus"] == in_force and s["capsApplied"] == len(in_force) > 0
        assert s["capsAcknowledged"] >= len(in_force) and s.get("capsFailed", 0) == 0
        assert _cond(s, "Capping") == "True" and _cond(s, "OverBudget") == "False"
        plan = s["lastPlan"]
        assert plan["planId"] and plan["solverStatus"] and plan["solveMs"] >= 0 and plan["objective"] is not None
        assert row in plan["summary"]
        # the agents' own draw agrees with what the status reports
        spec = next(iter(sources.values())).spec
        actual = sum(gpu_power_w(spec, PREFILL, DECODE, w) for w in limits.values())
        assert actual <= budget and s["measuredW"] == pytest.approx(actual, rel=0.02)

        # 3. a budget below even the deepest caps: the policy says so, every second over budget is counted
        before = s.get("overBudgetSeconds", 0)
        kube.patch("PowerDomain", row, {"spec": {"budgetW": 2000}})
        seen: list[float] = []

        def counting() -> dict[str, Any] | None:
            s = _status(kube, row)
            seen.append(s.get("overBudgetSeconds", 0))
            ok = _cond(s, "OverBudget") == "True" and s.get("overBudgetSeconds", 0) >= before + 4
            return s if ok and (s.get("lastPlan") or {}).get("fallback") == "deepest-caps" else None

        s = wait_for(counting, 60, 0.5, what="over-budget seconds counted under an unreachable budget")
        assert seen == sorted(seen)  # cumulative: never goes back
        assert s["capsApplied"] == 16 and s["headroomW"] < 0
    finally:
        proc.terminate()
        kube.delete("PowerDomain", row)
        kube.delete("AcceleratorPool", pool)
