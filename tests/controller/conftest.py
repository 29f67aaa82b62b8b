"""Fixtures shared by the controller's cluster tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client

from wattplane.testcluster import TestCluster


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture
def other_team(test_cluster: TestCluster, uid: str) -> Iterator[str]:
    """Another team's namespace, deleted afterwards (its pods must not hold later tests' GPUs)."""
    ns = test_cluster.create_namespace(f"other-{uid}")
    yield ns
    client.CoreV1Api(test_cluster.api_client()).delete_namespace(ns)
