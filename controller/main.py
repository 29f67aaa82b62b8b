"""``wattplane controller``: leader-elected reconciler with /metrics, /healthz and /readyz.

Lifecycle: serve health at once; campaign for the Lease; on winning, start caches and workers;
on SIGTERM/SIGINT finish the current keys, close watches, release the Lease (a standby takes over
at once) and exit 0; on losing the Lease exit 1 rather than risk two actors.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from controller.kube import Kube
from controller.metrics import HealthServer, Metrics
from controller.reconciler.controller import Controller
from controller.reconciler.leader import LeaderElector

log = logging.getLogger("wattplane.controller")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG") or None,
                        help="kubeconfig file (default: $KUBECONFIG, else in-cluster, else ~/.kube/config)")
    parser.add_argument("--context", default=None)
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
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kube = Kube.from_config(args.kubeconfig, args.context)
    metrics = Metrics()
    controller = Controller(kube, metrics, workers=args.workers, resync_s=args.resync, dry_run=args.dry_run,
                            identity=args.identity)
    elector = LeaderElector(kube, args.lease_namespace, args.lease_name, args.identity,
                            lease_duration_s=args.lease_duration, renew_deadline_s=args.renew_deadline,
                            retry_s=args.retry_period)
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
        log.info("%s leads; starting caches and %d workers", args.identity, args.workers)
        try:
            controller.start()
        except Exception:
            log.exception("controller failed to start")
            stop.set()

    def stopped() -> None:
        metrics.is_leader.set(0)
        if not stop.is_set():
            lost.set()
        controller.stop()

    try:
        elector.run(stop, started, stopped)
    finally:
        health.stop()
    if lost.is_set():
        log.error("leadership lost; exiting")
        return 1
    log.info("shut down cleanly")
    return 0
