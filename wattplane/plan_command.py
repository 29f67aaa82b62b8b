"""``wattplane plan NAME --snapshot FILE [--state FILE] [--config FILE] [--method M] [--json]``

"What would you do?" without a controller: run one policy on a snapshot file and print its Plan.
The policy is resolved through the same registry the pipeline uses, so this runs exactly the code
the controller and the simulator run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from policies.pipeline import OURS, REGISTRY, Stage, UnknownMethodError, resolve
from policies.plan import Plan
from policies.snapshot import BadInputError, Snapshot, format_validation_error

# CLI policy name -> pipeline stage
POLICIES: dict[str, Stage] = {
    "placement": Stage.PLACEMENT,
    "moe": Stage.MOE,
    "power": Stage.POWER,
    "reschedule": Stage.RESCHEDULING,
    "routing": Stage.ROUTING,
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy", choices=sorted(POLICIES), metavar="NAME", help=", ".join(sorted(POLICIES)))
    parser.add_argument("--snapshot", type=Path, required=True, help="snapshot JSON (`wattplane snapshot` writes one)")
    parser.add_argument("--state", type=Path, default=None, help="the policy's previous State (JSON)")
    parser.add_argument("--config", type=Path, default=None, help="the policy's config (YAML or JSON)")
    parser.add_argument("--method", default=OURS, help="`wattplane` (default) or a baseline, e.g. greedy, eplb, polca")
    parser.add_argument("--json", action="store_true", help="print the Plan as JSON")


def _read_mapping(path: Path | None, what: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BadInputError(f"{path}: cannot read {what}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: {what} must be a mapping, not {type(data).__name__}")
    return data


def plan_from_files(name: str, snapshot_path: Path, method: str = OURS, state_path: Path | None = None,
                    config_path: Path | None = None) -> Plan:
    stage = POLICIES[name]
    try:
        text = snapshot_path.read_text()
    except OSError as exc:
        raise BadInputError(f"{snapshot_path}: {exc.strerror}") from exc
    snapshot = Snapshot.from_json(text, source=str(snapshot_path))
    resolved = resolve(stage, method)
    if resolved is None:
        raise BadInputError(f"policy {name}/{method} is not available in this build")
    try:
        config = resolved.make_config(_read_mapping(config_path, "config"))
        state_data = _read_mapping(state_path, "state")
        if resolved.kind == "forecast":
            raise BadInputError("forecast is not a plan-producing policy")
        if resolved.state_cls is None:
            return resolved.call(snapshot, config)  # type: ignore[no-any-return]
        state = resolved.state_cls.model_validate(state_data)
    except ValidationError as exc:
        raise BadInputError(f"{config_path or state_path}: {format_validation_error(exc)}") from exc
    return resolved.call(snapshot, config, state)  # type: ignore[no-any-return]


def render(plan: Plan) -> str:
    e = plan.explanation
    lines = [
        f"policy {plan.policy.value}: {e.reason.value} — {e.summary}",
        f"  solver {e.solver_status.value}, {e.solve_ms:.1f} ms"
        + (f", objective {e.objective:.6g}" if e.objective is not None else "")
        + (f", gap {e.gap:.2%}" if e.gap is not None else "")
        + (f", fallback: {e.fallback}" if e.fallback else ""),
        f"  {len(plan.actions)} action(s), plan id {plan.id}",
    ]
    for a in plan.actions[:50]:
        body = a.model_dump(exclude={"kind", "phy2log", "steps"})
        lines.append(f"  - {a.kind} {json.dumps(body, default=str)}")
    if len(plan.actions) > 50:
        lines.append(f"  ... {len(plan.actions) - 50} more (use --json)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    stage = POLICIES[args.policy]
    if (stage, args.method) not in REGISTRY:
        methods = sorted(m for (s, m) in REGISTRY if s == stage)
        sys.stderr.write(f"wattplane plan: unknown method {args.method!r} for {args.policy} (choose: {methods})\n")
        return 2
    try:
        plan = plan_from_files(args.policy, args.snapshot, args.method, args.state, args.config)
    except (BadInputError, UnknownMethodError) as exc:
        sys.stderr.write(f"wattplane plan: {exc}\n")
        return 2
    sys.stdout.write((plan.to_json() if args.json else render(plan)) + "\n")
    return 0
