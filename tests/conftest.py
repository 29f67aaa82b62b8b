"""Shared fixtures. The cluster fixture starts a real control plane once per test session.

A test that needs the cluster fails loudly when it cannot start (no silent skip): a red test
with the component's log tail is the honest outcome.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.kube import Kube
from wattplane.datasets import default_data_dir
from wattplane.testcluster import TestCluster


@pytest.fixture(scope="session")
def test_cluster() -> Iterator[TestCluster]:
    cluster = TestCluster.start(die_with_parent=True)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def kube(test_cluster: TestCluster) -> Kube:
    """A client of the test cluster with Wattplane's CRDs installed (again per module: a test may remove them)."""
    from tests.controller.cluster_helpers import install_crds

    k = Kube(test_cluster.api_client())
    install_crds(k, test_cluster.kubectl)
    return k


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-trace directory; under CI a missing one is a failure, elsewhere a skip naming the source."""
    path = default_data_dir()
    if path is None or not path.is_dir():
        msg = "../shared/data not found (set WATTPLANE_DATA); see ../shared/data/README.md for the sources"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
