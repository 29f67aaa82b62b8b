"""``wattplane soak sim|churn``: long runs that report memory growth and latency drift, and fail past a bound.

* ``sim``: the 10,000-GPU scale fleet of ``wattplane bench simulate`` for ``--hours`` simulated
  hours (default 24) with every stage on (:mod:`wattplane.soak.sim`);
* ``churn``: the controller as a real process against the local test Kubernetes for ``--minutes``
  under continuous ModelDeployment and node churn (:mod:`wattplane.soak.churn`).

Both print a table (or one JSON object with ``--json``), write it to ``--out`` when given, append a
record to ``$WATTPLANE_CHAOS_RESULTS`` when set, and exit 1 when a stated bound is exceeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from wattplane.soak.probe import write_chaos_records


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="soak", metavar="KIND", required=True)
    sim = sub.add_parser("sim", help="the 10,000-GPU simulated fleet for many simulated hours")
    sim.add_argument("--gpus", type=int, default=10_000, help="GPUs in the generated fleet (default 10,000)")
    sim.add_argument("--hours", type=float, default=24.0, help="simulated hours (default 24)")
    sim.add_argument("--window-h", type=float, default=1.0, help="first/last window compared, hours (default 1)")
    sim.add_argument("--max-rss-mib-per-h", type=float, default=4.0,
                     help="fail when RSS, less the result series kept by design, grows faster than this per "
                          "simulated hour after the first window (default 4)")
    sim.add_argument("--max-latency-drift", type=float, default=1.5,
                     help="fail when the last window's mean CPU per cycle exceeds the first's by this factor")
    sim.add_argument("--warmup-h", type=float, default=0.0,
                     help="leave the first hours out of every comparison (default 0: first hour vs last)")
    sim.add_argument("--no-burst", action="store_true", help="drop the scale case's 1.5x burst (stationary load)")
    sim.add_argument("--rows", default=None, metavar="JSONL",
                     help="append each cycle's sample to this file as it is taken (watch a long run)")
    _common(sim)
    churn = sub.add_parser("churn", help="the controller on the test cluster under ModelDeployment and node churn")
    churn.add_argument("--minutes", type=float, default=30.0, help="churn duration in minutes (default 30)")
    churn.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples of the controller")
    churn.add_argument("--window-min", type=float, default=5.0, help="first/last window compared, minutes")
    churn.add_argument("--nodes", type=int, default=24, help="kwok GPU nodes kept in the cluster")
    churn.add_argument("--max-rss-mib-per-h", type=float, default=60.0,
                       help="fail when the controller's RSS grows faster than this per hour after warm-up")
    churn.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                       help="fail when the last window's mean RSS exceeds the first's by more than this")
    churn.add_argument("--max-fd-growth", type=float, default=20.0, help="fail past this open-FD growth")
    churn.add_argument("--max-thread-growth", type=float, default=10.0, help="fail past this thread growth")
    churn.add_argument("--max-latency-drift", type=float, default=2.0,
                       help="fail when the last window's reconcile p50 exceeds the first's by this factor")
    churn.add_argument("--max-stale-series", type=float, default=0.0,
                       help="fail when more /metrics series than this still name the churn namespace after clean-up")
    churn.add_argument("--seed", type=int, default=0)
    churn.add_argument("--keep-cluster", action="store_true", help=argparse.SUPPRESS)
    _common(churn)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a reduced run that finishes in under 60 s")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    if "--seed" not in p._option_string_actions:
        p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.soak == "sim":
        from wattplane.soak.sim import run_sim_soak

        # quick: a small stationary fleet (no burst), so first vs last window still compares like with like
        gpus, hours = (300, 1.5) if args.quick else (args.gpus, args.hours)
        report = run_sim_soak(gpus, hours, args.seed, 1 / 3 if args.quick else args.window_h,
                              args.max_rss_mib_per_h, args.max_latency_drift, progress=_progress(args.json),
                              rows_file=args.rows, burst=not (args.quick or args.no_burst),
                              warmup_h=0.5 if args.quick else args.warmup_h)
        fault = f"simulated soak {gpus} GPUs x {hours:g} h"
    else:
        import signal

        from wattplane.soak.churn import run_churn_soak

        # a SIGTERM (timeout, kill) must still stop the controller and the cluster: make it SystemExit
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

        minutes = min(args.minutes, 0.5) if args.quick else args.minutes
        report = run_churn_soak(minutes=minutes, sample_s=min(args.sample_s, 3.0) if args.quick else args.sample_s,
                                window_s=60 * (min(args.window_min, minutes / 4) if args.quick else args.window_min),
                                nodes=min(args.nodes, 8) if args.quick else args.nodes, seed=args.seed,
                                bounds=_churn_bounds(args), progress=not args.json)
        fault = f"controller churn soak {minutes:g} min"
    report = {"soak": args.soak, "quick": bool(args.quick), **report}
    text = json.dumps(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    write_chaos_records([chaos_record(fault, report)])
    sys.stdout.write((text if args.json else format_report(report)) + "\n")
    return 1 if report["failures"] else 0


def _churn_bounds(args: argparse.Namespace) -> dict[str, float]:
    return {"max_rss_mib_per_h": args.max_rss_mib_per_h, "max_rss_growth_mib": args.max_rss_growth_mib,
            "max_fd_growth": args.max_fd_growth, "max_thread_growth": args.max_thread_growth,
            "max_latency_drift": args.max_latency_drift, "max_stale_series": args.max_stale_series}


def chaos_record(fault: str, report: dict[str, Any], test: str = "wattplane soak") -> dict[str, Any]:
    """The chaos results line (``tests/chaos/records.py``'s format): one soak is one fault tried; it
    survived when every bound held."""
    detail = {"failures": report["failures"]}
    for key in ("memory", "latency", "churn", "orphans"):
        if key in report:
            detail[key] = report[key]
    converge = report.get("time_to_converge_s")
    return {"test": test, "fault": fault, "tried": 1, "survived": not report["failures"],
            "data_lost": int(report.get("data_lost", 0)),
            "time_to_converge_s": None if converge is None else round(float(converge), 3), "detail": detail,
            "at": time.time()}


def _progress(quiet: bool) -> Any:
    from wattplane.simulate.engine import progress_bar

    return None if quiet else progress_bar("soak")


def format_report(report: dict[str, Any]) -> str:
    lines = [f"soak {report['soak']} (quick={report['quick']}) {json.dumps(report.get('params', {}))}"]
    if "run" in report:
        lines.append(f"run: {json.dumps(report['run'])}")
    lines.append("")
    lines.append(f"{'series':28}{'first':>12}{'last':>12}{'growth':>12}{'slope/h':>12}")
    for g in report["memory"].values():
        if isinstance(g, dict):
            lines.append(f"{g['name']:28}{g['first_mean']:12.2f}{g['last_mean']:12.2f}{g['growth']:12.2f}"
                         f"{g['slope_per_h']:12.2f}")
    lines.append("")
    lines.append(f"{'latency':28}{'p50 first':>12}{'p50 last':>12}{'p99 first':>12}{'p99 last':>12}")
    for d in report["latency"].values():
        q = [d.get(k, d.get(f"{k}_ms", float("nan"))) for k in ("first_p50", "last_p50", "first_p99", "last_p99")]
        lines.append(f"{d['name']:28}" + "".join(f"{v:12.2f}" for v in q))
    grown = {k: v for k, v in {**report.get("state_bytes", {}), **report.get("containers", {})}.items()
             if v["growth"] > 0}
    if grown:
        lines.append("")
        lines.append("grew between first and last window: " + ", ".join(
            f"{k} {v['first_mean']:.0f} -> {v['last_mean']:.0f}" for k, v in sorted(grown.items())))
    for k in ("churn", "controller", "time_to_converge_s", "orphans", "data_lost"):
        if k in report:
            lines.append(f"{k}: {json.dumps(report[k])}")
    lines.append("")
    lines.append("FAIL: " + "; ".join(report["failures"]) if report["failures"] else "PASS: every bound held "
                 + json.dumps(report["bounds"]))
    return "\n".join(lines)


__all__ = ["chaos_record", "configure", "format_report", "run"]
