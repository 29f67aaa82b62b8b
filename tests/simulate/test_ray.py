"""``wattplane simulate --ray``: policy sets as Ray tasks give the same results as in-process runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wattplane.simulate.command import simulate, simulate_on_ray

from .conftest import make_scenario

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_tasks_match_local_runs(ray_local: None) -> None:
    sc = make_scenario(duration_s=70, policies={"rescheduling": "off", "placement": "off"})
    remote = simulate_on_ray(sc, seed=4, address="local", compare="baselines")
    local = simulate(sc, seed=4, compare="baselines")
    assert [r.policy_set for r in remote] == [r.policy_set for r in local] == ["wattplane", "baselines", "static"]
    timing = {"solver_ms_p99", "solver_ms_p50", "snapshot_ms_p99"}
    for a, b in zip(remote, local, strict=True):
        assert {k: v for k, v in a.metrics.items() if k not in timing} == \
               {k: v for k, v in b.metrics.items() if k not in timing}
