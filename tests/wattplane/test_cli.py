"""The `wattplane` command: version, subcommand list, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wattplane import __version__
from wattplane.cli import SUBCOMMANDS, main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattplane", *args], capture_output=True, text=True, timeout=120)


def test_version() -> None:
    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"wattplane {__version__}"


def test_help_lists_every_subcommand() -> None:
    out = _run("--help")
    assert out.returncode == 0
    for name in ("simulate", "bench", "controller", "agent", "crds", "testcluster", "plan", "snapshot"):
        assert name in out.stdout
        assert name in SUBCOMMANDS


@pytest.mark.parametrize(
    "argv",
    [["bogus"], ["--bogus"], ["testcluster", "sideways"], ["bench", "nope"], ["testcluster", "up", "--nodes", "x"]],
)
def test_bad_arguments_are_one_line_and_exit_2(argv: list[str]) -> None:
    out = _run(*argv)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("wattplane")
    assert "error" in lines[0]


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
