"""A PowerDomain budget lowered while the controller is down reaches the agents' guards.

The fleet of ``tests/controller/test_power_cluster.py``: two kwok nodes x 8 simulated H100s in a
PowerDomain, real agents streaming to the controller process's hub, each agent following its
PowerDomain with its own list+watch. First a cut with the controller up: it caps by priority and
hands out shares of the new budget within the agents' grace, so no guard takes over. Then the
controller stops and an operator cuts the budget again: the agents scale their shares down and
their guards cap the nodes under them, no controller involved. Before the agents watched their
domain the shares stayed those of the old budget and the nodes kept drawing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from agents.agent import Agent, AgentConfig
from agents.sources.simulated import SimulatedSource, constant_load
from controller.kube import Kube
from tests.controller import test_power_cluster as power_cluster
from tests.controller.cluster_helpers import ControllerProcess, pool_body, wait_for
from tests.controller.test_power_cluster import DECODE, PREFILL, AgentThread, _agent_token, _hub_port, simulated_draws
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster
power_on = power_cluster.power_on
start_agents = power_cluster.start_agents
GPUS = 8
BUDGET_W = 20_000
CUT_TO = 0.7  # the cut leaves each node's scaled share at 70% of its draw (well above 8 x 200 W minimum)
CAP_WITHIN_S = 5.0  # the guard acts within 0.25 s of the new share; the rest is the watch event's way
GRACE_S = AgentConfig(node_name="", target="").guard.cut_grace_s  # a connected controller's time to act


def test_budget_cut_while_the_controller_is_down_caps_the_nodes(
        test_cluster: TestCluster, kube: Kube, power_on: None, start_agents: Callable[..., AgentThread],
        tmp_path: Path) -> None:
    uid = uuid.uuid4().hex[:6]
    pool, row = f"bc-{uid}", f"brow-{uid}"
    kube.create("AcceleratorPool", pool_body(pool, GPUS))
    nodes = test_cluster.add_gpu_nodes(pool, 2, gpus=GPUS, labels={"wattplane.io/row": row})
    kube.create("PowerDomain", {"apiVersion": "wattplane.io/v1alpha1", "kind": "PowerDomain",
                                "metadata": {"name": row},
                                "spec": {"budgetW": BUDGET_W, "safetyMargin": 0.02,
                                         "nodeSelector": {"wattplane.io/row": row}}})
    proc = ControllerProcess(test_cluster.kubeconfig, tmp_path, f"bcut-{uid}", f"bc-{uid}", resync_s=30.0)
    try:
        token = _agent_token(test_cluster)
        port = _hub_port(proc)
        sources = {n: SimulatedSource(gpus=GPUS, load=constant_load(PREFILL, DECODE), node_name=n) for n in nodes}
        agents = {n: Agent(AgentConfig(node_name=n, target=f"127.0.0.1:{port}", token=token, watch_budget=True,
                                       kubeconfig=test_cluster.kubeconfig), s)
                  for n, s in sources.items()}
        start_agents(list(agents.values()))

        # 1. the controller hands out shares with their basis; each agent reads the same budget itself
        def shared(budget: float) -> bool:
            return all(a.share_w > 0 and a.share_domain == row and a.share_budget_w == budget
                       and a.observed_budget_w == budget for a in agents.values())

        wait_for(lambda: shared(BUDGET_W), 60, 0.25, what=f"shares of {row}'s {BUDGET_W} W at both agents")
        expected = sum(simulated_draws(agents).values())

        # 2. a cut with the controller up: its priority-aware caps and shares of the new budget come
        # within the agents' grace, so no guard takes over (they would hold the domain for good)
        first = round(0.85 * expected)
        t_first = time.monotonic()
        kube.patch("PowerDomain", row, {"spec": {"budgetW": first}})
        wait_for(lambda: shared(first) and sum(simulated_draws(agents).values()) <= first, GRACE_S, 0.1,
                 what=f"the controller's caps and shares of the {first} W budget within the agents' grace")
        rebased_s = time.monotonic() - t_first
        assert all(a.budget_cuts == 0 and not a.guard.active for a in agents.values())
        shares = {n: a.share_w for n, a in agents.items()}
        draw = simulated_draws(agents)

        # 3. the controller goes away
        proc.terminate()
        wait_for(lambda: not any(a.connected for a in agents.values()), 30, 0.1, what="agents disconnected")
        assert all(a.share_w == shares[n] for n, a in agents.items())  # nobody sent anything since

        # 4. the operator cuts the budget again: each node's scaled share falls to CUT_TO of its draw
        low = round(CUT_TO * first * min(draw[n] / shares[n] for n in nodes))
        scaled = {n: shares[n] * low / first for n in nodes}
        assert all(scaled[n] < draw[n] for n in nodes)  # so the old shares would leave the nodes as they are
        t_cut = time.monotonic()
        kube.patch("PowerDomain", row, {"spec": {"budgetW": low}})

        def under() -> dict[str, float] | None:
            now = simulated_draws(agents)
            return now if all(now[n] <= scaled[n] for n in nodes) else None

        capped = wait_for(under, CAP_WITHIN_S, 0.02, what=f"both nodes under their shares scaled to {low} W")
        took_s = time.monotonic() - t_cut
        assert not any(a.connected for a in agents.values())
        for n, a in agents.items():
            assert a.guard.config.share_w == pytest.approx(scaled[n]) and a.guard.active and a.budget_cuts == 1
            assert a.observed_budget_w == low
        assert sum(capped.values()) <= low  # the scaled shares fit the new budget together
        print(f"\nbudget cut with the controller up: {BUDGET_W} -> {first} W under a {expected:.0f} W draw, its caps "
              f"and shares of the new budget {rebased_s:.2f} s after the edit, no guard engaged; controller "
              f"stopped, cut {first} -> {low} W: shares "
              f"{', '.join(f'{shares[n]:.0f} -> {scaled[n]:.0f} W' for n in nodes)}; node draws "
              f"{', '.join(f'{draw[n]:.0f} -> {capped[n]:.0f} W' for n in nodes)}, under the scaled shares "
              f"{took_s:.2f} s after the edit")
    finally:
        proc.terminate()
        kube.delete("PowerDomain", row)
        kube.delete("AcceleratorPool", pool)
