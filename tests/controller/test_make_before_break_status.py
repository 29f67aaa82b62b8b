"""Status says when old replicas keep serving while their replacements in another pool are not Ready."""

from __future__ import annotations

from controller.api import models as api
from controller.executor.executor import Observed
from controller.reconciler.controller import _keeping
from controller.reconciler.status import KEEPING_OLD_REPLICAS, deployment_status
from tests.controller.helpers import md_obj, pool_obj

POOLS = {p: api.AcceleratorPool.model_validate(pool_obj(p)) for p in ("h100", "l4")}


def progressing(s: api.ModelDeploymentStatus) -> api.Condition:
    return next(c for c in s.conditions if c.type == api.ConditionType.PROGRESSING)


def test_progressing_reason_names_the_wait_and_clears_when_it_ends() -> None:
    md = api.ModelDeployment.model_validate(md_obj(minReplicas=2))
    seen = {"h100": Observed("h100", "Deployment", 2, 2), "l4": Observed("l4", "Deployment", 2, 0)}
    s1 = deployment_status(md, {"l4": 2}, seen, POOLS, None, None, "t1", kept_waiting=2)
    assert progressing(s1).status == "True" and progressing(s1).reason == KEEPING_OLD_REPLICAS
    assert "2 old ready replica(s) kept" in progressing(s1).message
    assert s1.ready_replicas == 2  # the old pool still serves
    assert _keeping(s1) and not _keeping(None)
    done = {"l4": Observed("l4", "Deployment", 2, 2)}
    s2 = deployment_status(md.model_copy(update={"status": s1}), {"l4": 2}, done, POOLS, None, None, "t2")
    assert (progressing(s2).status, progressing(s2).reason) == ("False", "Converged")
    assert not _keeping(s2)
