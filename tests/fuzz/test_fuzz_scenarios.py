"""Fuzzed scenario files: any text either loads or raises BadInputError naming the file and a line — never a crash.

Mutations start from every bundled scenario (so the fuzzer reaches deep fields: pools, deployments, bursts,
stage configs) and replace, delete or retype values anywhere in the tree; raw text edits cover the YAML
parser itself. A scenario that loads must also be runnable: its sizes are bounded by the schema, so the fleet
it describes is built without exhausting memory. Inputs tried per run: 5 x 80 mutated documents, 200 text
edits and the alias-bomb case (`--hypothesis-show-statistics` prints them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.snapshot import BadInputError
from tests.fuzz.test_fuzz_files import mutated
from wattplane.simulate.fleet import SimulatedFleet
from wattplane.simulate.scenario import Scenario, parse_scenario

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "examples" / "scenarios").glob("*.yaml"))
BUNDLED: dict[str, dict[str, Any]] = {p.stem: yaml.safe_load(p.read_text()) for p in SCENARIOS}
LOCATED = re.compile(r"^fuzz:\d+: ", re.MULTILINE)


def _load_or_reject(text: str) -> Scenario | None:
    try:
        scenario = parse_scenario(text, source="fuzz")
    except BadInputError as exc:
        message = str(exc)
        assert LOCATED.match(message), message  # file:line: field: problem
        assert len(message) < 4000
        return None
    return scenario


def _runnable(scenario: Scenario) -> None:
    """What loads must be buildable: the fleet's arrays stay within the schema's bounds."""
    gpus = sum(p.nodes * p.gpus_per_node for p in scenario.pools)
    assert gpus <= 1_000_000
    assert scenario.duration_s / scenario.step_s <= 10_000_000
    if gpus <= 50_000:
        fleet = SimulatedFleet(scenario, np.random.default_rng(0))
        assert len(fleet.gpu_node) == gpus


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_scenarios_load(name: str) -> None:
    assert _load_or_reject(yaml.safe_dump(BUNDLED[name])) is not None


@pytest.mark.parametrize("name", sorted(BUNDLED))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_scenarios_load_or_are_rejected_clearly(name: str, data: st.DataObject) -> None:
    text = data.draw(mutated(BUNDLED[name]))  # JSON is YAML
    scenario = _load_or_reject(text)
    if scenario is not None:
        _runnable(scenario)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SCENARIOS), st.integers(0, 10_000), st.integers(0, 40), st.text(max_size=12))
def test_text_edits_load_or_are_rejected_clearly(path: Path, at: int, cut: int, insert: str) -> None:
    text = path.read_text()
    at %= len(text) + 1
    _load_or_reject(text[:at] + insert + text[at + cut:])


def test_alias_bomb_is_rejected_quickly() -> None:
    """A "billion laughs" document must not expand into a 10^9-node validation walk."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    lines += ["name: bomb", "duration_s: 10", "deployments: *a8"]
    with pytest.raises(BadInputError, match=r"^fuzz:\d+: "):
        parse_scenario("\n".join(lines), source="fuzz")
