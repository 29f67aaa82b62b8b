"""``wattplane agent``: run the node agent against a telemetry hub.

In a cluster: ``--source nvml``, the node name from the downward API (``NODE_NAME``) and the
projected ServiceAccount token file; in simulation: ``--source simulated`` with a power model and
optionally a request trace as load. Engines are scraped with ``--engine DEPLOYMENT=URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from agents.agent import Agent, AgentConfig
from agents.guard import GuardConfig
from agents.scraper import EngineScraper, EngineTarget
from agents.sources import GPUSource, SourceUnavailable
from agents.sources.simulated import H100_SXM, SimulatedSource, constant_load, trace_load

DEFAULT_TOKEN_FILE = "/var/run/secrets/wattplane/token"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hub", default=os.environ.get("WATTPLANE_HUB", "127.0.0.1:7443"), help="telemetry hub host:port"
    )
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME") or os.uname().nodename)
    parser.add_argument("--source", choices=["nvml", "simulated"], default="nvml")
    parser.add_argument("--token", default=os.environ.get("WATTPLANE_TOKEN", ""), help="static bearer token")
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"token file, re-read on each connect (in-cluster: {DEFAULT_TOKEN_FILE})",
    )
    parser.add_argument("--tls-ca", type=Path, default=None, help="CA bundle to verify the hub (plaintext without)")
    parser.add_argument("--report-interval", type=float, default=1.0, help="seconds between reports")
    parser.add_argument(
        "--node-share-w", type=float, default=0.0, help="node share of its power domain (W); 0: no guard"
    )
    parser.add_argument("--power-domain", default="")
    parser.add_argument(
        "--watch-budget", action="store_true",
        help="follow the PowerDomain's budget on the API server (read-only) and scale the node share down "
             "at once when it falls below the budget the share was computed from, controller or not",
    )
    parser.add_argument(
        "--kubeconfig", type=Path, default=None, help="for --watch-budget (default: the in-cluster ServiceAccount)"
    )
    parser.add_argument(
        "--cut-grace", type=float, default=10.0,
        help="seconds a connected controller has to act on a budget cut before the agent scales its share itself",
    )
    parser.add_argument(
        "--failsafe-after", type=float, default=10.0, help="seconds without a controller before fail-safe"
    )
    parser.add_argument(
        "--engine", action="append", default=[], metavar="DEPLOYMENT[:GPU,...]=URL",
        help="engine /metrics to scrape; the GPU indices it runs on get its prompt-phase share (default: all)",
    )
    sim = parser.add_argument_group("simulated source")
    sim.add_argument("--sim-gpus", type=int, default=8)
    sim.add_argument("--sim-load", type=float, nargs=2, default=(0.1, 0.6), metavar=("PREFILL", "DECODE"))
    sim.add_argument("--trace", type=Path, default=None, help="request trace CSV (Azure LLM trace columns) as load")
    parser.add_argument("-v", "--verbose", action="store_true")


def parse_engine(spec: str) -> EngineTarget | None:
    """``DEPLOYMENT[:GPU,...]=URL`` -> a scrape target (None when malformed)."""
    head, sep, url = spec.partition("=")
    deployment, _, gpus = head.partition(":")
    if not sep or not url or not deployment:
        return None
    try:
        indices = tuple(int(g) for g in gpus.split(",") if g.strip()) if gpus else ()
    except ValueError:
        return None
    if any(i < 0 for i in indices):
        return None
    return EngineTarget(deployment=deployment, url=url, gpus=indices)


def build_source(args: argparse.Namespace) -> GPUSource:
    if args.source == "nvml":
        from agents.sources.nvml import NvmlSource

        return NvmlSource()
    load = trace_load(args.trace) if args.trace else constant_load(*args.sim_load)
    return SimulatedSource(H100_SXM, gpus=args.sim_gpus, load=load, node_name=args.node_name)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        source = build_source(args)
    except SourceUnavailable as exc:
        sys.stderr.write(f"wattplane agent: {exc}\n")
        return 3
    targets = []
    for spec in args.engine:
        target = parse_engine(spec)
        if target is None:
            sys.stderr.write(f"wattplane agent: --engine wants DEPLOYMENT[:GPU,...]=URL, got {spec!r}\n")
            return 2
        targets.append(target)
    config = AgentConfig(
        node_name=args.node_name,
        target=args.hub,
        token=args.token,
        token_file=args.token_file,
        tls_ca=args.tls_ca,
        report_interval_s=args.report_interval,
        power_domain=args.power_domain,
        guard=GuardConfig(share_w=args.node_share_w, failsafe_after_s=args.failsafe_after, cut_grace_s=args.cut_grace),
        watch_budget=args.watch_budget,
        kubeconfig=args.kubeconfig,
    )
    agent = Agent(config, source, scraper=EngineScraper(targets) if targets else None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    try:
        asyncio.run(main())
    finally:
        source.close()
    return 0
