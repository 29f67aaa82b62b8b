"""The agent runtime: sample, report, obey, protect — with or without a controller.

Three independent loops share one event loop:
- sampling reads the source (and engine metrics) every report interval and queues a report;
- the guard reads device power every ``guard.period_s`` and caps the node locally when needed;
- the connection keeps one stream to the hub, reconnecting with jittered exponential backoff.
Reports queue in a bounded buffer while disconnected (the oldest are dropped first and counted)
and are sent in order after the next hello; command results go ahead of reports. Reports already
written to a stream stay in a ring (``sent``) until the next ``Welcome`` says which seq the hub
stored last: the later ones are re-sent first (a write to a cut link "succeeds" into a socket
buffer and is lost with it), earlier ones dropped, so each report reaches the hub once.

The guard's share is the controller's, unless the agent reads (``watch_budget``: its own list+watch
of its PowerDomain on the API server, ``agents/budget.py``) a domain budget below the one that share
was computed from: then the share is scaled down, at once without a controller, after
``guard.cut_grace_s`` with one (it caps by priority first). Never up: only a controller can hand
out a larger budget, knowing the other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from agents.guard import GuardConfig, PowerGuard, scaled_share
from agents.limits import CommandApplier, Limits
from agents.scraper import EngineScraper
from agents.sources import DeviceSample, GPUSource, SourceError
from protos.wattplane.v1 import agent_pb2 as pb

if TYPE_CHECKING:
    from agents.budget import BudgetWatch

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
CONNECT_METHOD = "/wattplane.v1.AgentService/Connect"
NOT_LEADER_MAX_ATTEMPT = 3  # backoff after "not the leader" stays at most base * 2**3 (1.6 s by default)


@dataclass
class AgentConfig:
    node_name: str
    target: str  # host:port of the telemetry hub
    token: str = ""  # bearer token; token_file wins when set (projected tokens rotate)
    token_file: Path | None = None
    tls_ca: Path | None = None  # verify the hub with this CA; None: plaintext (simulation only)
    report_interval_s: float = 1.0
    buffer_reports: int = 300  # reports kept while disconnected
    backoff_base_s: float = 0.2
    backoff_max_s: float = 15.0
    keepalive_s: float = 10.0  # HTTP/2 ping interval; a dead link is noticed within ~2x this
    welcome_timeout_s: float = 5.0
    power_domain: str = ""
    guard: GuardConfig = field(default_factory=GuardConfig)
    watch_budget: bool = False  # follow the PowerDomain's budget on the API server (off: simulator, unit tests)
    kubeconfig: Path | None = None  # for watch_budget; None: the pod's in-cluster ServiceAccount


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so a fleet that lost its
    controller at the same instant does not reconnect in lock step."""
    ceiling = min(max_s, base_s * (2 ** min(attempt, 30)))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        source: GPUSource,
        *,
        scraper: EngineScraper | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.source = source
        self.scraper = scraper
        self.limits = Limits(source)
        self.guard = PowerGuard(config.guard, self.limits)
        self.applier = CommandApplier(self.limits, on_node_share=self._on_share_command)
        self._rng = rng or random.Random()
        self._clock = clock
        self.report_interval_s = config.report_interval_s
        self.outbox: deque[pb.AgentMessage] = deque(maxlen=config.buffer_reports)
        self.results: deque[pb.AgentMessage] = deque()
        self.sent: deque[pb.AgentMessage] = deque(maxlen=config.buffer_reports)  # written, not yet confirmed
        self.instance_id = f"{os.getpid()}-{time.time_ns()}"  # report seqs restart with the process
        self.resent_reports = 0
        self.dropped_reports = 0
        self.connected = False
        self.connections = 0
        self.last_error: str | None = None
        self._lost_since: float | None = clock()  # not yet connected counts as lost
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._seq = 0
        self._last_samples: list[DeviceSample] = []
        # the controller's share and what it was computed from; the guard enforces it, maybe scaled down
        self.share_w = config.guard.share_w
        self.share_domain = config.power_domain
        self.share_budget_w = 0.0  # 0: not said (a static share, or an older controller): never scaled
        self.observed_budget_w: float | None = None  # share_domain's budget as last read from the API server
        self.budget_cuts = 0  # times a budget read lowered the share in force
        self._cut_seen_at: float | None = None  # when the budget read first fell below the share's basis
        self._cut_in_force = False  # the scaled share is what the guard enforces
        self.budget_watch: BudgetWatch | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until :meth:`stop`; never raises for controller or engine trouble."""
        self.limits.sync()
        self._loop = asyncio.get_running_loop()
        if self.config.watch_budget and self.budget_watch is None:
            from agents.budget import BudgetWatch, api_client  # the kubernetes client only when watching

            kubeconfig = str(self.config.kubeconfig) if self.config.kubeconfig is not None else None
            self.budget_watch = BudgetWatch(lambda: api_client(kubeconfig), self._budget_from_thread)
        if self.budget_watch is not None:
            self.budget_watch.follow(self.share_domain)
        tasks = [
            asyncio.create_task(self._sample_loop(), name="sample"),
            asyncio.create_task(self._guard_loop(), name="guard"),
            asyncio.create_task(self._connection_loop(), name="connection"),
        ]
        try:
            await self._stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.budget_watch is not None:
                await asyncio.to_thread(self.budget_watch.stop)

    def stop(self) -> None:
        self._stop.set()

    def controller_lost_for(self) -> float | None:
        return None if self._lost_since is None else self._clock() - self._lost_since

    # -- sampling and reports -------------------------------------------------------------------
    async def _sample_loop(self) -> None:
        while True:
            try:
                await self._report_once()
            except SourceError as exc:
                log.warning("reading devices failed: %s", exc)
            except Exception:  # a bug here must not stop reporting or the guard
                log.exception("building a report failed")
            await asyncio.sleep(self.applier.report_interval_s or self.report_interval_s)

    async def _report_once(self) -> None:
        samples = self.source.sample()
        replicas = await self.scraper.scrape() if self.scraper else []
        self._seq += 1
        now_ns = time.time_ns()
        shares = self.scraper.prefill_by_gpu(replicas, [s.index for s in samples]) if self.scraper else {}
        report = pb.NodeReport(
            sent_unix_ns=now_ns,
            sampled_unix_ns=now_ns,
            seq=self._seq,
            gpus=[_gpu_sample(s, shares.get(s.index)) for s in samples],
            replicas=replicas,
            node_power_w=sum(s.power_w for s in samples),
            guard_active=self.guard.active,
            failsafe_active=any(c is not None for c in self.limits.failsafe_w),
            node_share_w=self.guard.config.share_w,
            observed_budget_w=self.observed_budget_w or 0.0,
        )
        if len(self.outbox) == self.outbox.maxlen:
            self.dropped_reports += 1
        self.outbox.append(pb.AgentMessage(report=report))
        self._wake.set()

    # -- local protection ---------------------------------------------------------------------
    async def _guard_loop(self) -> None:
        while True:
            try:
                self.guard_step()
            except SourceError as exc:
                log.warning("guard step failed: %s", exc)
            except Exception:  # the guard loop must outlive any single failure
                log.exception("guard step failed")
            await asyncio.sleep(self.config.guard.period_s)

    def guard_step(self) -> None:
        self._update_share()  # a budget cut's grace may have run out, or the controller gone
        samples = self.source.sample()
        self._last_samples = samples
        changed = self.guard.failsafe(None if self.connected else self.controller_lost_for())
        changed = self.guard.step(self._clock(), samples) or changed
        if changed:
            self.limits.sync()
            log.info(
                "limits now %s W (guard %s, fail-safe %s)",
                [round(self.limits.effective_w(d.index)) for d in self.limits.devices],
                self.guard.active,
                any(c is not None for c in self.limits.failsafe_w),
            )

    # -- the controller stream ------------------------------------------------------------------
    async def _connection_loop(self) -> None:
        attempt = 0
        while True:
            before = self.connections
            try:
                await self._stream()
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
                level = logging.ERROR if exc.code() is grpc.StatusCode.UNAUTHENTICATED else logging.INFO
                log.log(level, "controller stream ended: %s", self.last_error)
                if exc.code() is grpc.StatusCode.UNAVAILABLE and "not the leader" in (exc.details() or ""):
                    # a standby replica sent us away: the leader is up, so retry soon (a new connection
                    # may reach it) instead of backing off as from a controller outage
                    attempt = min(attempt, NOT_LEADER_MAX_ATTEMPT)
            except Exception as exc:  # any other failure must not end the agent: retry
                self.last_error = repr(exc)
                log.info("controller stream failed: %r", exc)
            finally:
                if self.connected:
                    self._lost_since = self._clock()
                self.connected = False
            if self.connections > before:
                attempt = 0  # we were connected: start the backoff afresh
            delay = backoff_delay(attempt, self.config.backoff_base_s, self.config.backoff_max_s, self._rng)
            attempt += 1
            await asyncio.sleep(delay)

    def _channel(self) -> grpc.aio.Channel:
        keepalive_ms = int(self.config.keepalive_s * 1000)
        timeout_ms = max(1000, keepalive_ms // 2)
        # A channel of its own (no process-wide subchannel pool): each reconnect opens a new TCP
        # connection, which the Service (and SO_REUSEPORT among hub shards) may send elsewhere, e.g.
        # away from a standby replica that refused us; a pooled connection would stay stuck on it.
        options = [
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self.config.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(self.config.tls_ca.read_bytes())
            return grpc.aio.secure_channel(self.config.target, creds, options=options)
        return grpc.aio.insecure_channel(self.config.target, options=options)

    def _token(self) -> str:
        if self.config.token_file is not None:
            return self.config.token_file.read_text().strip()
        return self.config.token

    async def _stream(self) -> None:
        async with self._channel() as channel:
            connect = channel.stream_stream(
                CONNECT_METHOD,
                request_serializer=pb.AgentMessage.SerializeToString,
                response_deserializer=pb.ControllerMessage.FromString,
            )
            call = connect(metadata=(("authorization", f"Bearer {self._token()}"),))
            await call.write(pb.AgentMessage(hello=self._hello()))
            first = await asyncio.wait_for(call.read(), self.config.welcome_timeout_s)
            if first is grpc.aio.EOF:
                await call.code()  # raises AioRpcError with the hub's status if it refused us
                raise ConnectionError("hub closed the stream without a Welcome")
            if first.WhichOneof("body") != "welcome":
                raise ConnectionError("hub did not answer the hello with a Welcome")
            self._on_welcome(first.welcome)
            sender = asyncio.create_task(self._send_loop(call))
            try:
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        await call.code()
                        return
                    if msg.WhichOneof("body") == "command":
                        result = self.applier.apply(msg.command)
                        self.results.append(pb.AgentMessage(result=result))
                        self._wake.set()
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender

    # -- the node's share --------------------------------------------------------------------------
    def _on_share_command(self, cmd: pb.SetNodeShare) -> None:
        self.set_share(cmd.watts, cmd.power_domain, cmd.domain_budget_w)

    def set_share(self, watts: float, domain: str = "", budget_w: float = 0.0) -> None:
        """The controller's share of ``domain`` computed from its ``budget_w`` ("" / 0: not said)."""
        self.share_w = watts
        self.share_budget_w = budget_w if domain else 0.0
        if domain and domain != self.share_domain:
            self.share_domain = domain
            self.observed_budget_w = None  # another domain's budget says nothing about this one
            if self.budget_watch is not None:
                self.budget_watch.follow(domain)
        log.info("node share of power domain %s is now %.0f W (of a %.0f W budget)",
                 self.share_domain or "?", watts, budget_w)
        self._apply_share()

    def on_budget(self, domain: str, budget_w: float | None) -> None:
        """The budget of ``domain`` as read from the API server (None: gone or unreadable: keep the share)."""
        if domain != self.share_domain:
            return
        self.observed_budget_w = budget_w
        self._apply_share()

    def _budget_from_thread(self, domain: str, budget_w: float | None) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.on_budget, domain, budget_w)

    def _apply_share(self) -> None:
        """Put the share in force, and guard at once when it fell."""
        if self._update_share():
            self._guard_now()

    def _update_share(self) -> bool:
        """Set the guard's share: the controller's, or scaled to a lower budget read since it was computed.

        Without a controller the scaled share applies at once. A connected controller gets
        ``cut_grace_s`` to act on the cut first: over budget it keeps the old shares on purpose and
        caps by priority, then hands out shares of the new budget (which end the cut here); a guard
        holding every node to its scaled share at once would take that choice from it for good (the
        domain would read under budget, held by the guards). Past the grace, or once the stream
        drops, the scaled share applies. True when the share in force fell."""
        scaled = scaled_share(self.share_w, self.share_budget_w, self.observed_budget_w)
        share = self.share_w
        if scaled < self.share_w:
            now = self._clock()
            if self._cut_seen_at is None:
                self._cut_seen_at = now
                if self.connected:
                    log.info("PowerDomain %s budget cut to %.0f W (shares are of %.0f W): the controller has "
                             "%.0f s to act on it", self.share_domain, self.observed_budget_w or 0.0,
                             self.share_budget_w, self.config.guard.cut_grace_s)
            if self._cut_in_force or not self.connected or now - self._cut_seen_at >= self.config.guard.cut_grace_s:
                share = scaled
                self._cut_in_force = True  # stays until a share of a budget this low, or the budget back up
        else:
            self._cut_seen_at = None
            self._cut_in_force = False
        before = self.guard.config.share_w
        self.guard.config.share_w = share
        if share >= before - 0.5:
            return False
        if share < self.share_w:
            self.budget_cuts += 1
            log.warning(
                "PowerDomain %s budget cut to %.0f W (the share was computed from %.0f W): node share "
                "%.0f W -> %.0f W, %s", self.share_domain, self.observed_budget_w or 0.0, self.share_budget_w,
                self.share_w, share, "the controller did not act in time" if self.connected else "no controller",
            )
        return True

    def _guard_now(self) -> None:
        """Run a guard step now rather than at the next period (the share just fell)."""
        try:
            self.guard_step()
        except Exception:  # the guard loop will try again within its period
            log.exception("guard step after a share cut failed")

    def _on_welcome(self, welcome: pb.Welcome) -> None:
        self.connected = True
        self.connections += 1
        self._lost_since = None
        if welcome.report_interval_s > 0:
            self.report_interval_s = welcome.report_interval_s
        if welcome.node_share_w > 0:
            self.set_share(welcome.node_share_w, welcome.power_domain, welcome.domain_budget_w)
        if self.guard.failsafe(None):
            self.limits.sync()
        self._requeue_unconfirmed(welcome.last_seq)
        self._wake.set()

    def _requeue_unconfirmed(self, last_seq: int) -> None:
        """Put reports written after the hub's ``last_seq`` back in front of the outbox, in order."""
        again = [m for m in self.sent if m.report.seq > last_seq]
        self.sent.clear()
        if not again:
            return
        self.resent_reports += len(again)
        merged = again + list(self.outbox)
        overflow = max(0, len(merged) - (self.outbox.maxlen or len(merged)))
        self.dropped_reports += overflow
        self.outbox.clear()
        self.outbox.extend(merged[overflow:])

    async def _send_loop(self, call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ControllerMessage]) -> None:
        while True:
            while self.results or self.outbox:
                queue = self.results if self.results else self.outbox
                msg = queue.popleft()
                try:
                    await call.write(msg)
                except BaseException:
                    queue.appendleft(msg)  # not sent: keep it for the next stream
                    raise
                if queue is self.outbox:
                    self.sent.append(msg)
            self._wake.clear()
            await self._wake.wait()

    def _hello(self) -> pb.NodeHello:
        return pb.NodeHello(
            protocol_version=pb.PROTOCOL_VERSION_1,
            node_name=self.config.node_name,
            agent_version=AGENT_VERSION,
            source=self.source.name,
            power_domain=self.config.power_domain,
            node_share_w=self.config.guard.share_w,
            report_interval_s=self.report_interval_s,
            instance_id=self.instance_id,
            accelerators=[
                pb.AcceleratorInfo(
                    index=d.index,
                    uuid=d.uuid,
                    model=d.model,
                    memory_gib=d.memory_gib,
                    tdp_w=d.tdp_w,
                    min_power_limit_w=d.min_power_w,
                    max_power_limit_w=d.max_power_w,
                    min_sm_clock_mhz=d.min_clock_mhz,
                    max_sm_clock_mhz=d.max_clock_mhz,
                    driver_version=d.driver,
                )
                for d in self.source.devices()
            ],
        )


def _gpu_sample(s: DeviceSample, engine_prefill: float | None = None) -> pb.GPUSample:
    """The source's own prompt share wins (it sees the device); else the engine metrics' estimate."""
    prefill = s.prefill_fraction if s.prefill_fraction is not None else engine_prefill
    return pb.GPUSample(
        prefill_fraction=prefill,
        index=s.index,
        power_w=s.power_w,
        energy_j=s.energy_j,
        utilisation=s.utilisation,
        memory_used_gib=s.memory_used_gib,
        sm_clock_mhz=s.sm_clock_mhz,
        temperature_c=s.temperature_c,
        power_limit_w=s.power_limit_w,
        clock_limit_mhz=s.clock_limit_mhz,
    )
