"""``wattplane bench NAME [--json] [--quick] [--data-dir DIR] ...``"""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmarks.common import add_common_arguments, emit, report
from wattplane.datasets import MissingDataError

# benchmark name -> module under benchmarks/
BENCHMARKS = {
    "placement": "benchmarks.placement",
    "moe": "benchmarks.moe",
    "power": "benchmarks.power",
    "reschedule": "benchmarks.reschedule",
    "routing": "benchmarks.routing",
    "telemetry": "benchmarks.telemetry",
    "controller": "benchmarks.controller",
    "simulate": "benchmarks.simulate",
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True, parser_class=type(parser))
    selected = next((a for a in sys.argv[2:] if not a.startswith("-")), None)
    for name, module in BENCHMARKS.items():
        sp = sub.add_parser(name, help=f"the {name} benchmark")
        add_common_arguments(sp)
        if name == selected:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
                continue
            if hasattr(mod, "configure"):
                mod.configure(sp)


def run(args: argparse.Namespace) -> int:
    module = BENCHMARKS[args.benchmark]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        sys.stderr.write(f"wattplane bench: benchmark {args.benchmark!r} is not built yet\n")
        return 2
    try:
        cases = mod.run(args)
    except MissingDataError as exc:
        sys.stderr.write(f"wattplane bench {args.benchmark}: {exc}\n")
        return 2
    emit(report(args.benchmark, bool(args.quick), cases, bool(args.json)))
    return 0
