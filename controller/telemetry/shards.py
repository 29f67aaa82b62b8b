"""The hub sharded by node across processes: N worker hubs, one merged view in the controller.

One hub event loop tops out near a core's worth of reports; streams are independent, so the hub
scales by running N worker processes, each a full ``TelemetryHub`` + gRPC server on the *same*
port (``SO_REUSEPORT``: the kernel spreads new connections over the listening sockets). A node's
stream lives in exactly one shard. Every ``flush_s`` a worker sends the controller process one
batch over a pipe: stream opens and closes, per node the latest stored report (earlier ones only
when they carry MoE expert tokens, the one thing the ring buffer is read for), command results,
and its counters. ``ShardedHub`` in the controller process is a ``TelemetryHub`` without a server
whose node state those batches feed, so ``summarise``, the metrics collector (per-GPU and
per-domain power exported once, merged) and ``HubAgentPort`` use it unchanged. A command goes down
the pipe of the shard holding the node's stream and is re-sent on the next open seen from any
shard until its result comes back (at least once, ids de-duplicate).

A shard that dies: its nodes are marked disconnected, its agents reconnect (the kernel now sends
them to the surviving listeners) and the shard is restarted; nothing else is disturbed. A shard
welcomes an agent new to it with the seq the merged view holds for that agent instance (one round
trip over the pipe, bounded by ``SEQ_HINT_TIMEOUT_S``), so a moved agent re-sends only reports that
were never stored; the merged view never goes back to an older seq either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from controller.telemetry.auth import Authenticator, Identity
from controller.telemetry.gctune import tune_for_streams
from controller.telemetry.hub import CommandRecord, CommandState, HubConfig, NodeState, TelemetryHub, _Session
from protos.wattplane.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)


SEQ_HINT_TIMEOUT_S = 0.5  # a shard waits this long for the merged view's seq before welcoming an agent


@dataclass(frozen=True)
class ShardSpec:
    """What a worker process needs; picklable (the authenticator is built in the worker)."""

    index: int
    host: str
    port: int
    config: HubConfig
    auth_factory: Callable[[], Authenticator]
    tls_cert: Path | None = None
    tls_key: Path | None = None
    flush_s: float = 0.25
    accepting: bool = True


# -- the worker side ----------------------------------------------------------------------------------
class _Batch:
    """A shard's ``ShardSink``: what happened since the last flush, in order."""

    def __init__(self, hub: TelemetryHub) -> None:
        self._hub = hub
        self.events: list[tuple[Any, ...]] = []
        self.latest: dict[str, tuple[bytes, float, int, bool]] = {}  # node -> (raw, stored at, count, experts)
        self.kept: dict[str, list[bytes]] = {}  # node -> earlier reports with expert tokens

    def opened(self, state: NodeState) -> None:
        hello = state.hello.SerializeToString()
        self.events.append(("open", state.name, hello, state.identity, state.connected_at))

    def closed(self, node: str) -> None:
        self.events.append(("close", node))
        # the controller process holds each command until its result; it re-routes to the next shard
        hub = self._hub
        hub.commands = {c: r for c, r in hub.commands.items() if r.node != node}

    def stored(self, node: str, raw: bytes, keep: bool) -> None:
        prev = self.latest.get(node)
        n = 1
        if prev is not None:
            n += prev[2]
            if prev[3]:  # superseded but carrying expert tokens: the merged ring buffer needs it
                kept = self.kept.setdefault(node, [])
                kept.append(prev[0])
                if len(kept) > self._hub.config.history:
                    del kept[0]
        self.latest[node] = (raw, self._hub.now(), n, keep)

    def result(self, result: pb.CommandResult) -> None:
        self.events.append(("result", result.SerializeToString()))

    def take(self) -> dict[str, Any]:
        hub = self._hub
        reports = {}
        for node, (raw, at, n, _) in self.latest.items():
            reports[node] = (raw, at, n, self.kept.get(node, []))
        out = {
            "events": self.events,
            "reports": reports,
            "counters": {
                "reports": hub.reports_total,
                "duplicates": hub.duplicates,
                "rejected": dict(hub.rejected),
                "shed": dict(hub.shed),
                "cpu_s": time.process_time(),
            },
        }
        self.events, self.latest, self.kept = [], {}, {}
        return out


