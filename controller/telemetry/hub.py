"""The telemetry hub: one gRPC stream per node agent, latest state per node, commands down.

Agents stream ``NodeReport``s; the hub validates each one, keeps the latest per node plus a short
ring buffer, marks nodes stale when reports stop, and hands summaries to the snapshot builder
(``controller.telemetry.summary``). Commands to agents are delivered at least once: each has an
id, stays pending until the agent answers with a ``CommandResult``, and is re-sent on every new
stream from that node (the agent applies an id once and repeats its earlier answer).

The request deserializer is the identity, so the hub sees raw bytes and can count malformed and
oversized messages itself instead of letting gRPC drop them silently. A rejected message ends
only its own stream; state shared between streams is touched only by the event loop thread.

Reports are delivered once: each carries a per-agent-instance ``seq``; the hub drops (and counts)
any report at or below the last seq it stored for that instance, and tells a reconnecting agent
that seq in the ``Welcome`` so it re-sends only what the hub never stored.

Load shedding, each with a ``RESOURCE_EXHAUSTED`` status the agent answers with backoff: streams
beyond ``max_streams`` are refused before any work; a stream sending reports faster than its token
bucket allows (burst ``report_burst``, refill ``rate_factor`` x the report rate) is ended; an
identity whose streams were rejected ``reject_budget`` times within ``reject_window_s`` is refused
outright until the window passes, so one misbehaving agent's reconnect storm costs little.

Only the leader's hub takes agents: a hub with ``accepting`` off (a standby replica) refuses new
streams and ends open ones with ``UNAVAILABLE "not the leader"``; agents back off briefly and
reconnect through the Service until they reach the leader. A periodic sweep (``run_sweeper``)
marks nodes stale as soon as their reports stop, so the stale gauge and the snapshot see it
without anyone asking. A hub running as one shard of several (``controller.telemetry.shards``)
reports stream opens and closes, stored reports and command results to a ``ShardSink``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

from controller.telemetry.auth import Authenticator, Identity, bearer_token
from controller.telemetry.validation import (
    PROTOCOL_VERSION,
    Rejected,
    RejectReason,
    ReportBounds,
    validate_hello,
    validate_report,
)
from protos.wattplane.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "wattplane.v1.AgentService"
CONNECT_METHOD = f"/{SERVICE}/Connect"


@dataclass(frozen=True)
class HubConfig:
    report_interval_s: float = 1.0  # told to agents in the Welcome
    stale_after_s: float = 3.5  # a node is stale after this long without a report (~3 missed)
    history: int = 8  # reports kept per node (ring buffer)
    max_message_bytes: int = 512 * 1024  # larger agent messages are rejected and counted
    lag_samples: int = 200_000  # report-to-state lag samples kept for percentiles
    max_streams: int = 0  # concurrent agent streams admitted; 0: no limit
    report_burst: int = 400  # reports a stream may send at once (a reconnect flushes its buffer)
    rate_factor: float = 4.0  # sustained reports per report interval a stream may send
    reject_budget: int = 20  # rejected streams per identity per window before it is quarantined
    reject_window_s: float = 10.0
    sweep_every_s: float = 0.5  # how often the stale sweep runs (``run_sweeper``)


class CommandState(StrEnum):
    PENDING = "pending"  # not yet sent on any stream
    SENT = "sent"  # sent at least once, no result yet
    DONE = "done"  # the agent answered


@dataclass
class CommandRecord:
    command: pb.Command
    node: str
    created_at: float
    state: CommandState = CommandState.PENDING
    sends: int = 0
    result: pb.CommandResult | None = None
    done: asyncio.Future[pb.CommandResult] | None = None


@dataclass
class NodeState:
    """What the hub knows about one node; replaced fields only, never mutated protobufs."""

    name: str
    hello: pb.NodeHello
    identity: Identity
    connected: bool = True
    connected_at: float = 0.0
    last_report_at: float | None = None  # hub clock (seconds)
    last_report: pb.NodeReport | None = None
    history: deque[pb.NodeReport] = field(default_factory=deque)
    reports: int = 0
    power_domain: str | None = None
    instance: str = ""  # the agent process instance whose seqs ``last_seq`` counts
    last_seq: int = 0  # highest report seq stored from that instance
    lag_ms_max: float = 0.0  # worst report-to-state lag seen from this node
    marked_stale: bool = False  # set by the sweep when the node went quiet, cleared by its next report

    def stale(self, now: float, stale_after_s: float) -> bool:
        seen = self.last_report_at if self.last_report_at is not None else self.connected_at
        return now - seen > stale_after_s


@dataclass
class _Session:
    node: str
    outbox: asyncio.Queue[pb.ControllerMessage]
    superseded: bool = False
    shard: int | None = None  # a merged view's session: the shard process holding the stream
    ended_by: Rejected | None = None  # why the hub ends this stream at its next message (not the leader)


class ShardSink(Protocol):
    """Where a shard's hub hands what the controller process merges (``controller.telemetry.shards``)."""

    def opened(self, state: NodeState) -> None: ...

    def closed(self, node: str) -> None: ...

    def stored(self, node: str, raw: bytes, keep: bool) -> None: ...  # keep: carries expert tokens

    def result(self, result: pb.CommandResult) -> None: ...


