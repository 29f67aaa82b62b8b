"""The routing shares in force are re-pushed within the router's TTL even when the plan is unchanged.

The router drops a table it has not heard of for ``DEFAULT_TTL_S`` (a silent controller must not keep
traffic on a fallback); a controller that pushed only on plan changes let a settled share expire, and
the router sent everything back to the large model (measured by `wattplane simulate --cluster`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from controller.dataplane.table import DEFAULT_TTL_S
from controller.reconciler import controller as ctl
from policies.plan import Explanation, Plan, PolicyName, Reason, SetRoutingShare


class RecordingRouter:
    def __init__(self, fail: bool = False) -> None:
        self.pushed: list[SetRoutingShare] = []
        self.fail = fail

    def set_routing_share(self, action: SetRoutingShare) -> None:
        if self.fail:
            raise ConnectionError("router down")
        self.pushed.append(action)


def routing_plan(share: float = 0.4) -> Plan:
    action = SetRoutingShare(deployment="ns/big", fallback="ns/small", fallback_share=share, threshold=0.5,
                             version=3)
    return Plan(policy=PolicyName.ROUTING, actions=(action,),
                explanation=Explanation(reason=Reason.CAPACITY_PRESSURE, summary="shift"))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(ctl.time, "monotonic", lambda: now[0])
    return now


def controller(router: RecordingRouter, dry_run: bool = False) -> ctl.Controller:
    return ctl.Controller(SimpleNamespace(on_request=None), router=router, dry_run=dry_run)  # type: ignore[arg-type]


def test_shares_are_re_pushed_within_the_ttl(clock: list[float]) -> None:
    router = RecordingRouter()
    c = controller(router)
    plans = [routing_plan()]
    assert c._refresh_routing(plans) == ctl.ROUTING_REFRESH_S  # never pushed: push now
    assert len(router.pushed) == 1
    clock[0] += 4.0
    wait = c._refresh_routing(plans)
    assert wait is not None and 0 < wait <= ctl.ROUTING_REFRESH_S - 4.0 + 1e-9 and len(router.pushed) == 1
    clock[0] += wait
    c._refresh_routing(plans)
    assert len(router.pushed) == 2 and router.pushed[-1] == plans[0].actions[0]
    assert ctl.ROUTING_REFRESH_S < DEFAULT_TTL_S  # every push lands before the previous one expires


def test_no_routing_action_no_push_and_no_requeue(clock: list[float]) -> None:
    router = RecordingRouter()
    c = controller(router)
    assert c._refresh_routing([]) is None and router.pushed == []


def test_dry_run_and_a_down_router_push_nothing_but_keep_looking(clock: list[float]) -> None:
    dry = RecordingRouter()
    assert controller(dry, dry_run=True)._refresh_routing([routing_plan()]) == ctl.ROUTING_REFRESH_S
    assert dry.pushed == []
    down = controller(RecordingRouter(fail=True))
    assert down._refresh_routing([routing_plan()]) == ctl.ROUTING_REFRESH_S  # logged, retried next period
