"""``wattplane controller``: leader-elected reconciler with /metrics, /healthz and /readyz.

Lifecycle: serve health at once; campaign for the Lease; on winning, start caches and workers;
on SIGTERM/SIGINT finish the current keys, close watches, release the Lease (a standby takes over
at once) and exit 0; on losing the Lease exit 1 rather than risk two actors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controller.kube import Kube
from controller.metrics import HealthServer, Metrics
from controller.reconciler.controller import Controller
from controller.reconciler.leader import LeaderElector
from policies.snapshot import GPUTelemetry, ServingTelemetry

log = logging.getLogger("wattplane.controller")
AGENT_TOKEN_AUDIENCE = "wattplane"


class HubRunner:
    """The telemetry hub (gRPC, asyncio) on its own event-loop thread, seen from the controller's threads.

    Agents authenticate with projected ServiceAccount tokens (TokenReview). The controller reads a
    summary for each snapshot and sends power caps through the hub; both hop onto the loop thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, hub: Any, server: Any,
                 port: int) -> None:
        self.loop, self.thread, self.hub, self.server, self.port = loop, thread, hub, server, port
        from controller.telemetry import HubAgentPort

        self.agents = HubAgentPort(hub, loop)

    @classmethod
    def start(cls, kube: Kube, host: str, port: int, tls_dir: Path | None, authenticator: Any = None,
              max_streams: int = 0, *, shards: int = 1, auth_factory: Any = None,
              kube_source: tuple[str | None, str | None] = (None, None), accepting: bool = True) -> HubRunner:
        """``shards`` > 1 runs the hub as that many worker processes on one port (``telemetry.shards``);
        ``accepting`` False starts it as a standby's hub, refusing agents until ``set_accepting(True)``."""
        from kubernetes import client

        from controller.telemetry import TelemetryHub, TokenReviewAuthenticator, start_server
        from controller.telemetry.hub import HubConfig

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="telemetry-hub", daemon=True)
        thread.start()
        cert = tls_dir / "tls.crt" if tls_dir else None
        key = tls_dir / "tls.key" if tls_dir else None
        config = HubConfig(max_streams=max_streams)  # with shards: the limit of each shard
        if shards > 1:
            import functools

            from controller.telemetry.auth import token_review_from_kubeconfig
            from controller.telemetry.shards import ShardedHub

            # each shard process builds its own TokenReview client (API clients do not cross processes)
            factory = auth_factory or functools.partial(token_review_from_kubeconfig, *kube_source,
                                                        (AGENT_TOKEN_AUDIENCE,))
            sharded = ShardedHub(factory, config, shards=shards, host=host, port=port, tls_cert=cert, tls_key=key)
            sharded.accepting = accepting
            bound = asyncio.run_coroutine_threadsafe(sharded.start(), loop).result(120)
            return cls(loop, thread, sharded, sharded, bound)
        # Agents present projected tokens minted for the audience "wattplane" (the chart's DaemonSet).
        auth = authenticator or TokenReviewAuthenticator(api=client.AuthenticationV1Api(kube.api),
                                                         audiences=(AGENT_TOKEN_AUDIENCE,))
        hub = TelemetryHub(auth, config)
        hub.accepting = accepting
        server, bound = asyncio.run_coroutine_threadsafe(
            start_server(hub, f"{host}:{port}", tls_cert=cert, tls_key=key), loop).result(30)
        return cls(loop, thread, hub, server, bound)

    def set_accepting(self, accepting: bool) -> None:
        """Leader: take agents; standby: send them away (UNAVAILABLE) so they find the leader."""
        self.loop.call_soon_threadsafe(self.hub.set_accepting, accepting)

    def telemetry(self) -> tuple[Sequence[GPUTelemetry], Sequence[ServingTelemetry]]:
        from controller.telemetry import summarise

        async def read() -> Any:
            return summarise(self.hub)  # on the loop thread: no race with the streams it reads

        s = asyncio.run_coroutine_threadsafe(read(), self.loop).result(5)
        return s.gpu_telemetry, s.serving

    def power(self) -> Any:
        """Per-node draws and cap acknowledgements (``summary.PowerReadings``) for PowerDomain status."""
        from controller.telemetry.summary import power_readings

        async def read() -> Any:
            return power_readings(self.hub)  # on the loop thread, like telemetry()

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(5)

    def stop(self) -> None:
        async def shutdown() -> None:
            self.hub.stop_sweeper()
            await self.server.stop(grace=2)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG") or None,
                        help="kubeconfig file (default: $KUBECONFIG, else in-cluster, else ~/.kube/config)")
    parser.add_argument("--context", default=None)
    parser.add_argument("--in-cluster", action="store_true", help="use the pod's ServiceAccount, ignore kubeconfig")
    parser.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                        help="campaign for the Lease before acting (--no-leader-elect: act at once, one replica only)")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="serve the telemetry hub for node agents on this port (default: no hub)")
    parser.add_argument("--grpc-host", default="0.0.0.0")
    parser.add_argument("--tls-dir", type=Path, default=None, help="tls.crt and tls.key for the hub (a Secret)")
    parser.add_argument("--hub-max-streams", type=int, default=0,
                        help="agent streams the hub admits at once; beyond it RESOURCE_EXHAUSTED (0: no limit)")
    parser.add_argument("--hub-shards", type=int, default=1,
                        help="hub worker processes sharing the gRPC port, agents spread by connection "
                        "(1: the hub runs in the controller process)")
    parser.add_argument("--workers", type=int, default=4, help="reconcile workers (passes are I/O-bound)")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--metrics-port", type=int, default=8080, help="0 picks a free port (printed)")
    parser.add_argument("--lease-namespace", default="default")
    parser.add_argument("--lease-name", default="wattplane-controller")
    parser.add_argument("--identity", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--lease-duration", type=float, default=15.0)
    parser.add_argument("--renew-deadline", type=float, default=10.0)
    parser.add_argument("--retry-period", type=float, default=2.0)
    parser.add_argument("--resync", type=float, default=None, help="seconds between full resyncs "
                        "(default: the FleetPolicy's reconcilePeriodS)")
    parser.add_argument("--dry-run", action="store_true", help="plan and report, never write workloads")
    parser.add_argument("--drain-seconds", type=float, default=10.0,
                        help="how long a serving replica out of its Service's endpoints gets before it is evicted")
    parser.add_argument("--router-url", default=None,
                        help="the Ray Serve router's base URL: routing tables are pushed there (default: not pushed)")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kube = Kube.from_config(None if args.in_cluster else args.kubeconfig, args.context)
    metrics = Metrics()
    hub = None
    if args.grpc_port is not None:
        kube_source = (None if args.in_cluster or args.kubeconfig is None else str(args.kubeconfig), args.context)
        hub = HubRunner.start(kube, args.grpc_host, args.grpc_port, args.tls_dir, max_streams=args.hub_max_streams,
                              shards=args.hub_shards, kube_source=kube_source, accepting=not args.leader_elect)
        sys.stdout.write(f"telemetry hub on {args.grpc_host}:{hub.port}\n")
        if args.hub_shards <= 1:
            from controller.telemetry.gctune import tune_for_streams

            tune_for_streams()  # this process holds every agent stream (see gctune); shards tune their own
    router = None
    if args.router_url:
        from controller.dataplane.client import HttpRouterPort

        router = HttpRouterPort(args.router_url)
    controller = Controller(kube, metrics, workers=args.workers, resync_s=args.resync, dry_run=args.dry_run,
                            identity=args.identity, agents=hub.agents if hub else None, router=router,
                            telemetry=hub.telemetry if hub else None, power=hub.power if hub else None)
    controller.drain_s = args.drain_seconds
    elector = LeaderElector(kube, args.lease_namespace, args.lease_name, args.identity,
                            lease_duration_s=args.lease_duration, renew_deadline_s=args.renew_deadline,
                            retry_s=args.retry_period)
    if args.leader_elect:
        kube.may_write = elector.holds  # fence: no write once the Lease lapsed (a paused leader resuming)
    stop = threading.Event()
    health = HealthServer(metrics, ready=lambda: not elector.is_leader.is_set() or controller.synced,
                          host=args.metrics_host, port=args.metrics_port)
    health.start()
    sys.stdout.write(f"metrics on http://{args.metrics_host}:{health.port}/metrics\n")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    lost = threading.Event()

    def started() -> None:
        metrics.is_leader.set(1)
        if hub is not None:
            hub.set_accepting(True)  # agents refused while we stood by now reconnect to us
        log.info("%s leads; starting caches and %d workers", args.identity, args.workers)
        try:
            controller.start()
        except Exception:
            log.exception("controller failed to start")
            stop.set()

    def stopped() -> None:
        metrics.is_leader.set(0)
        if hub is not None:
            hub.set_accepting(False)
        if not stop.is_set():
            lost.set()
        controller.stop()

    try:
        if args.leader_elect:
            elector.run(stop, started, stopped)
        else:
            elector.is_leader.set()
            started()
            stop.wait()
            stopped()
    finally:
        health.stop()
        if hub is not None:
            hub.stop()
    if lost.is_set():
        log.error("leadership lost; exiting")
        return 1
    log.info("shut down cleanly")
    return 0