def _worker(spec: ShardSpec, conn: Connection) -> None:
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s shard-{spec.index} %(levelname)s %(name)s: %(message)s"
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_worker_main(spec, conn))


async def _worker_main(spec: ShardSpec, conn: Connection) -> None:
    from controller.telemetry.server import start_server

    loop = asyncio.get_running_loop()
    hub = TelemetryHub(spec.auth_factory(), spec.config)
    hub.accepting = spec.accepting
    batch = _Batch(hub)
    hub.sink = batch
    server, port = await start_server(
        hub, f"{spec.host}:{spec.port}", tls_cert=spec.tls_cert, tls_key=spec.tls_key, reuse_port=True
    )
    if hub._sweeper is not None:  # the controller process sweeps the merged view; a shard's would only log
        hub._sweeper.cancel()
    tune_for_streams()
    conn.send(("ready", port))
    done = loop.create_future()
    flush_now = asyncio.Event()
    asked: dict[int, asyncio.Future[int]] = {}
    ids = iter(range(1, 1 << 62))

    async def seq_hint(hello: pb.NodeHello) -> int:
        """Ask the controller process which seq of this agent instance it holds, so an agent that moved
        here from a dead shard re-sends only what was never stored (not its whole unconfirmed ring)."""
        rid = next(ids)
        fut = asked[rid] = loop.create_future()
        batch.events.append(("seq?", rid, hello.node_name, hello.instance_id))
        flush_now.set()
        try:
            return await asyncio.wait_for(fut, SEQ_HINT_TIMEOUT_S)
        except TimeoutError:
            return 0  # the agent re-sends its unconfirmed reports; the merged view drops what it holds
        finally:
            asked.pop(rid, None)

    hub.seq_hint = seq_hint

    def on_message() -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                kind = msg[0]
                if kind == "cmd":
                    _, node, raw = msg
                    if node in hub._sessions:  # else the node moved: the controller re-routes on its open
                        cmd = pb.Command.FromString(raw)
                        hub.send_command(node, cmd, command_id=cmd.id)
                elif kind == "seq":
                    fut = asked.get(msg[1])
                    if fut is not None and not fut.done():
                        fut.set_result(msg[2])
                elif kind == "accept":
                    hub.set_accepting(msg[1])
                elif kind == "shares":
                    hub._shares.update(msg[1])  # for the Welcome; changes are sent as commands by the controller
                    hub._share_basis.update(msg[2] if len(msg) > 2 else {})
                elif kind == "stop":
                    raise EOFError
        except (EOFError, OSError):  # the controller process is gone or asked us to stop
            loop.remove_reader(conn.fileno())
            if not done.done():
                done.set_result(None)

    loop.add_reader(conn.fileno(), on_message)
    forget_after = 10 * spec.config.stale_after_s
    try:
        while not done.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flush_now.wait(), spec.flush_s)
            flush_now.clear()
            hub.forget(forget_after)  # the controller process keeps merged state; a shard only its streams
            if any(r.state is CommandState.DONE for r in hub.commands.values()):  # results went up already
                hub.commands = {c: r for c, r in hub.commands.items() if r.state is not CommandState.DONE}
            payload = batch.take()
            try:
                await loop.run_in_executor(None, conn.send, payload)
            except (OSError, EOFError):
                break
    finally:
        await server.stop(1)


# -- the controller side ------------------------------------------------------------------------------
class _NoAuth:
    async def authenticate(self, token: str) -> Identity | None:  # the merged view serves no streams
        return None