class LagRecorder:
    """Report-to-state lag samples (ms) in a bounded ring; percentiles on demand."""

    def __init__(self, capacity: int) -> None:
        self._samples: deque[float] = deque(maxlen=capacity)

    def add(self, lag_ms: float) -> None:
        self._samples.append(lag_ms)

    def drain(self) -> list[float]:
        out = list(self._samples)
        self._samples.clear()
        return out

    def percentile(self, q: float) -> float | None:
        return percentile(list(self._samples), q)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class TelemetryHub:
    """Per-node state fed by agent streams; see the module docstring."""

    def __init__(
        self,
        authenticator: Authenticator,
        config: HubConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or HubConfig()
        self._auth = authenticator
        self._clock = clock
        self.nodes: dict[str, NodeState] = {}
        self.commands: dict[str, CommandRecord] = {}
        self.rejected: Counter[str] = Counter()
        self.reports_total = 0
        self.duplicates = 0  # re-sent reports already stored (dropped)
        self.shed: Counter[str] = Counter()  # streams refused or ended to shed load, by reason
        self._streams = 0
        self._recent_rejects: dict[str, deque[float]] = {}
        self.lag = LagRecorder(self.config.lag_samples)
        self._sessions: dict[str, _Session] = {}
        self._domains: dict[str, str] = {}
        self._shares: dict[str, float] = {}
        self._share_basis: dict[str, tuple[str, float]] = {}  # node -> (domain, budget W) its share is of
        self._ids = itertools.count(1)
        # Agents answer a command id once and remember it; a restarted controller's hub counts from 1
        # again, so without a per-instance prefix its commands would be answered from that memory
        # (acknowledged, never applied) whenever they reuse an id the dead one sent.
        self._id_prefix = uuid.uuid4().hex[:8]
        self.accepting = True  # False on a standby replica: agents are sent to the leader
        self.sink: ShardSink | None = None
        self.stale_marked = 0  # nodes the sweep found newly stale
        self.on_stale: Callable[[list[str]], None] | None = None  # told which nodes just went stale
        self._sweeper: asyncio.Task[None] | None = None
        # a shard's source of the last seq stored for an agent new to it (it may have moved from another)
        self.seq_hint: Callable[[pb.NodeHello], Awaitable[int]] | None = None

    # -- the gRPC side ------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        """A generic handler for ``grpc.aio.server(handlers=[hub.handler()])``."""
        method = grpc.stream_stream_rpc_method_handler(
            self._connect,
            request_deserializer=None,  # raw bytes: the hub parses and counts bad input itself
            response_serializer=pb.ControllerMessage.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"Connect": method})

    async def _connect(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        messages = aiter(request_iterator)
        session: _Session | None = None
        writer: asyncio.Task[None] | None = None
        key: str | None = None
        self._streams += 1
        try:
            if not self.accepting:  # before auth: a standby spends nothing on agents it will not keep
                await self._drain_hello(messages)
                raise Rejected(RejectReason.NOT_LEADER, "not the leader; reconnect through the Service")
            if self.config.max_streams and self._streams > self.config.max_streams:
                await self._drain_hello(messages)
                raise Rejected(RejectReason.OVERLOADED, f"hub at its limit of {self.config.max_streams} streams")
            identity = await self._authenticate(context)
            key = identity.node or identity.user
            if self._quarantined(key):
                await self._drain_hello(messages)
                raise Rejected(
                    RejectReason.QUARANTINED,
                    f"{self.config.reject_budget} rejected streams from {key!r} in "
                    f"{self.config.reject_window_s:.0f} s; back off",
                )
            hello = await self._read_hello(messages, identity)
            session = self._open_session(hello, identity)
            state = self.nodes[hello.node_name]
            if self.seq_hint is not None and state.last_seq == 0 and hello.instance_id:
                state.last_seq = await self.seq_hint(hello)  # a shard asks what the merged view stored
            await context.write(self._welcome(hello, state.last_seq))
            writer = asyncio.create_task(self._write_loop(session, context))
            self._resend_pending(session)
            await self._read_loop(session, messages)
        except Rejected as exc:
            self.rejected[exc.reason.value] += 1
            if exc.status is grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.shed[exc.reason.value] += 1
            if key is not None and exc.reason not in (RejectReason.QUARANTINED, RejectReason.NOT_LEADER):
                self._recent_rejects.setdefault(key, deque()).append(self._clock())
            await context.abort(exc.status, str(exc))
        finally:
            self._streams -= 1
            if writer is not None:
                writer.cancel()
            if session is not None:
                self._close_session(session)

    def _quarantined(self, key: str) -> bool:
        recent = self._recent_rejects.get(key)
        if not recent:
            return False
        horizon = self._clock() - self.config.reject_window_s
        while recent and recent[0] < horizon:
            recent.popleft()
        if not recent:
            del self._recent_rejects[key]
            return False
        return len(recent) >= self.config.reject_budget

    @staticmethod
    async def _drain_hello(messages: AsyncIterator[bytes]) -> None:
        """Read (unparsed) the hello before refusing: an agent still writing it would otherwise see its
        failed write (a client-side INTERNAL) instead of our status. Bounded, so a silent client cannot
        hold the refusal open."""
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, StopAsyncIteration):
            await asyncio.wait_for(anext(messages), 1.0)

    async def _authenticate(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> Identity:
        token = bearer_token(context.invocation_metadata())
        try:
            identity = await self._auth.authenticate(token) if token else None
        except Exception as exc:  # the agent retries with backoff; UNAVAILABLE says "not your fault"
            raise Rejected(RejectReason.AUTH_UNAVAILABLE, f"cannot check the token now: {exc}") from None
        if identity is None:
            raise Rejected(RejectReason.UNAUTHENTICATED, "missing or invalid bearer token")
        return identity

    async def _read_hello(self, messages: AsyncIterator[bytes], identity: Identity) -> pb.NodeHello:
        raw = await anext(messages, None)
        if raw is None:
            raise Rejected(RejectReason.PROTOCOL, "stream closed before NodeHello")
        msg = self._parse(raw)
        if msg.WhichOneof("body") != "hello":
            raise Rejected(RejectReason.PROTOCOL, "the first message must be a NodeHello")
        validate_hello(msg.hello)
        if not identity.may_report_for(msg.hello.node_name):
            raise Rejected(
                RejectReason.PERMISSION_DENIED, f"token bound to node {identity.node!r}, not {msg.hello.node_name!r}"
            )
        return msg.hello

    async def _read_loop(self, session: _Session, messages: AsyncIterator[bytes]) -> None:
        state = self.nodes[session.node]
        bounds = ReportBounds(state.hello)
        lag = self.lag
        sink = self.sink
        clock = self._clock
        burst = float(self.config.report_burst)
        refill_per_s = self.config.rate_factor / max(self.config.report_interval_s, 1e-3)
        tokens, refilled_at = burst, clock()
        max_bytes = self.config.max_message_bytes
        parse = pb.AgentMessage.FromString
        history = state.history
        async for raw in messages:
            if session.superseded:
                if session.ended_by is not None:
                    raise session.ended_by
                return
            if len(raw) > max_bytes:
                raise Rejected(RejectReason.OVERSIZED, f"{len(raw)} bytes > {max_bytes}")
            try:
                msg = parse(raw)
            except DecodeError as exc:
                raise Rejected(RejectReason.MALFORMED, f"not an AgentMessage: {exc}") from None
            if msg.HasField("report"):
                report = msg.report
                now = clock()
                tokens += (now - refilled_at) * refill_per_s
                if tokens > burst:
                    tokens = burst
                refilled_at = now
                if tokens < 1.0:
                    raise Rejected(RejectReason.RATE_LIMITED, "reports arrive faster than the report interval allows")
                tokens -= 1.0
                seq = report.seq
                if seq and seq <= state.last_seq:
                    self.duplicates += 1  # re-sent after a reconnect but already stored
                    continue
                validate_report(report, bounds)
                if seq:
                    state.last_seq = seq
                sent_ns = report.sent_unix_ns
                if sent_ns:
                    lag_ms = (time.time_ns() - sent_ns) / 1e6
                    lag.add(lag_ms)
                    if lag_ms > state.lag_ms_max:
                        state.lag_ms_max = lag_ms
                state.last_report = report
                state.last_report_at = now
                state.marked_stale = False
                history.append(report)  # a deque with maxlen: the ring buffer
                state.reports += 1
                self.reports_total += 1
                if sink is not None:
                    replicas = report.replicas
                    sink.stored(state.name, raw, bool(replicas) and any(r.expert_tokens for r in replicas))
                continue
            kind = msg.WhichOneof("body")
            if kind == "result":
                self._record_result(msg.result)
            else:
                raise Rejected(RejectReason.PROTOCOL, f"unexpected {kind or 'empty'} message after the hello")

    def _parse(self, raw: bytes) -> pb.AgentMessage:
        if len(raw) > self.config.max_message_bytes:
            raise Rejected(RejectReason.OVERSIZED, f"{len(raw)} bytes > {self.config.max_message_bytes}")
        try:
            return pb.AgentMessage.FromString(raw)
        except DecodeError as exc:
            raise Rejected(RejectReason.MALFORMED, f"not an AgentMessage: {exc}") from None

    def _welcome(self, hello: pb.NodeHello, last_seq: int) -> pb.ControllerMessage:
        return pb.ControllerMessage(
            welcome=pb.Welcome(
                protocol_version=PROTOCOL_VERSION,
                report_interval_s=self.config.report_interval_s,
                node_share_w=self._shares.get(hello.node_name, 0.0),
                last_seq=last_seq,
                power_domain=self._share_basis.get(hello.node_name, ("", 0.0))[0],
                domain_budget_w=self._share_basis.get(hello.node_name, ("", 0.0))[1],
            )
        )

    def _open_session(self, hello: pb.NodeHello, identity: Identity) -> _Session:
        name = hello.node_name
        old = self._sessions.get(name)
        if old is not None:
            old.superseded = True  # the agent reconnected; its old stream ends on its next message
        session = _Session(node=name, outbox=asyncio.Queue())
        self._sessions[name] = session
        now = self._clock()
        prev = self.nodes.get(name)
        state = NodeState(name=name, hello=hello, identity=identity, connected_at=now, instance=hello.instance_id)
        state.history = deque(prev.history if prev else (), maxlen=self.config.history)
        if prev is not None:  # keep the latest reading across reconnects
            state.reports, state.last_report, state.last_report_at = prev.reports, prev.last_report, prev.last_report_at
            state.lag_ms_max = prev.lag_ms_max
            if prev.instance == hello.instance_id:  # same agent process: its seqs continue
                state.last_seq = prev.last_seq
        state.power_domain = self._domains.get(name) or hello.power_domain or None
        self.nodes[name] = state
        if self.sink is not None:
            self.sink.opened(state)
        return session

    def _close_session(self, session: _Session) -> None:
        if self._sessions.get(session.node) is session:
            del self._sessions[session.node]
            state = self.nodes.get(session.node)
            if state is not None:
                state.connected = False
            if self.sink is not None:
                self.sink.closed(session.node)

    async def _write_loop(self, session: _Session, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        while True:
            msg = await session.outbox.get()
            await context.write(msg)

    # -- commands -------------------------------------------------------------------------
    def send_command(self, node: str, command: pb.Command, *, command_id: str | None = None) -> str:
        """Queue ``command`` for ``node`` (delivered now if connected, else on its next stream)."""
        cid = command_id or command.id or f"{node}/{self._id_prefix}-{next(self._ids)}"
        cmd = pb.Command()
        cmd.CopyFrom(command)
        cmd.id = cid
        if cid in self.commands:
            return cid  # idempotent: the same id is one command
        record = CommandRecord(command=cmd, node=node, created_at=self._clock())
        record.done = asyncio.get_running_loop().create_future()
        self.commands[cid] = record
        session = self._sessions.get(node)
        if session is not None:
            self._deliver(session, record)
        return cid

    async def wait_result(self, command_id: str, timeout_s: float) -> pb.CommandResult:
        record = self.commands[command_id]
        assert record.done is not None
        return await asyncio.wait_for(asyncio.shield(record.done), timeout_s)

    def pending_commands(self, node: str | None = None) -> list[CommandRecord]:
        return [
            r for r in self.commands.values() if r.state is not CommandState.DONE and (node is None or r.node == node)
        ]

    def _deliver(self, session: _Session, record: CommandRecord) -> None:
        session.outbox.put_nowait(pb.ControllerMessage(command=record.command))
        record.sends += 1
        record.state = CommandState.SENT

    def _resend_pending(self, session: _Session) -> None:
        for record in self.pending_commands(session.node):
            self._deliver(session, record)

    def _record_result(self, result: pb.CommandResult) -> None:
        if self.sink is not None:
            self.sink.result(result)  # the merged view keeps the truth; duplicates are dropped there
        record = self.commands.get(result.command_id)
        if record is None or record.state is CommandState.DONE:
            return  # a duplicate answer to an at-least-once delivery
        record.state = CommandState.DONE
        record.result = result
        if record.done is not None and not record.done.done():
            record.done.set_result(result)

    # -- state queries ----------------------------------------------------------------------
    def set_power_domains(self, node_domains: dict[str, str]) -> None:
        """The controller's view (PowerDomain objects) overrides what agents say about themselves."""
        self._domains = dict(node_domains)
        for name, state in self.nodes.items():
            state.power_domain = self._domains.get(name) or state.hello.power_domain or None

    def set_node_shares(self, shares: dict[str, float], domain: str = "", budget_w: float = 0.0) -> list[str]:
        """Each node's share of its domain budget (W) for its local guard: sent in the Welcome,
        and as a ``SetNodeShare`` command to connected nodes whose share (or its basis) changed. Returns
        the ids. With the ``domain`` and the ``budget_w`` the shares were computed from, an agent that
        reads a lower budget for that domain scales its share down itself."""
        sent = []
        basis = (domain, budget_w)
        for node, watts in shares.items():
            if self._shares.get(node) == watts and self._share_basis.get(node, ("", 0.0)) == basis:
                continue
            self._shares[node] = watts
            self._share_basis[node] = basis
            if node in self._sessions:
                share = pb.SetNodeShare(watts=watts, power_domain=domain, domain_budget_w=budget_w)
                sent.append(self.send_command(node, pb.Command(set_node_share=share)))
        return sent

    def now(self) -> float:
        return self._clock()

    def set_accepting(self, accepting: bool) -> None:
        """Take agents (leader) or send them away (standby). Turning it off ends open streams with
        ``UNAVAILABLE`` at their next message, so agents move to the new leader within a report interval."""
        self.accepting = accepting
        if not accepting:
            for session in self._sessions.values():
                session.ended_by = Rejected(RejectReason.NOT_LEADER, "not the leader (any more); reconnect")
                session.superseded = True

    def sweep(self) -> list[str]:
        """Mark nodes whose reports stopped; returns the ones newly stale. Runs periodically
        (``run_sweeper``) so staleness shows without a query; queries also check the clock."""
        now = self._clock()
        after = self.config.stale_after_s
        newly = []
        for name, state in self.nodes.items():
            if not state.marked_stale and state.stale(now, after):
                state.marked_stale = True
                newly.append(name)
        if newly:
            newly.sort()
            self.stale_marked += len(newly)
            log.warning("%d node(s) went stale (no report for %.1f s): %s", len(newly), after, newly[:10])
            if self.on_stale is not None:
                self.on_stale(newly)
        return newly

    def start_sweeper(self) -> None:
        """Run the sweep on the running loop (once per hub; a second server reuses it)."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self.run_sweeper(), name="hub-stale-sweep")

    def stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def run_sweeper(self) -> None:
        """The periodic stale sweep; ``start_server`` runs it for the server's lifetime."""
        while True:
            await asyncio.sleep(self.config.sweep_every_s)
            try:
                self.sweep()
            except Exception:  # a callback's bug must not stop the sweep
                log.exception("stale sweep failed")

    def is_stale(self, node: str) -> bool:
        state = self.nodes[node]
        return state.marked_stale or state.stale(self._clock(), self.config.stale_after_s)

    def stale_nodes(self) -> list[str]:
        now = self._clock()
        after = self.config.stale_after_s
        return sorted(n for n, s in self.nodes.items() if s.marked_stale or s.stale(now, after))

    def fresh_nodes(self) -> Iterable[NodeState]:
        now = self._clock()
        after = self.config.stale_after_s
        return (s for s in self.nodes.values() if not (s.marked_stale or s.stale(now, after)))

    def forget(self, older_than_s: float) -> list[str]:
        """Drop disconnected nodes silent for ``older_than_s`` (scaled-in nodes), so state and
        metric series do not grow with node churn; their finished commands go too."""
        now = self._clock()
        gone = [
            n
            for n, s in self.nodes.items()
            if n not in self._sessions and now - (s.last_report_at or s.connected_at) > older_than_s
        ]
        for name in gone:
            del self.nodes[name]
        self.commands = {
            cid: r for cid, r in self.commands.items() if not (r.node in gone and r.state is CommandState.DONE)
        }
        horizon = now - self.config.reject_window_s  # rejection history of identities quiet for a window
        self._recent_rejects = {k: q for k, q in self._recent_rejects.items() if q and q[-1] >= horizon}
        return sorted(gone)

    def connected_agents(self) -> int:
        return len(self._sessions)
