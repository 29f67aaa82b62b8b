"""Fault points (test-only): parsed strictly, inert unless armed, and SIGKILL exactly where armed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from controller.faults import FaultSpecError, parse

REPO = Path(__file__).resolve().parents[2]


def test_parse_counts_probabilities_and_rejects_unknown_points() -> None:
    armed = parse("executor.after_apply=3, migration.after_evict@0.5")
    assert armed["executor.after_apply"].at_hit == 3
    assert armed["migration.after_evict"].probability == 0.5 and armed["migration.after_evict"].at_hit is None
    assert parse("") == {}
    with pytest.raises(FaultSpecError, match="unknown fault point"):
        parse("executor.after_aply=1")
    with pytest.raises(FaultSpecError, match="NAME=COUNT"):
        parse("executor.after_apply")


def _run(points: str, hits: int, log: Path) -> subprocess.CompletedProcess[str]:
    code = ("from controller.faults import fault_point\n"
            f"for i in range({hits}):\n    fault_point('executor.after_apply')\n    print(i, flush=True)\n")
    env = {**os.environ, "WATTPLANE_FAULT_POINTS": points, "WATTPLANE_FAULT_LOG": str(log)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_armed_point_kills_the_process_on_its_hit_and_says_where(tmp_path: Path) -> None:
    proc = _run("executor.after_apply=3", 5, tmp_path / "log")
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == ["0", "1"]  # passed twice, died on the third
    assert (tmp_path / "log").read_text() == "executor.after_apply 3\n"


def test_unarmed_or_other_points_do_nothing(tmp_path: Path) -> None:
    proc = _run("reconcile.before_status=1", 3, tmp_path / "log")
    assert proc.returncode == 0 and proc.stdout.split() == ["0", "1", "2"]
    assert not (tmp_path / "log").exists()
