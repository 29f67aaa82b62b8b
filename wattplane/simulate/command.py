"""``wattplane simulate SCENARIO.yaml [--out DIR] [--json] [--seed N] [--compare baselines]``"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from policies.snapshot import BadInputError, Snapshot
from wattplane.datasets import MissingDataError
from wattplane.simulate.engine import SimResult, Simulation, progress_bar
from wattplane.simulate.load import generate_load
from wattplane.simulate.nodelist import with_node_list
from wattplane.simulate.report import summary, to_json, write_csv, write_cycles, write_html
from wattplane.simulate.scenario import Scenario, load_scenario


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="scenario YAML (see examples/scenarios/)")
    parser.add_argument("--out", default=None, help="write report.html, CSV time series and cycle logs here")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the metrics per policy set")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the scenario's)")
    parser.add_argument("--compare", choices=("baselines",), default=None,
                        help="also run every stage's baseline and a static (all off) fleet")
    parser.add_argument("--data-dir", default=None, help="data directory for data:... paths (default ../shared/data)")
    parser.add_argument("--duration", type=float, default=None, help="override the scenario's duration (s)")
    parser.add_argument("--trace", default=None, metavar="CSV",
                        help="replay this arrival trace (Azure LLM trace columns) instead of the scenario's load, "
                             "scaled to the scenario's request rate; bursts are kept")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="run each policy set as a Ray task: 'local' starts Ray here, otherwise a cluster "
                             "address (ray://host:10001 or auto)")
    cluster = parser.add_argument_group("on a real cluster (the controller, node agents over gRPC, kwok GPU nodes)")
    cluster.add_argument("--cluster", default=None, metavar="KUBECONFIG",
                         help="drive the scenario through the real controller against this cluster's API server "
                              "instead of the in-memory fleet (Wattplane's policy set only)")
    cluster.add_argument("--context", default=None, help="kubeconfig context for --cluster")
    cluster.add_argument("--time-scale", type=float, default=1.0,
                         help="with --cluster: simulated seconds per wall second (e.g. 10 runs 15 min in 90 s; "
                              "the controller's period is scaled with it)")
    cluster.add_argument("--ready-timeout", type=float, default=180.0,
                         help="with --cluster: wall seconds to wait for every minimum replica before load starts")
    parser.add_argument("--dump-snapshots", action="store_true",
                        help="with --out: write each cycle's snapshot (snapshots/<set>/t<seconds>.json) for "
                             "`wattplane plan NAME --snapshot FILE`")


def simulate(scenario: Scenario, seed: int, compare: str | None = None, base_dir: Path | None = None,
             data_dir: str | None = None, show_progress: bool = False, dump_dir: Path | None = None
             ) -> list[SimResult]:
    """Run every policy set of the scenario on the same load (same seed, same arrivals)."""
    scenario = with_node_list(scenario, base_dir, data_dir)
    load = generate_load(scenario, seed, base_dir, data_dir)
    results = []
    for name, config in scenario.policy_sets(compare).items():
        bar = progress_bar(f"{scenario.name}/{name}") if show_progress else None
        dump = _dumper(dump_dir / name) if dump_dir is not None else None
        results.append(Simulation(scenario, config, load, seed, policy_set=name, progress=bar,
                                  on_snapshot=dump, base_dir=base_dir, data_dir=data_dir).run())
    return results


def with_trace(scenario: Scenario, trace: str) -> Scenario:
    """The scenario with its load replaced by a trace replay at the same mean request rate."""
    from wattplane.simulate.load import AZURE_CONV_REQUESTS_PER_S
    from wattplane.simulate.scenario import LoadSpec, TraceLoad

    old = scenario.load
    rate = old.synthetic.requests_per_s if old.synthetic is not None else None
    bursts = old.synthetic.bursts if old.synthetic is not None else old.trace.bursts if old.trace else ()
    scale = rate / AZURE_CONV_REQUESTS_PER_S if rate else (old.trace.rate_scale if old.trace else 1.0)
    load = LoadSpec(trace=TraceLoad(path=str(Path(trace).resolve()), rate_scale=scale, bursts=bursts))
    return scenario.model_copy(update={"load": load})


def simulate_on_ray(scenario: Scenario, seed: int, address: str, compare: str | None = None,
                    base_dir: Path | None = None, data_dir: str | None = None) -> list[SimResult]:
    """The same runs as :func:`simulate`, one Ray task per policy set (sweeps bigger than one machine).

    Each task regenerates the load from the seed, so tasks ship only the scenario, never arrays;
    results come back as :class:`SimResult` values (numpy series pickle cheaply).
    """
    import ray

    scenario = with_node_list(scenario, base_dir, data_dir)
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    task = ray.remote(_run_one)
    sets = scenario.policy_sets(compare)
    refs = [task.remote(scenario.model_dump_json(), name, config.model_dump_json(), seed,
                        str(base_dir) if base_dir else None, data_dir) for name, config in sets.items()]
    return list(ray.get(refs))


def _run_one(scenario_json: str, name: str, config_json: str, seed: int, base_dir: str | None,
             data_dir: str | None) -> SimResult:
    from policies.pipeline import PipelineConfig

    scenario = Scenario.model_validate_json(scenario_json)
    base = Path(base_dir) if base_dir else None
    load = generate_load(scenario, seed, base, data_dir)
    config = PipelineConfig.model_validate_json(config_json)
    return Simulation(scenario, config, load, seed, policy_set=name, base_dir=base, data_dir=data_dir).run()


def _dumper(folder: Path) -> Callable[[Snapshot], None]:
    folder.mkdir(parents=True, exist_ok=True)

    def dump(snapshot: Snapshot) -> None:
        (folder / f"t{int(snapshot.now):06d}.json").write_text(snapshot.to_json())

    return dump


def run(args: argparse.Namespace) -> int:
    path = Path(args.scenario)
    try:
        scenario = with_node_list(load_scenario(path), path.parent, args.data_dir)
    except (BadInputError, MissingDataError) as exc:
        sys.stderr.write(f"wattplane simulate: {exc}\n")
        return 2
    if args.duration is not None:
        scenario = scenario.model_copy(update={"duration_s": float(args.duration)})
    if args.trace:
        scenario = with_trace(scenario, args.trace)
    seed = scenario.seed if args.seed is None else int(args.seed)
    if args.cluster:
        return run_on_cluster(args, scenario, seed, path)
    t0 = time.perf_counter()
    try:
        dump = Path(args.out) / "snapshots" if args.out and args.dump_snapshots else None
        if args.ray:
            results = simulate_on_ray(scenario, seed, args.ray, args.compare, path.parent, args.data_dir)
        else:
            results = simulate(scenario, seed, args.compare, path.parent, args.data_dir,
                               show_progress=not args.json, dump_dir=dump)
    except MissingDataError as exc:
        sys.stderr.write(f"wattplane simulate: {exc}\n")
        return 2
    wall = time.perf_counter() - t0
    doc = to_json(scenario.name, seed, scenario.step_s, scenario.duration_s, results)
    doc["wall_s"] = round(wall, 3)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for r in results:
            write_csv(out, r, scenario.step_s)
            write_cycles(out, r)
        (out / "summary.json").write_text(json.dumps(doc, indent=2))
        report = write_html(out, scenario.name, scenario.description, results, scenario.step_s)
    if args.json:
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        sys.stdout.write(summary(scenario.name, results, wall) + "\n")
        if args.out:
            sys.stdout.write(f"\nreport: {report}\n")
    return 1 if any(r.invariant_violations for r in results) else 0


def run_on_cluster(args: argparse.Namespace, scenario: Scenario, seed: int, path: Path) -> int:
    """``--cluster``: the scenario through the real controller; same summary and JSON, measured there."""
    from wattplane.simulate.cluster import ClusterOptions, ClusterRun, ClusterSimError, cluster_json
    from wattplane.simulate.crs import fleet_policy_spec

    if args.compare or args.ray or args.trace or args.dump_snapshots:
        sys.stderr.write("wattplane simulate: --cluster runs the scenario's own policy set only "
                         "(no --compare, --ray, --trace or --dump-snapshots)\n")
        return 2
    if args.time_scale <= 0:
        sys.stderr.write("wattplane simulate: --time-scale must be > 0\n")
        return 2
    try:
        fleet_policy_spec(scenario, scenario.control_period_s)  # what a FleetPolicy cannot say fails before any write
    except BadInputError as exc:
        sys.stderr.write(f"wattplane simulate: {exc}\n")
        return 2
    out = Path(args.out) if args.out else None
    options = ClusterOptions(kubeconfig=Path(args.cluster), time_scale=args.time_scale, context=args.context,
                             ready_timeout_s=args.ready_timeout, log_dir=out)
    t0 = time.perf_counter()
    bar = progress_bar(f"{scenario.name}@cluster") if not args.json else None
    try:
        report = ClusterRun(scenario, seed, options, path.parent, args.data_dir).run(progress=bar)
    except (ClusterSimError, MissingDataError) as exc:
        sys.stderr.write(f"wattplane simulate --cluster: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("wattplane simulate --cluster: interrupted; what the run created was removed\n")
        return 130
    wall = time.perf_counter() - t0
    doc = cluster_json(report, scenario, seed, args.time_scale)
    doc["wall_s"] = round(wall, 3)
    tick = args.time_scale * options.tick_s
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out, report.result, tick)
        (out / "summary.json").write_text(json.dumps(doc, indent=2))
        html = write_html(out, scenario.name, scenario.description, [report.result], tick)
    if args.json:
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        sys.stdout.write(summary(f"{scenario.name} (cluster, x{args.time_scale:g})", [report.result], wall) + "\n")
        sys.stdout.write("\nnot measured on a cluster (nan above): " + ", ".join(doc["cluster"]["not_measured"]) + "\n")
        for note in report.notes:
            sys.stdout.write(f"note: {note}\n")
        if out is not None:
            sys.stdout.write(f"\nreport: {html}\n")
    return 1 if report.result.invariant_violations else 0
