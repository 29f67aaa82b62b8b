"""Scenario files: bundled ones validate; bad ones fail with file:line: field: reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.snapshot import BadInputError
from wattplane.simulate.scenario import load_scenario, parse_scenario

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "examples" / "scenarios").glob("*.yaml"))

GOOD = """\
name: t
duration_s: 60
pools:
  - name: h100
    accelerator: H100-80GB
    nodes: 2
    cost_per_device_hour: 3
deployments:
  - name: a
    model: llama-3.1-70b
    parallelism: {tp: 4}
    initial_replicas: {h100: 1}
load:
  synthetic: {requests_per_s: 3}
"""


def test_bundled_scenarios_exist_and_validate() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {"quickstart", "oversubscribed-row", "moe-burst", "fragmented-fleet", "fallback-under-load"} <= names
    for p in SCENARIOS:
        assert load_scenario(p).name


def test_good_scenario_parses_with_catalogue_names() -> None:
    sc = parse_scenario(GOOD)
    assert sc.pools[0].accelerator.tdp_w == 700
    assert sc.deployments[0].model.params_b == 70


@pytest.mark.parametrize(
    ("old", "new", "line", "field"),
    [
        ("    nodes: 2\n", "    nodes: -1\n", 6, "pools[0].nodes"),
        ("    parallelism: {tp: 4}\n", "    parallelism: {tp: zero}\n", 11, "deployments[0].parallelism.tp"),
        ("    accelerator: H100-80GB\n", "    accelerator: TPU9\n", 5, "pools[0].accelerator"),
        ("    model: llama-3.1-70b\n", "    model: llama-9\n", 10, "deployments[0].model"),
        ("duration_s: 60\n", "duration_s: 60\nbogus_field: 1\n", 3, "bogus_field"),
    ],
)
def test_bad_field_names_line_and_field(old: str, new: str, line: int, field: str) -> None:
    text = GOOD.replace(old, new)
    assert text != GOOD
    with pytest.raises(BadInputError) as err:
        parse_scenario(text, source="bad.yaml")
    msg = str(err.value)
    assert msg.startswith(f"bad.yaml:{line}: {field}"), msg
    assert "\n" not in msg, msg  # one problem, one line (no echo of the enclosing list)


def test_unknown_references_are_reported() -> None:
    text = GOOD.replace("initial_replicas: {h100: 1}", "initial_replicas: {tpu: 1}")
    with pytest.raises(BadInputError, match="unknown pool 'tpu'"):
        parse_scenario(text, source="bad.yaml")
    text = GOOD + "policies:\n  power: magic\n"
    with pytest.raises(BadInputError, match=r"policies\.power: unknown method 'magic'"):
        parse_scenario(text, source="bad.yaml")


def test_broken_yaml_names_the_line() -> None:
    with pytest.raises(BadInputError, match=r"bad.yaml:\d+: not valid YAML"):
        parse_scenario("name: t\npools:\n  - [unclosed\n", source="bad.yaml")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="cannot read scenario"):
        load_scenario(tmp_path / "nope.yaml")


def test_trace_load_replays_the_azure_file(tmp_path: Path, data_dir: Path) -> None:
    from wattplane.simulate.load import generate_load

    trace = data_dir / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"
    if not trace.exists():
        pytest.skip(f"{trace} missing (Azure/AzurePublicDataset AzureLLMInferenceTrace_conv.csv)")
    text = GOOD.replace("  synthetic: {requests_per_s: 3}", f"  trace: {{path: {trace}, rate_scale: 2.0}}")
    sc = parse_scenario(text.replace("duration_s: 60", "duration_s: 600"))
    load = generate_load(sc, seed=0)
    # the first 600 s of the trace hold ~5.5 req/s; two offset copies double it
    assert load.requests.sum() / 600 == pytest.approx(2 * 5.53, rel=0.25)
    same = generate_load(sc, seed=0)
    assert (same.requests == load.requests).all()
