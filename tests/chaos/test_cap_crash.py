"""The controller SIGKILLed right after its first power-cap command: the agents stay safe while it is
dead, its successor converges the caps without applying a command twice, and once the budget is
raised no cap is left on any GPU.

The fleet of ``tests/controller/test_power_cluster.py``: two 8-GPU nodes in a PowerDomain, real
agents with simulated GPUs streaming to the controller's hub over gRPC (TokenReview tokens). The
budget drops below the draw; the controller hands its first cap to the hub and dies (fault point
``executor.after_cap``). Every command an agent receives is recorded, so the test sees whether one
id was applied twice, or whether an id the dead controller used was answered from the agent's
memory when the successor meant something else by it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agents.agent import Agent, AgentConfig
from agents.sources.simulated import SimulatedSource, constant_load
from controller.kube import Kube
from policies.power_model import gpu_power_w
from protos.wattplane.v1 import agent_pb2 as pb
from tests.chaos.cluster_faults import Controller
from tests.chaos.records import ChaosRecorder
from tests.controller import test_power_cluster as power_cluster
from tests.controller.cluster_helpers import free_port, pool_body, wait_for
from tests.controller.test_power_cluster import (
    DECODE,
    PREFILL,
    AgentThread,
    _agent_token,
    _hub_port,
    _status,
    simulated_draws,
)
from wattplane.testcluster import TestCluster

pytestmark = [pytest.mark.chaos, pytest.mark.cluster]
# the power cluster test's fixtures: the power stage on, agents on a thread of their own (kube: tests/conftest.py)
power_on = power_cluster.power_on
start_agents = power_cluster.start_agents
GPUS = 8
OUTAGE_S = 12.0  # the controller stays dead this long: past the agents' 10 s fail-safe delay


@dataclass
class CommandLog:
    """What one agent received: every command (id, bytes), and the ids it actually applied."""

    received: list[tuple[str, bytes]] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)

    def watch(self, agent: Agent) -> None:
        apply, apply_inner = agent.applier.apply, agent.applier._apply

        def recorded_apply(cmd: pb.Command) -> pb.CommandResult:
            self.received.append((cmd.id, cmd.SerializeToString()))
            return apply(cmd)

        def recorded_inner(cmd: pb.Command) -> pb.CommandResult:
            self.applied.append(cmd.id)
            return apply_inner(cmd)

        agent.applier.apply = recorded_apply  # type: ignore[method-assign]
        agent.applier._apply = recorded_inner  # type: ignore[method-assign]

    def applied_twice(self) -> list[str]:
        return sorted({i for i in self.applied if i and self.applied.count(i) > 1})

    def reused_ids(self) -> list[str]:
        """Ids that arrived again with a different command: the agent answers them from memory."""
        first: dict[str, bytes] = {}
        out = set()
        for cid, raw in self.received:
            if first.setdefault(cid, raw) != raw:
                out.add(cid)
        return sorted(out)


def _limits(agents: dict[str, Agent]) -> dict[str, float]:
    """The power limit each device enforces, as the agent itself holds it."""
    return {f"{n}/{i}": a.limits.effective_w(i) for n, a in agents.items() for i in range(GPUS)}


def test_sigkill_mid_power_cap_leaves_no_cap_behind(
        test_cluster: TestCluster, kube: Kube, power_on: None, start_agents: Callable[..., AgentThread],
        tmp_path: Path, chaos: ChaosRecorder) -> None:
    uid = uuid.uuid4().hex[:6]
    pool, row, lease = f"cc-{uid}", f"crow-{uid}", f"capcrash-{uid}"
    kube.create("AcceleratorPool", pool_body(pool, GPUS))
    nodes = test_cluster.add_gpu_nodes(pool, 2, gpus=GPUS, labels={"wattplane.io/row": row})
    kube.create("PowerDomain", {"apiVersion": "wattplane.io/v1alpha1", "kind": "PowerDomain",
                                "metadata": {"name": row},
                                "spec": {"budgetW": 20_000, "safetyMargin": 0.02,
                                         "nodeSelector": {"wattplane.io/row": row}}})
    grpc_port = free_port()  # both controllers serve the hub here: the agents reconnect to the same target
    hub_args = ("--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port))
    procs: list[Controller] = []

    def controller(identity: str, faults: str = "") -> Controller:
        c = Controller(test_cluster.kubeconfig, tmp_path, lease, identity, faults=faults, resync_s=30.0,
                       extra_args=hub_args)
        procs.append(c)
        return c

    try:
        with chaos.attempt("SIGKILL mid power-cap") as a:
            armed = controller("armed", faults="executor.after_cap=1")
            token = _agent_token(test_cluster)
            assert _hub_port(armed) == grpc_port  # type: ignore[arg-type]
            sources = {n: SimulatedSource(gpus=GPUS, load=constant_load(PREFILL, DECODE), node_name=n) for n in nodes}
            agents = {n: Agent(AgentConfig(node_name=n, target=f"127.0.0.1:{grpc_port}", token=token), s)
                      for n, s in sources.items()}
            logs = {n: CommandLog() for n in nodes}
            for n, ag in agents.items():
                logs[n].watch(ag)
            start_agents(list(agents.values()))
            top = next(iter(sources.values())).spec.max_power_w
            expected = 2 * GPUS * gpu_power_w(next(iter(sources.values())).spec, PREFILL, DECODE)

            wait_for(lambda: _status(kube, row).get("nodesReporting") == 2, 60, 0.5,
                     what=f"PowerDomain {row} with both nodes reporting to the armed controller")
            # 1. the budget drops below the draw: the armed controller dies after handing over its first cap
            low = round(0.85 * expected)
            kube.patch("PowerDomain", row, {"spec": {"budgetW": low}})
            try:
                armed.proc.wait(60)
            except Exception as exc:
                raise AssertionError(f"the armed controller never capped:\n{armed.log_tail()}") from exc
            t_kill = time.monotonic()
            assert armed.fired() == ["executor.after_cap 1"], armed.fired()

            # 2. while it is dead: what the agents hold, and what the nodes draw
            at_kill = _limits(agents)
            outage: list[tuple[dict[str, float], dict[str, float]]] = []
            while time.monotonic() - t_kill < OUTAGE_S:
                outage.append((_limits(agents), simulated_draws(agents)))
                time.sleep(0.5)
            shares = {n: ag.guard.config.share_w for n, ag in agents.items()}
            raised = sorted(k for lim, _ in outage for k, w in lim.items() if w > at_kill[k] + 0.5)
            node_peak = {n: max(d[n] for _, d in outage) for n in nodes}
            domain_peak = max(sum(d.values()) for _, d in outage)
            disconnected = not any(ag.connected for ag in agents.values())
            failsafe = {n: any(c is not None for c in ag.limits.failsafe_w) for n, ag in agents.items()}
            applied_before_kill = sum(len(lg.applied) for lg in logs.values())
            capped_at_kill = sorted(k for k, w in at_kill.items() if w < top - 0.5)

            # 3. restarted unarmed, budget still low: caps converge, every one answered, none applied twice
            fresh = controller("restarted")
            wait_for(fresh.is_leader, 60, what="the restarted controller leads")

            def capped() -> dict[str, Any] | None:
                s = _status(kube, row)
                ok = (s.get("nodesReporting") == 2 and s.get("capsApplied", 0) > 0 and s.get("capsPending", 1) == 0
                      and s.get("budgetW") == low and s.get("measuredW", 1e9) <= low
                      and sum(simulated_draws(agents).values()) <= low)
                return s if ok else None

            s = wait_for(capped, 90, 0.5, what=f"caps acknowledged and draw under {low} W after the restart")
            caps_converged_s = time.monotonic() - t_kill
            limits = _limits(agents)
            in_force = sorted(k for k, w in limits.items() if w < top - 0.5)
            assert s["cappedGpus"] == in_force and s.get("capsFailed", 0) == 0 and s.get("capsAcknowledged", 0) > 0
            draw_capped = s["measuredW"]
            twice = {n: lg.applied_twice() for n, lg in logs.items() if lg.applied_twice()}
            reused = {n: lg.reused_ids() for n, lg in logs.items() if lg.reused_ids()}

            # 4. budget well above the draw: every device back at its maximum, as the agents hold it
            high = round(3 * expected)
            t_raise = time.monotonic()
            kube.patch("PowerDomain", row, {"spec": {"budgetW": high}})

            def released() -> dict[str, Any] | None:
                s = _status(kube, row)
                free = all(abs(w - top) < 0.5 for w in _limits(agents).values())
                free = free and all(abs(w - top) < 0.5 for src in sources.values() for w in src._limits)
                ok = free and s.get("budgetW") == high and s.get("capsApplied", 1) == 0 and not s.get("cappedGpus")
                return s if ok else None

            try:
                s = wait_for(released, 60, 0.5, what=f"every cap released under a {high} W budget")
            finally:
                left = sorted(k for k, w in _limits(agents).items() if abs(w - top) >= 0.5)
            release_s = time.monotonic() - t_raise
            a.converge_s = caps_converged_s
            a.detail = {"fired": armed.fired(), "applied_before_kill": applied_before_kill,
                        "capped_at_kill": capped_at_kill, "limits_raised_while_dead": raised,
                        "node_share_w": shares, "node_peak_w_while_dead": {n: round(w) for n, w in node_peak.items()},
                        "domain_peak_w_while_dead": round(domain_peak), "budget_w": low,
                        "failsafe_engaged": failsafe, "caps_after_restart": in_force, "draw_capped_w": draw_capped,
                        "caps_converged_after_kill_s": round(caps_converged_s, 2),
                        "applied_twice": twice, "ids_reused": reused, "release_s": round(release_s, 2),
                        "caps_left": left}
            guard_note = ", ".join(f"{n}: share {w:.0f} W, peak {node_peak[n]:.0f} W" for n, w in shares.items())
            print(f"\ncap crash: budget {20_000} -> {low} W under a {expected:.0f} W draw; the armed controller "
                  f"died at {armed.fired()[0]!r} ({applied_before_kill} command(s) applied by the agents before the "
                  f"kill, GPUs capped then: {capped_at_kill or 'none'}); dead for {OUTAGE_S:.0f} s: agents "
                  f"disconnected {disconnected}, limits raised while dead {raised or 'none'}, fail-safe "
                  f"{failsafe}, node draws ({guard_note or 'no share'}); domain peak {domain_peak:.0f} W vs "
                  f"budget {low} W; restarted: {len(in_force)} GPU(s) capped and acknowledged, draw "
                  f"{draw_capped:.0f} W, {caps_converged_s:.1f} s after the kill; "
                  f"commands applied twice: {twice or 'none'}; ids reused for another command: {reused or 'none'}; "
                  f"budget -> {high} W: every GPU back at {top:.0f} W in {release_s:.1f} s, caps left: "
                  f"{left or 'none'}")
            assert disconnected, "an agent still thinks it is connected to a dead controller"
            assert not raised, f"a cap was lifted while the controller was dead: {raised}"
            for n, share in shares.items():
                if share > 0:
                    assert node_peak[n] <= share, f"{n} drew {node_peak[n]:.0f} W over its {share:.0f} W share"
            assert not twice, f"commands applied twice: {twice}"
            assert not reused, f"command ids reused for different commands (answered from memory): {reused}"
            assert not left, f"caps left after the budget rose: {left}"
    finally:
        for c in procs:
            c.terminate()
        kube.delete("PowerDomain", row)
        kube.delete("AcceleratorPool", pool)
