"""Network faults between one node agent and the hub: the agent runs in its own network namespace.

The test makes a namespace and a veth pair with link-local addresses (169.254.0.0/16), runs the
hub in this process (root namespace) and the agent as a process inside the namespace (this module
is also the agent runner: ``python -m tests.chaos.test_agent_network --hub ...``). Faults: the
link cut (``ip link set down``) while the node's load rises past its power share, the link
flapped, and the agent->hub direction throttled to a crawl (``tc tbf``; this kernel has no
``netem``) while a command is in flight, then cut. The runner logs every guard step (power, share,
connected, last report seq) and every command delivery as JSON lines the test reads.

Asserted: the local guard brings the node under its share within 1 s while cut off and keeps it
there; after reconnecting the hub has every report exactly once and in seq order (nothing lost,
duplicates dropped); a command delivered twice is applied once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.records import ChaosRecorder

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "chaos-token"
NODE = "chaos-node"
SHARE_W = 4800.0  # low load draws ~3,870 W on 8 simulated H100s, high load ~5,550 W
LOW_LOAD = (0.05, 0.2)
HIGH_LOAD = (0.9, 1.0)
REPORT_INTERVAL_S = 0.2

pytestmark = pytest.mark.chaos


# -- the agent runner (inside the namespace) -------------------------------------------------------
def _runner(argv: list[str]) -> None:
    from agents.agent import Agent, AgentConfig
    from agents.guard import GuardConfig
    from agents.sources.simulated import SimulatedSource
    from protos.wattplane.v1 import agent_pb2 as pb

    p = argparse.ArgumentParser()
    p.add_argument("--hub", required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--load-file", type=Path, required=True)
    args = p.parse_args(argv)
    log = args.log.open("a", buffering=1)

    def emit(**fields: Any) -> None:
        log.write(json.dumps({"t": time.time(), **fields}) + "\n")

    def load(_t: float, _i: int) -> tuple[float, float]:
        prefill, decode = args.load_file.read_text().split()
        return float(prefill), float(decode)

    config = AgentConfig(
        node_name=NODE, target=args.hub, token=TOKEN, report_interval_s=REPORT_INTERVAL_S, backoff_base_s=0.1,
        backoff_max_s=1.0, keepalive_s=1.0, welcome_timeout_s=2.0,
        guard=GuardConfig(share_w=SHARE_W, failsafe_after_s=3.0),
    )  # fmt: skip
    source = SimulatedSource(gpus=8, load=load, node_name=NODE)
    agent = Agent(config, source)

    step = agent.guard_step

    def logged_step() -> None:
        step()
        measured = sum(s.power_w for s in agent._last_samples)  # what the guard saw before acting
        power = sum(s.power_w for s in source.sample())  # what the devices draw with the limits now in force
        emit(
            kind="guard", measured=measured, power=power, share=agent.guard.config.share_w, connected=agent.connected,
            seq=agent._seq,
        )  # fmt: skip

    apply = agent.applier.apply

    def logged_apply(cmd: pb.Command) -> pb.CommandResult:
        fresh = cmd.id not in agent.applier._done
        emit(kind="command", id=cmd.id, fresh=fresh)
        return apply(cmd)

    agent.guard_step = logged_step  # type: ignore[method-assign]
    agent.applier.apply = logged_apply  # type: ignore[method-assign]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, agent.stop)
        await agent.run()
        emit(kind="exit", seq=agent._seq, dropped=agent.dropped_reports, resent=agent.resent_reports)

    asyncio.run(main())


# -- the namespace ------------------------------------------------------------------------------------
@dataclass
class Net:
    ns: str
    host_if: str  # root-namespace end (the hub's side)
    agent_if: str
    hub_ip: str
    agent_ip: str

    def sh(self, *cmd: str, ns: bool = False) -> None:
        full = ["ip", "netns", "exec", self.ns, *cmd] if ns else list(cmd)
        subprocess.run(full, check=True, capture_output=True, text=True)

    def link(self, up: bool) -> None:
        self.sh("ip", "link", "set", self.host_if, "up" if up else "down")

    def throttle(self, on: bool) -> None:
        """Starve the agent->hub direction (egress of the namespace end); hub->agent stays fast."""
        if on:
            self.sh("tc", "qdisc", "add", "dev", self.agent_if, "root", "tbf", "rate", "1kbit", "burst", "1600",
                    "latency", "30s", ns=True)  # fmt: skip
        else:
            self.sh("tc", "qdisc", "del", "dev", self.agent_if, "root", ns=True)


def _fail_or_skip(msg: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    pid = os.getpid()
    octet = 100 + pid % 100
    n = Net(f"wpchaos{pid}", f"wph{pid}", f"wpa{pid}", f"169.254.{octet}.1", f"169.254.{octet}.2")
    try:
        n.sh("ip", "netns", "add", n.ns)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        _fail_or_skip(
            f"cannot create a network namespace ({detail}); needs root (or CAP_NET_ADMIN) and the Debian "
            "package iproute2 (ip, tc)"
        )
    try:
        n.sh("ip", "link", "add", n.host_if, "type", "veth", "peer", "name", n.agent_if)
        n.sh("ip", "link", "set", n.agent_if, "netns", n.ns)
        n.sh("ip", "addr", "add", f"{n.hub_ip}/30", "dev", n.host_if)
        n.sh("ip", "link", "set", n.host_if, "up")
        n.sh("ip", "addr", "add", f"{n.agent_ip}/30", "dev", n.agent_if, ns=True)
        n.sh("ip", "link", "set", n.agent_if, "up", ns=True)
        n.sh("ip", "link", "set", "lo", "up", ns=True)
        yield n
    finally:
        subprocess.run(["ip", "link", "del", n.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", n.ns], capture_output=True)


# -- the hub (root namespace, a thread of this process) ------------------------------------------------
class HubThread:
    def __init__(self, address: str) -> None:
        from controller.telemetry import HubConfig, StaticTokenAuthenticator, TelemetryHub, start_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        # a deep history keeps every report, so the test sees exactly what the hub stored
        self.hub = TelemetryHub(
            StaticTokenAuthenticator({TOKEN: "chaos"}),
            HubConfig(report_interval_s=REPORT_INTERVAL_S, history=100_000),
        )
        self.server, self.port = self.call(start_server(self.hub, f"{address}:0"))

    def call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout=10)

    def run(self, fn: Callable[[], Any]) -> Any:
        async def wrapped() -> Any:
            return fn()

        return self.call(wrapped())

    def stop(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    load_file: Path

    def set_load(self, prefill: float, decode: float) -> float:
        tmp = self.load_file.with_suffix(".tmp")
        tmp.write_text(f"{prefill} {decode}")
        os.replace(tmp, self.load_file)
        return time.time()

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                out.append(json.loads(line))
        return out

    def seq(self) -> int:
        guards = [x for x in self.lines() if x["kind"] == "guard"]
        return int(guards[-1]["seq"]) if guards else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def setup(net: Net, tmp_path: Path) -> Iterator[tuple[Net, HubThread, AgentProcess]]:
    hub = HubThread(net.hub_ip)
    load_file = tmp_path / "load"
    load_file.write_text(f"{LOW_LOAD[0]} {LOW_LOAD[1]}")
    log = tmp_path / "agent.jsonl"
    cmd = ["ip", "netns", "exec", net.ns, sys.executable, "-m", "tests.chaos.test_agent_network"]
    cmd += ["--hub", f"{net.hub_ip}:{hub.port}", "--log", str(log), "--load-file", str(load_file)]
    stderr = (tmp_path / "agent.stderr").open("wb")
    agent = AgentProcess(subprocess.Popen(cmd, cwd=ROOT, stderr=stderr), log, load_file)
    try:
        wait(lambda: hub.run(lambda: NODE in hub.hub.nodes and hub.hub.nodes[NODE].reports >= 5), 20, "first reports")
        yield net, hub, agent
    finally:
        agent.stop()
        with contextlib.suppress(Exception):
            net.link(True)
        hub.stop()
        stderr.close()


def wait(cond: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.time()
    while not cond():
        if time.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.time() - start


def stored_seqs(hub: HubThread) -> list[int]:
    return list(hub.run(lambda: [r.seq for r in hub.hub.nodes[NODE].history]))


def converge(hub: HubThread, agent: AgentProcess) -> float:
    """Seconds until the hub stored every report the agent had made when the link came back."""
    target = agent.seq()
    return wait(lambda: hub.run(lambda: hub.hub.nodes[NODE].last_seq) >= target, 30, f"report seq {target}")


def check_exactly_once(hub: HubThread, agent: AgentProcess) -> dict[str, int]:
    agent.stop()
    exit_line = [x for x in agent.lines() if x["kind"] == "exit"]
    assert exit_line, "the agent runner did not exit cleanly"
    last = int(exit_line[-1]["seq"])
    # the last report or two may be made while the agent shuts down, after its stream closed
    wait(lambda: hub.run(lambda: hub.hub.nodes[NODE].last_seq) >= last - 2, 5, "the last reports")
    seqs = stored_seqs(hub)
    assert len(seqs) == len(set(seqs)), "a report was stored twice"
    assert seqs == sorted(seqs), "reports stored out of order"
    assert seqs == list(range(1, seqs[-1] + 1)), f"reports lost: {sorted(set(range(1, seqs[-1] + 1)) - set(seqs))}"
    assert exit_line[-1]["dropped"] == 0
    return {
        "made": last,
        "stored": len(seqs),
        "lost": seqs[-1] - len(seqs),
        "duplicates_dropped_by_hub": hub.run(lambda: hub.hub.duplicates),
        "resent_by_agent": int(exit_line[-1]["resent"]),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# -- the faults ----------------------------------------------------------------------------------------
def test_link_cut_guard_holds_share_and_reports_arrive_once(setup: tuple[Net, HubThread, AgentProcess],
                                                            chaos: ChaosRecorder) -> None:
    from protos.wattplane.v1 import agent_pb2 as pb

    net, hub, agent = setup
    cmd = pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[0], watts=650))
    cid = hub.run(lambda: hub.hub.send_command(NODE, cmd, command_id="before-cut"))
    wait(lambda: hub.run(lambda: hub.hub.commands[cid].result is not None), 10, "the first command's result")

    t_cut = time.time()
    net.link(False)
    noticed = wait(
        lambda: any(x["kind"] == "guard" and not x["connected"] and x["t"] > t_cut for x in agent.lines()),
        10,
        "the agent to notice the cut",
    )
    late = pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[1], watts=640))
    late_id = hub.run(lambda: hub.hub.send_command(NODE, late, command_id="during-cut"))
    t_load = agent.set_load(*HIGH_LOAD)
    time.sleep(4.0)  # cut off past the fail-safe timeout too
    during = [x for x in agent.lines() if x["kind"] == "guard" and x["t"] > t_load]
    assert during and not any(x["connected"] for x in during), "the agent was not cut off"
    over = [x for x in during if x["measured"] > x["share"]]
    assert over, "the load step never pushed the node over its share: the fault was not real"
    first_under = next((x for x in during if x["power"] <= x["share"] and x["t"] >= over[0]["t"]), None)
    assert first_under is not None, "the guard never brought the node under its share"
    react_s = first_under["t"] - t_load
    after = [x for x in during if x["t"] > first_under["t"]]
    peak_after = max(max(x["measured"], x["power"]) for x in after)
    print(
        f"\nlink cut: agent noticed in {noticed:.2f} s; load stepped to {HIGH_LOAD}; the guard measured "
        f"{over[0]['measured']:.0f} W > {SHARE_W:.0f} W share and the node drew {first_under['power']:.0f} W "
        f"{react_s:.2f} s after the step; peak afterwards {peak_after:.0f} W over {len(after)} guard steps "
        f"(fail-safe timeout 3 s passed while cut off)"
    )
    assert react_s < 1.0, f"guard took {react_s:.2f} s"
    assert peak_after <= SHARE_W, "the node went over its share again while cut off"

    t_up = time.time()
    net.link(True)
    conv = converge(hub, agent)
    wait(lambda: hub.run(lambda: hub.hub.commands[late_id].result is not None), 15, "the cut-off command's result")
    counts = check_exactly_once(hub, agent)
    commands = [x for x in agent.lines() if x["kind"] == "command"]
    fresh = {c: sum(1 for x in commands if x["id"] == c and x["fresh"]) for c in (cid, late_id)}
    print(
        f"reconnected and caught up {conv:.2f} s after the link came back ({time.time() - t_up:.1f} s total); "
        f"reports {counts}; command applications {fresh}"
    )
    assert fresh == {cid: 1, late_id: 1}
    chaos.write("agent link cut ~5 s during a load step over its share", True, counts["lost"], conv,
                {"guard_react_s": round(react_s, 2), "reports": counts, "command_applications": fresh})


def test_link_flaps_reports_arrive_once(setup: tuple[Net, HubThread, AgentProcess], chaos: ChaosRecorder) -> None:
    net, hub, agent = setup
    times = []
    downs = [0.7, 2.5, 0.3, 3.0, 0.7, 2.5]  # short ones ride on TCP retransmits, long ones force a reconnect
    for down in downs:
        net.link(False)
        time.sleep(down)
        net.link(True)
        times.append(converge(hub, agent))
        time.sleep(0.5)
    reconnects = sum(1 for a, b in zip(agent.lines(), agent.lines()[1:], strict=False) if b.get("connected")
                     and a.get("connected") is False)  # fmt: skip
    counts = check_exactly_once(hub, agent)
    print(
        f"\n{len(downs)} flaps (down {downs} s): {reconnects} reconnects; caught up after each in p50 "
        f"{percentile(times, 50):.2f} s / max {max(times):.2f} s; reports {counts}"
    )
    for i, (down, conv) in enumerate(zip(downs, times, strict=True)):  # a record per flap; losses: the run's
        chaos.write("agent link flapped (one cut of 0.3-3 s)", True, counts["lost"] if i == len(downs) - 1 else 0,
                    conv, {"down_s": down})


def test_throttled_then_cut_command_applied_once(setup: tuple[Net, HubThread, AgentProcess],
                                                 chaos: ChaosRecorder) -> None:
    from protos.wattplane.v1 import agent_pb2 as pb

    net, hub, agent = setup
    net.throttle(True)
    # The bottleneck's 1,600-byte bucket passes two reports, then each takes ~5 s. Once the hub stops
    # getting reports the queue is full; the command goes out then, before the agent's keepalive (its
    # pings wait in the same queue) gives up on the connection, so its result waits behind reports.
    seen = [hub.run(lambda: hub.hub.nodes[NODE].last_seq), time.time()]

    def stalled() -> bool:
        now_seq = hub.run(lambda: hub.hub.nodes[NODE].last_seq)
        if now_seq != seen[0]:
            seen[:] = [now_seq, time.time()]
        return time.time() - seen[1] >= 0.3

    wait(stalled, 5, "the throttled link to stall reports")
    cmd = pb.Command(set_power_limit=pb.SetPowerLimit(gpu_indices=[2], watts=630))
    cid = hub.run(lambda: hub.hub.send_command(NODE, cmd, command_id="throttled"))
    wait(lambda: any(x["kind"] == "command" and x["id"] == cid for x in agent.lines()), 10, "the command to arrive")
    net.link(False)
    time.sleep(1.5)
    net.throttle(False)
    net.link(True)
    conv = converge(hub, agent)
    wait(lambda: hub.run(lambda: hub.hub.commands[cid].result is not None), 15, "the command's result")
    lag = hub.run(lambda: hub.hub.nodes[NODE].lag_ms_max)
    counts = check_exactly_once(hub, agent)
    deliveries = [x for x in agent.lines() if x["kind"] == "command" and x["id"] == cid]
    sends = hub.run(lambda: hub.hub.commands[cid].sends)
    print(
        f"\nthrottled to 1 kbit/s agent->hub, then cut 1.5 s: caught up in "
        f"{conv:.2f} s; command sent {sends}x by the hub, delivered {len(deliveries)}x, applied "
        f"{sum(x['fresh'] for x in deliveries)}x; reports {counts}; worst report lag {lag:.0f} ms"
    )
    assert sum(x["fresh"] for x in deliveries) == 1
    assert len(deliveries) >= 2, "the result was not held back: the re-delivery path was not exercised"
    chaos.write("agent->hub throttled to 1 kbit/s with a command in flight, then cut 1.5 s", True, counts["lost"],
                conv, {"command_sends": sends, "applied": sum(x["fresh"] for x in deliveries)})


if __name__ == "__main__":
    _runner(sys.argv[1:])