class ShardedHub(TelemetryHub):
    """The controller's single hub interface over N shard processes (see the module docstring).

    Lives on one event loop like ``TelemetryHub``; ``start()`` spawns the shards and returns the port.
    """

    def __init__(
        self,
        auth_factory: Callable[[], Authenticator],
        config: HubConfig | None = None,
        *,
        shards: int = 2,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        flush_s: float = 0.25,
        restart: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(_NoAuth(), config, clock=clock)
        self.shards = shards
        self._spec = ShardSpec(
            index=0, host=host, port=port, config=self.config, auth_factory=auth_factory,
            tls_cert=tls_cert, tls_key=tls_key, flush_s=flush_s,
        )  # fmt: skip
        self.restart = restart
        self.port = port
        self.restarts = 0
        self.shard_cpu_s: dict[int, float] = {}  # each shard's process CPU time at its last flush
        self._procs: dict[int, BaseProcess] = {}
        self._conns: dict[int, Connection] = {}
        self._ready: dict[int, asyncio.Future[int]] = {}
        self._remote: dict[tuple[int, str], _Session] = {}
        self._counters: dict[int, dict[str, Any]] = {}
        self._base_counts = [0, 0]  # reports, duplicates of shards that died
        self._base_rejected: Counter[str] = Counter()
        self._base_shed: Counter[str] = Counter()
        self._reserve: socket.socket | None = None
        self._stopping = False
        self._ctx = mp.get_context("spawn")  # no fork: the parent runs gRPC and other threads

    async def start(self, timeout_s: float = 60.0) -> int:
        if self.port == 0:  # pick the port once, and hold it (bound, never listening) so it stays ours
            family = socket.AF_INET6 if ":" in self._spec.host else socket.AF_INET
            self._reserve = socket.socket(family, socket.SOCK_STREAM)
            self._reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._reserve.bind((self._spec.host.strip("[]"), 0))
            self.port = self._reserve.getsockname()[1]
        for i in range(self.shards):
            self._spawn(i)
        try:
            await asyncio.wait_for(asyncio.gather(*(self._ready[i] for i in range(self.shards))), timeout_s)
        except BaseException:
            await self.stop()  # no half-started hub: the caller sees the error, no shard lingers
            raise
        self.start_sweeper()  # staleness is judged on the merged view
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop every shard (the signature of ``grpc.aio.Server.stop``, so runners treat both alike)."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        for conn in list(self._conns.values()):
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(conn.fileno())
                conn.send(("stop",))
        deadline = (grace or 0.0) + 3.0
        for proc in list(self._procs.values()):
            await loop.run_in_executor(None, proc.join, deadline)
            if proc.is_alive():
                proc.kill()
                await loop.run_in_executor(None, proc.join, 2.0)
        for conn in self._conns.values():
            conn.close()
        if self._reserve is not None:
            self._reserve.close()

    def kill_shard(self, index: int) -> None:
        """Kill one shard process abruptly (tests and chaos drills)."""
        proc = self._procs[index]
        assert proc.pid is not None
        proc.kill()

    def shard_of(self, node: str) -> int | None:
        session = self._sessions.get(node)
        return session.shard if session is not None else None

    def shard_pids(self) -> dict[int, int | None]:
        return {i: p.pid for i, p in self._procs.items()}

    # -- shards come and go -----------------------------------------------------------------------------
    def _spawn(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        parent, child = self._ctx.Pipe()
        spec = replace(self._spec, index=index, port=self.port, accepting=self.accepting)
        proc = self._ctx.Process(target=_worker, args=(spec, child), name=f"telemetry-shard-{index}", daemon=True)
        proc.start()
        child.close()
        self._procs[index], self._conns[index] = proc, parent
        self._ready[index] = loop.create_future()
        loop.add_reader(parent.fileno(), self._on_readable, index, parent)

    def _on_readable(self, index: int, conn: Connection) -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                if isinstance(msg, tuple):  # ("ready", port)
                    if not self._ready[index].done():
                        self._ready[index].set_result(msg[1])
                    if self._shares:
                        conn.send(("shares", dict(self._shares), dict(self._share_basis)))
                else:
                    self._apply(index, msg)
        except (EOFError, OSError):
            self._lost(index, conn)

    def _lost(self, index: int, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(conn.fileno())
        conn.close()
        last = self._counters.pop(index, None)
        if last is not None:  # keep the dead shard's counts in the totals
            self._base_counts[0] += last["reports"]
            self._base_counts[1] += last["duplicates"]
            self._base_rejected.update(last["rejected"])
            self._base_shed.update(last["shed"])
        for key in [k for k in self._remote if k[0] == index]:
            self._close_session(self._remote.pop(key))
        if self._stopping:
            return
        ready = self._ready.get(index)
        if ready is not None and not ready.done():  # never served (e.g. cannot bind): do not respawn in a loop
            ready.set_exception(RuntimeError(f"telemetry shard {index} exited before serving"))
            failed = self._procs.pop(index, None)
            if failed is not None:
                loop.run_in_executor(None, failed.join, 10.0)
            return
        log.error("telemetry shard %d exited; its agents reconnect to the others%s", index,
                  "; restarting it" if self.restart else "")  # fmt: skip
        dead = self._procs.pop(index, None)
        if dead is not None:  # reap it off the loop thread (it may take a moment to finish exiting)
            loop.run_in_executor(None, dead.join, 10.0)
        if self.restart:
            self.restarts += 1
            self._spawn(index)

    # -- merging ------------------------------------------------------------------------------------------
    def _apply(self, index: int, batch: dict[str, Any]) -> None:
        for event in batch["events"]:
            kind = event[0]
            if kind == "open":
                _, name, hello_raw, identity, connected_at = event
                current = self._sessions.get(name)
                if current is not None and current.shard != index and self.nodes[name].connected_at > connected_at:
                    continue  # an older stream's open reached us after a newer one's
                old = self._remote.pop((index, name), None)
                if old is not None:
                    self._close_session(old)
                session = self._open_session(pb.NodeHello.FromString(hello_raw), identity)
                session.shard = index
                self.nodes[name].connected_at = connected_at
                self._remote[(index, name)] = session
                self._resend_pending(session)
            elif kind == "close":
                gone = self._remote.pop((index, event[1]), None)
                if gone is not None:
                    self._close_session(gone)
            elif kind == "result":
                self._record_result(pb.CommandResult.FromString(event[1]))
            elif kind == "seq?":
                _, rid, name, instance = event
                state = self.nodes.get(name)
                seq = state.last_seq if state is not None and state.instance == instance else 0
                with contextlib.suppress(OSError, ValueError):
                    self._conns[index].send(("seq", rid, seq))
        now_ns = time.time_ns()
        parse = pb.AgentMessage.FromString
        for name, (raw, stored_at, _n, kept) in batch["reports"].items():
            state = self.nodes.get(name)
            if state is None:
                continue
            for r in (*kept, raw):
                report = parse(r).report
                if report.seq and state.instance and report.seq <= state.last_seq:
                    continue  # re-sent after a shard move; we hold it already
                if report.seq:
                    state.last_seq = report.seq
                state.history.append(report)
                state.last_report = report
                if report.sent_unix_ns:
                    lag_ms = (now_ns - report.sent_unix_ns) / 1e6
                    self.lag.add(lag_ms)  # report-to-merged-state lag, the one the controller sees
                    state.lag_ms_max = max(state.lag_ms_max, lag_ms)
            state.last_report_at = stored_at
            state.reports += _n
            state.marked_stale = False
        counters = batch["counters"]
        self._counters[index] = counters
        self.shard_cpu_s[index] = counters["cpu_s"]
        live = list(self._counters.values())
        self.reports_total = self._base_counts[0] + sum(c["reports"] for c in live)
        self.duplicates = self._base_counts[1] + sum(c["duplicates"] for c in live)
        self.rejected = Counter(self._base_rejected)
        self.shed = Counter(self._base_shed)
        for c in live:
            self.rejected.update(c["rejected"])
            self.shed.update(c["shed"])

    # -- commands and settings go down the pipes --------------------------------------------------------
    def _deliver(self, session: _Session, record: CommandRecord) -> None:
        if session.shard is None:
            super()._deliver(session, record)
            return
        conn = self._conns.get(session.shard)
        if conn is None:
            return  # shard being replaced: re-sent on the node's next open
        try:
            conn.send(("cmd", record.node, record.command.SerializeToString()))
        except (OSError, ValueError):
            return
        record.sends += 1
        record.state = CommandState.SENT

    def set_accepting(self, accepting: bool) -> None:
        self.accepting = accepting
        self._broadcast(("accept", accepting))

    def set_node_shares(self, shares: dict[str, float], domain: str = "", budget_w: float = 0.0) -> list[str]:
        sent = super().set_node_shares(shares, domain, budget_w)
        self._broadcast(("shares", dict(shares), dict.fromkeys(shares, (domain, budget_w))))
        return sent

    def _broadcast(self, msg: tuple[Any, ...]) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(OSError, ValueError):
                conn.send(msg)
