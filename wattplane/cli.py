"""The ``wattplane`` command: one entry point, a module per subcommand.

Each subcommand module exposes ``configure(parser)`` and ``run(args) -> int``. Only the module
of the chosen subcommand is imported, so ``wattplane --help`` stays fast and a heavy dependency
of one subcommand (Ray, the Kubernetes client) never slows another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from wattplane import __version__

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("wattplane.simulate.command", "simulate a fleet under a scenario and report"),
    "bench": ("benchmarks.command", "run a benchmark: ours vs the anchor's method, as JSON"),
    "plan": ("wattplane.plan_command", "run one policy on a snapshot file and print the Plan"),
    "snapshot": ("wattplane.snapshot_command", "write a snapshot of a live cluster or a built-in fleet"),
    "controller": ("controller.main", "run the controller (reconciler, telemetry hub, executor)"),
    "agent": ("agents.main", "run the node agent (telemetry up, commands down)"),
    "crds": ("controller.api.crdgen", "generate CRD YAML from the pydantic API models"),
    "testcluster": ("wattplane.testcluster.command", "build/start/stop the local test Kubernetes"),
    "fetch-encoder": ("wattplane.encoder_files", "download and verify the sentence encoder for the embedding scorer"),
    "soak": ("wattplane.soak.command", "long runs (simulated fleet, controller churn): memory growth, latency drift"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="wattplane", description="Power-aware control plane for LLM inference fleets.")
    parser.add_argument("--version", action="version", version=f"wattplane {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            importlib.import_module(module).configure(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(selected if selected in SUBCOMMANDS else None)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args))
    except KeyboardInterrupt:
        return 130
