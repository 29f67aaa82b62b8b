"""Chaos fixtures: every test records what it tried into one results file (see ``records.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.records import ENV_RESULTS, ChaosRecorder, load, results_path, table

_DEFAULT: list[Path] = []


@pytest.fixture
def chaos(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ChaosRecorder:
    if not _DEFAULT:
        _DEFAULT.append(tmp_path_factory.getbasetemp() / "chaos-results.jsonl")
    return ChaosRecorder(results_path(_DEFAULT[0]), request.node.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A chaos test that failed before it recorded anything still shows in the table, as not survived."""
    outcome = yield
    report = outcome.get_result()
    recorder = getattr(item, "funcargs", {}).get("chaos")
    if report.when == "call" and report.failed and isinstance(recorder, ChaosRecorder) and not recorder.written:
        recorder.write(item.name, False, 0, None, {"error": str(call.excinfo.value)[:300] if call.excinfo else ""})


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Without ``$WATTPLANE_CHAOS_RESULTS`` (plain pytest), print the table here; ``make chaos`` prints it
    from its own file afterwards."""
    if os.environ.get(ENV_RESULTS) or not _DEFAULT:
        return
    records = load(_DEFAULT[0])
    if records:
        terminalreporter.write_line(f"\nchaos summary ({_DEFAULT[0]}):\n{table(records)}")
