"""Chaos fixtures: every test records what it tried into one results file (see ``records.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.records import ENV_RESULTS, ChaosRecorder, load, results_path, table

_DEFAULT: list[Path] = []


@pytest.fixture
def chaos(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ChaosRecorder:
    if not _DEFAULT:
        _DEFAULT.append(tmp_path_factory.getbasetemp() / "chaos-results.jsonl")
    return ChaosRecorder(results_path(_DEFAULT[0]), request.node.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Without ``$WATTPLANE_CHAOS_RESULTS`` (plain pytest), print the table here; ``make chaos`` prints it
    from its own file afterwards."""
    if os.environ.get(ENV_RESULTS) or not _DEFAULT:
        return
    records = load(_DEFAULT[0])
    if records:
        terminalreporter.write_line(f"\nchaos summary ({_DEFAULT[0]}):\n{table(records)}")
