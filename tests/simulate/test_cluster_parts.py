"""The pieces of ``simulate --cluster`` that need no cluster: CR rendering, the live serving model, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from controller.api import convert
from controller.api import models as api
from policies.snapshot import BadInputError
from tests.simulate.conftest import SMALL, make_scenario
from wattplane.cli import main
from wattplane.simulate.crs import deployment_object, fleet_policy_spec, pool_object, power_domain_object
from wattplane.simulate.live import LiveFleet, PodView
from wattplane.simulate.load import generate_load


def test_rendered_objects_are_the_scenarios_fleet_through_the_controllers_models() -> None:
    sc = make_scenario()
    for d in sc.deployments:
        obj = deployment_object(d, "ns1", "run1")
        md = api.ModelDeployment.model_validate(obj)  # the controller's reading of what we apply
        back = convert.to_deployment(md)
        want = d.domain()
        assert back.name == f"ns1/{d.name}"
        assert back.model_dump(exclude={"name", "fallback"}) == want.model_dump(exclude={"name", "fallback"})
        assert (back.fallback.deployment if back.fallback else None) == (
            f"ns1/{want.fallback.deployment}" if want.fallback else None)
    for p in sc.pools:
        pool = convert.to_pool(api.AcceleratorPool.model_validate(pool_object(p, "run1")))
        assert (pool.name, pool.accelerator, pool.gpus_per_node, pool.cost_per_device_hour, pool.power_domain) == (
            p.name, p.accelerator, p.gpus_per_node, p.cost_per_device_hour, p.power_domain)
    dom = api.PowerDomain.model_validate(power_domain_object(sc.power_domains[0], "run1"))
    assert dom.spec.budget_w == sc.power_domains[0].budget_w
    spec = api.FleetPolicySpec.model_validate(fleet_policy_spec(sc, 7.5))
    assert spec.reconcile_period_s == 7.5 and spec.policies.placement and spec.policies.power
    assert spec.disruption.max_migrations_per_cycle == 3  # the scenario's rescheduling mnl


def test_baselines_cannot_be_expressed_in_a_fleet_policy(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    sc = make_scenario(policies={"power": "polca"})
    with pytest.raises(BadInputError, match=r"policies\.power: 'polca' is a baseline"):
        fleet_policy_spec(sc, 30)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "policies": {"power": "polca"}}))
    # refused before anything touches a cluster (the kubeconfig does not even exist)
    assert main(["simulate", str(path), "--cluster", str(tmp_path / "no-kubeconfig")]) == 2
    assert "is a baseline" in capsys.readouterr().err
    assert main(["simulate", str(path), "--cluster", "k", "--compare", "baselines"]) == 2


def _pods(n_big: int, n_small: int) -> list[PodView]:
    pods = [PodView(f"big-{i}", f"h100-{i // 2:04d}", 0, 0, 4, True) for i in range(n_big)]
    pods += [PodView(f"small-{i}", "a100-0000", 1, 1, 1, True) for i in range(n_small)]
    return pods


NODES = {"h100-0000": 0, "h100-0001": 0, "a100-0000": 1, "a100-0001": 1}


def _run(pods: list[PodView], caps_w: float | None = None, shares: dict[int, float] | None = None) -> LiveFleet:
    sc = make_scenario()
    fleet = LiveFleet(sc, generate_load(sc, 3), "ns")
    limits = [caps_w or 700.0] * 8
    for t in range(0, 120, 5):
        fleet.step(float(t), float(t + 5), pods, NODES, lambda _n: limits, shares or {})
    return fleet


def _slo(fleet: LiveFleet, dep: int) -> float:
    req, met = np.array(fleet.series.requests), np.array(fleet.series.met)
    return float(met[:, dep].sum() / req[:, dep].sum())


def test_running_replicas_and_caps_set_the_capacity_the_load_meets() -> None:
    one, four = _run(_pods(1, 1)), _run(_pods(4, 1))
    assert _slo(four, 0) > _slo(one, 0)  # more Running replicas of the big model: more of its load in SLO
    served_uncapped = np.array(four.series.served)[:, 0].sum()
    capped = _run(_pods(4, 1), caps_w=250.0)  # the agents' devices hold 250 W: slower replicas
    assert np.array(capped.series.served)[:, 0].sum() <= served_uncapped
    assert np.array(capped.series.ttft)[:, 0].mean() > np.array(four.series.ttft)[:, 0].mean()
    # the GPUs of Running pods get the load; the agents' devices see it, idle ones see none
    assert four.gpu_load("h100-0000", 0)[1] > 0 and four.gpu_load("a100-0001", 0) == (0.0, 0.0)
    samples = four.replica_samples("h100-0000")
    assert [s.deployment for s in samples] == ["ns/big"] and samples[0].requests_per_s > 0


def test_the_routers_share_moves_load_to_the_fallback() -> None:
    plain, routed = _run(_pods(2, 2)), _run(_pods(2, 2), shares={0: 0.5})
    req_plain, req_routed = np.array(plain.series.requests), np.array(routed.series.requests)
    assert req_routed[:, 0].sum() < req_plain[:, 0].sum() and req_routed[:, 1].sum() > req_plain[:, 1].sum()
    assert routed.routed == pytest.approx(0.5 * req_plain[:, 0].sum()) and routed.addressed == plain.addressed
    assert routed.quality_loss > 0 and plain.quality_loss == 0


def test_a_replica_loading_its_weights_holds_gpus_but_serves_nothing() -> None:
    cold = [PodView(p.name, p.node, p.deployment, p.pool, p.gpus, True, warm=p.deployment != 0) for p in _pods(2, 1)]
    fleet = _run(cold)
    assert np.array(fleet.series.served)[:, 0].sum() == 0 and _slo(fleet, 0) == 0.0
    assert fleet.gpu_load("h100-0000", 0) == (0.0, 0.0)  # idle draw while loading
    # its engine still reports the requests queueing for it, so the controller sees the load
    samples = fleet.replica_samples("h100-0000")
    assert [s.deployment for s in samples] == ["ns/big"] and samples[0].requests_per_s > 0
    assert np.array(fleet.series.served)[:, 1].sum() > 0  # the warm 8B serves
