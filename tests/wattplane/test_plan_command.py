"""`wattplane plan NAME --snapshot FILE`: the policies from the shell, on snapshot files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from policies.plan import Plan, PolicyName, SetReplicas
from policies.snapshot import Demand, ServingTelemetry
from tests.policies.test_snapshot import make_snapshot


def _plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattplane", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_placement_plan_from_a_snapshot_file(tmp_path: Path) -> None:
    snap = make_snapshot(
        demand=(Demand(deployment="ns/llama", output_tokens_per_s=50_000.0, input_tokens_per_s=100_000.0,
                       requests_per_s=100.0),),
        serving=(ServingTelemetry(deployment="ns/llama", output_tokens_per_s=50_000.0),),
    )
    f = tmp_path / "snap.json"
    f.write_text(snap.to_json())
    out = _plan("placement", "--snapshot", str(f), "--json")
    assert out.returncode == 0, out.stderr
    plan = Plan.from_json(out.stdout)
    assert plan.policy is PolicyName.PLACEMENT
    assert plan.explanation.summary
    for a in plan.actions:
        assert isinstance(a, SetReplicas) and a.pool == "h100" and a.replicas <= 2 * 8  # 2 nodes x 8 GPUs
    # the same file gives the same plan (ids derive from content)
    again = Plan.from_json(_plan("placement", "--snapshot", str(f), "--json").stdout)
    assert again.id == plan.id
    human = _plan("placement", "--snapshot", str(f))
    assert human.returncode == 0 and human.stdout.startswith("policy placement:")


def test_bad_snapshot_file_is_a_one_line_error(tmp_path: Path) -> None:
    f = tmp_path / "snap.json"
    doc = json.loads(make_snapshot().to_json())
    doc["nodes"][0]["gpus"] = -3
    f.write_text(json.dumps(doc))
    out = _plan("power", "--snapshot", str(f))
    assert out.returncode == 2
    assert out.stderr.strip() == f"wattplane plan: {f}: nodes.0.gpus: Input should be greater than or equal to 0"


def test_missing_file_and_unknown_method(tmp_path: Path) -> None:
    out = _plan("moe", "--snapshot", str(tmp_path / "nope.json"))
    assert out.returncode == 2 and "No such file" in out.stderr
    f = tmp_path / "snap.json"
    f.write_text(make_snapshot().to_json())
    out = _plan("moe", "--snapshot", str(f), "--method", "magic")
    assert out.returncode == 2 and "unknown method 'magic'" in out.stderr
