"""The agent's PowerDomain watch survives a kube-apiserver crash: a budget cut made as the server comes
back still reaches the guard, with no controller anywhere.

A real agent (8 simulated H100s, no hub reachable: it never connects) holds the share a controller
gave it and follows its PowerDomain on the test cluster. kube-apiserver is SIGKILLed and started 5 s
later; the moment it serves again the budget is cut. The watch must have noticed the outage (its
errors are counted), backed off rather than spun, and listed again: the node goes under its scaled
share. The time measured runs from the edit, so it includes what is left of the watch's back-off.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable

import pytest

from agents.agent import Agent, AgentConfig
from agents.sources.simulated import SimulatedSource, constant_load
from controller.kube import Kube
from tests.chaos.records import ChaosRecorder
from tests.controller import test_power_cluster as power_cluster
from tests.controller.cluster_helpers import free_port, wait_for
from tests.controller.test_power_cluster import DECODE, PREFILL, AgentThread
from wattplane.testcluster import TestCluster

pytestmark = [pytest.mark.chaos, pytest.mark.cluster]
start_agents = power_cluster.start_agents
BUDGET_W = 20_000.0
SHARE_W = 6_000.0  # the share "the controller" handed out before it went away: the node draws ~4,700 W


def test_budget_watch_resumes_after_an_api_server_crash(
        test_cluster: TestCluster, kube: Kube, start_agents: Callable[..., AgentThread], chaos: ChaosRecorder) -> None:
    row = f"bw-{uuid.uuid4().hex[:6]}"
    kube.create("PowerDomain", {"apiVersion": "wattplane.io/v1alpha1", "kind": "PowerDomain",
                                "metadata": {"name": row}, "spec": {"budgetW": BUDGET_W}})
    source = SimulatedSource(gpus=8, load=constant_load(PREFILL, DECODE), node_name=row)
    agent = Agent(AgentConfig(node_name=row, target=f"127.0.0.1:{free_port()}", watch_budget=True,
                              kubeconfig=test_cluster.kubeconfig), source)
    agent.set_share(SHARE_W, row, BUDGET_W)
    draw = sum(s.power_w for s in source.sample())
    try:
        with chaos.attempt("kube-apiserver SIGKILLed under the agents' PowerDomain watch, budget cut on return") as a:
            start_agents([agent])
            wait_for(lambda: agent.observed_budget_w == BUDGET_W, 30, 0.1, what="the agent reads the budget")
            watch = agent.budget_watch
            assert watch is not None
            errors_before = watch.errors
            t_down = time.monotonic()
            test_cluster.stop_component("kube-apiserver", signal.SIGKILL)
            time.sleep(5.0)
            test_cluster.start_component("kube-apiserver")
            outage = time.monotonic() - t_down
            low = round(0.6 * BUDGET_W * draw / SHARE_W)  # scaled share = 60% of the node's draw
            scaled = SHARE_W * low / BUDGET_W
            t_cut = time.monotonic()
            wait_for(lambda: kube.patch("PowerDomain", row, {"spec": {"budgetW": low}}), 30, 0.2,
                     what="the budget cut accepted")

            def capped() -> bool:
                return agent.guard.config.share_w == pytest.approx(scaled) and \
                    sum(s.power_w for s in source.sample()) <= scaled

            wait_for(capped, 45, 0.05, what=f"the node under its share scaled to {low} W after the restart")
            took = time.monotonic() - t_cut
            errors = watch.errors - errors_before
            a.converge_s = took
            a.detail = {"outage_s": round(outage, 2), "watch_errors": errors, "watches_opened": watch.watches,
                        "budget_w": low, "scaled_share_w": round(scaled), "draw_w": round(draw)}
            print(f"\nbudget watch: kube-apiserver SIGKILLed, back after {outage:.1f} s; the watch retried "
                  f"{errors} time(s), {watch.watches} watch request(s) in all; budget {BUDGET_W:.0f} -> {low} W "
                  f"on return: node {draw:.0f} W -> under its {scaled:.0f} W scaled share {took:.2f} s after the "
                  f"edit, no controller")
            assert errors > 0, "the watch never noticed the outage"
            assert errors < 60, f"{errors} retries in a {outage:.0f} s outage: the watch spins"
            assert not agent.connected
    finally:
        kube.delete("PowerDomain", row)
