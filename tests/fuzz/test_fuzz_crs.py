"""Fuzzed ModelDeployment specs through the real API server's validation (OpenAPI + CEL) and the
controller's own model: every spec is either stored or refused with a clear 422 — no 500, no hang —
and a spec the API server stores is one the controller's model accepts (or names why not).

Mutations start from a valid spec (so CEL rules are reached) and change 1-3 fields to random
values of random types; 150 specs are tried per run.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from controller.api.models import ModelDeployment
from controller.kube import Kube, KubeError
from tests.controller.cluster_helpers import install_crds, md_body
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster

FIELDS = [("minReplicas",), ("maxReplicas",), ("priority",), ("parallelism", "tp"), ("parallelism", "ep"),
          ("model", "paramsB"), ("model", "activeParamsB"), ("allowedPools",), ("fallback",),
          ("moeElasticity",), ("slo", "ttftP99Ms"), ("engine",), ("model",)]
values = st.one_of(st.none(), st.booleans(), st.integers(-5, 100_000), st.floats(-1e6, 1e6, allow_nan=False),
                   st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3),
                   st.fixed_dictionaries({"deployment": st.text(min_size=1, max_size=8)}),
                   st.fixed_dictionaries({"minEp": st.integers(0, 64), "maxEp": st.integers(0, 64)}))


@pytest.fixture(scope="module")
def api(test_cluster: TestCluster) -> tuple[Kube, str]:
    kube = Kube(test_cluster.api_client())
    install_crds(kube, test_cluster.kubectl)
    ns = test_cluster.create_namespace(f"fuzz-{uuid.uuid4().hex[:6]}")
    return kube, ns


def _mutate(spec: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target = spec
    for key in path[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[path[-1]] = value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3))
def test_specs_are_stored_or_refused_clearly(api: tuple[Kube, str], edits: list[tuple[tuple[str, ...], Any]]) -> None:
    kube, ns = api
    body = md_body(f"f-{uuid.uuid4().hex[:8]}", ns, "pool-a")
    for path, value in edits:
        _mutate(body["spec"], path, value)
    try:
        stored = kube.create("ModelDeployment", json.loads(json.dumps(body)), ns)
    except KubeError as exc:
        assert exc.status in (400, 422), f"{exc.status}: {exc}"  # refused by schema/CEL, never a 5xx
        assert exc.message.strip()
        event(f"refused {exc.status}")
        return
    event("stored")
    try:
        ModelDeployment.model_validate(stored)  # the controller's own checks, on what the server stored
    except ValidationError as exc:
        event("stored, controller marks it bad")
        assert exc.errors(), "a stored spec the controller rejects must say why"
    finally:
        kube.delete("ModelDeployment", stored["metadata"]["name"], ns)
