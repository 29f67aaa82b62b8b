"""Fuzzed snapshot and plan files: any input either loads or raises BadInputError — never a crash.

Mutations start from valid documents (so the fuzzer reaches deep fields) and replace, delete or
retype values anywhere in the tree; raw byte strings cover the parser itself. Inputs tried per run:
400 + 400 mutated documents and 300 byte strings (`--hypothesis-show-statistics` prints them).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.plan import Explanation, Plan, PolicyName, Reason, SetPowerCap, SetReplicas
from policies.snapshot import BadInputError, Snapshot
from tests.policies.test_snapshot import make_snapshot

VALID_SNAPSHOT: dict[str, Any] = json.loads(make_snapshot().to_json())
VALID_PLAN: dict[str, Any] = json.loads(
    Plan(
        policy=PolicyName.POWER,
        actions=(SetPowerCap(node="n0", gpu=0, power_limit_w=400.0),
                 SetReplicas(deployment="ns/llama", pool="h100", replicas=3, previous=2)),
        explanation=Explanation(reason=Reason.OVER_BUDGET, summary="cap", objective=1.0),
    ).to_json()
)

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> str:
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(json_value)
    return json.dumps(doc, allow_nan=True)


def _load_or_reject(loader: Any, text: str | bytes) -> None:
    try:
        loader(text, source="fuzz")
    except BadInputError as exc:
        assert str(exc).startswith("fuzz: ") and len(str(exc)) < 4000


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(VALID_SNAPSHOT))
def test_mutated_snapshots_load_or_are_rejected_clearly(text: str) -> None:
    _load_or_reject(Snapshot.from_json, text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(VALID_PLAN))
def test_mutated_plans_load_or_are_rejected_clearly(text: str) -> None:
    _load_or_reject(Plan.from_json, text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_are_rejected_clearly(data: bytes) -> None:
    _load_or_reject(Snapshot.from_json, data)
    _load_or_reject(Plan.from_json, data)
