"""The CRDs are generated from the pydantic models, are structural, and carry the cross-field CEL rules."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from controller.api import crdgen
from controller.api.models import RESOURCES


def _crds() -> dict[str, dict[str, Any]]:
    return {name: yaml.safe_load(text) for name, text in crdgen.generate().items()}


def test_committed_crds_are_not_stale() -> None:
    stale = crdgen.stale(crdgen.DEFAULT_OUT)
    assert not stale, f"regenerate with `wattplane crds` (or make crds): stale {stale}"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for k in ("properties",):
            for name, child in (node.get(k) or {}).items():
                out.extend(_walk(child, f"{path}.{name}"))
        if isinstance(node.get("items"), dict):
            out.extend(_walk(node["items"], f"{path}[]"))
        if isinstance(node.get("additionalProperties"), dict):
            out.extend(_walk(node["additionalProperties"], f"{path}{{}}"))
    return out


@pytest.mark.parametrize("name", sorted(crdgen.generate()))
def test_schema_is_structural(name: str) -> None:
    crd = _crds()[name]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "$defs" not in node, path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"untyped node at {path}"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_every_resource_has_status_subresource_columns_and_short_names() -> None:
    crds = _crds()
    assert len(crds) == len(RESOURCES) == 4
    for crd in crds.values():
        v = crd["spec"]["versions"][0]
        assert v["subresources"] == {"status": {}}
        assert v["additionalPrinterColumns"][-1]["name"] == "Age"
        assert crd["spec"]["names"]["shortNames"]
        assert crd["spec"]["group"] == "wattplane.io" and v["name"] == "v1alpha1"
    scopes = {c["spec"]["names"]["kind"]: c["spec"]["scope"] for c in crds.values()}
    assert scopes == {"AcceleratorPool": "Cluster", "PowerDomain": "Cluster", "ModelDeployment": "Namespaced",
                      "FleetPolicy": "Cluster"}


def _rules(crd: dict[str, Any]) -> list[str]:
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return [r["rule"] for _, node in _walk(schema) for r in node.get("x-kubernetes-validations", [])]


def test_cross_field_rules_are_cel() -> None:
    md = _rules(_crds()["wattplane.io_modeldeployments.yaml"])
    assert "self.minReplicas <= self.maxReplicas" in md
    assert any("fallback.deployment != self.metadata.name" in r for r in md)
    assert any("moeElasticity.minEp" in r and "parallelism.ep" in r for r in md)
    assert "self.minEp <= self.maxEp" in md
    assert any("self.metadata.name == 'default'" in r for r in _rules(_crds()["wattplane.io_fleetpolicies.yaml"]))
    assert "self.minPowerW <= self.maxPowerW" in _rules(_crds()["wattplane.io_acceleratorpools.yaml"])


def test_check_mode_reports_stale_files(tmp_path: Any) -> None:
    crdgen.write(tmp_path)
    assert crdgen.stale(tmp_path) == []
    victim = tmp_path / "wattplane.io_modeldeployments.yaml"
    victim.write_text(victim.read_text().replace("minReplicas", "minReplica"))
    assert crdgen.stale(tmp_path) == ["wattplane.io_modeldeployments.yaml"]
