"""The API models parse the examples, mirror the CEL rules in Python, and convert to the domain model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from controller.api import convert
from controller.api import models as api
from tests.controller.helpers import md_obj, pool_obj

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KINDS = {"AcceleratorPool": api.AcceleratorPool, "PowerDomain": api.PowerDomain,
         "ModelDeployment": api.ModelDeployment, "FleetPolicy": api.FleetPolicy}


def _example_docs() -> list[dict]:  # type: ignore[type-arg]
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") in KINDS]
    return docs


def test_examples_parse_and_cover_the_mixed_fleet() -> None:
    docs = _example_docs()
    parsed = [KINDS[d["kind"]].model_validate(d) for d in docs]
    pools = {p.metadata["name"]: p for p in parsed if isinstance(p, api.AcceleratorPool)}
    assert {p.spec.accelerator.model for p in pools.values()} == {"H100-80GB", "A100-80GB", "L4"}
    mds = {m.metadata["name"]: m for m in parsed if isinstance(m, api.ModelDeployment)}
    assert any(m.spec.model.moe is not None for m in mds.values())
    assert any(m.spec.model.moe is None and m.spec.fallback is not None for m in mds.values())
    fallbacks = {m.spec.fallback.deployment for m in mds.values() if m.spec.fallback}
    assert fallbacks <= set(mds)


def test_wire_names_are_camel_case_and_round_trip() -> None:
    md = api.ModelDeployment.model_validate(md_obj(minReplicas=1, maxReplicas=3))
    wire = md.model_dump(by_alias=True, exclude_none=True)
    assert wire["spec"]["minReplicas"] == 1 and "min_replicas" not in wire["spec"]
    assert wire["spec"]["model"]["paramsB"] == 70
    assert api.ModelDeployment.model_validate(wire) == md


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"minReplicas": 5, "maxReplicas": 2}, "minReplicas must be <= maxReplicas"),
        ({"moeElasticity": {"minEp": 4, "maxEp": 8}}, "needs an MoE model"),
        ({"model": {"moe": {"moeLayers": 2, "experts": 8, "topK": 2, "bytesPerExpert": 1}},
          "parallelism": {"ep": 16}, "moeElasticity": {"minEp": 4, "maxEp": 8}}, "within moeElasticity"),
    ],
)
def test_python_validation_mirrors_cel(override: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError, match=message):
        api.ModelDeployment.model_validate(md_obj(**override))


def test_fallback_to_itself_is_rejected() -> None:
    with pytest.raises(ValidationError, match="must name another"):
        api.ModelDeployment.model_validate(md_obj(name="a", fallback={"deployment": "a"}))


def test_conversion_to_domain_model() -> None:
    md = api.ModelDeployment.model_validate(
        md_obj(name="big", ns="team", parallelism={"tp": 8, "pp": 2}, fallback={"deployment": "small"},
               allowedPools=["h100"], priority="latency-critical"))
    d = convert.to_deployment(md)
    assert d.name == "team/big" and d.fallback is not None and d.fallback.deployment == "team/small"
    assert d.parallelism.devices == 16 and d.allowed_pools == ("h100",)
    assert d.priority.value == "latency-critical"
    p = convert.to_pool(api.AcceleratorPool.model_validate(pool_obj("l4", gpus=4)))
    assert p.gpus_per_node == 4 and p.accelerator.tdp_w == 700


@pytest.mark.parametrize(("text", "milli"), [("96", 96000), ("500m", 500), ("1.5", 1500)])
def test_cpu_quantities(text: str, milli: int) -> None:
    assert convert.parse_cpu_milli(text) == milli


@pytest.mark.parametrize(("text", "mib"), [("1Ti", 1024 * 1024), ("64Gi", 65536), ("1G", 953)])
def test_memory_quantities(text: str, mib: int) -> None:
    assert convert.parse_memory_mib(text) == mib
