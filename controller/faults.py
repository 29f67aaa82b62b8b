"""Test-only fault injection: named points where the chaos tests SIGKILL the controller.

Why: "the controller crashed half-way through a plan" must be reproducible at the exact step a
test names (after the first of several applies, mid-eviction, mid power-cap), not only at a random
time. Production never sets the variable, and an unarmed point costs one dict lookup.

``WATTPLANE_FAULT_POINTS`` arms points, comma-separated:

- ``executor.after_apply=3``: SIGKILL on the 3rd time the point is reached;
- ``executor.after_apply@0.2``: SIGKILL each time with probability 0.2 (seeded by
  ``WATTPLANE_FAULT_SEED``, default 0, so a run is repeatable).

Before dying the process appends ``<point> <hit>`` to ``WATTPLANE_FAULT_LOG`` (when set), so the
test knows where the kill landed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import dataclass

ENV_POINTS = "WATTPLANE_FAULT_POINTS"
ENV_SEED = "WATTPLANE_FAULT_SEED"
ENV_LOG = "WATTPLANE_FAULT_LOG"

# The points the controller reaches; tests arm them by these names.
POINTS = (
    "executor.after_apply",  # after each server-side apply of a workload object
    "executor.after_delete",  # after each delete of a workload object
    "executor.after_cap",  # after each power-cap command handed to the agents
    "migration.after_evict",  # after each eviction of a migration
    "reconcile.before_status",  # a pass wrote its objects but not yet its status
)


class FaultSpecError(ValueError):
    """``WATTPLANE_FAULT_POINTS`` names an unknown point or has a malformed trigger."""


@dataclass
class _Armed:
    at_hit: int | None  # die on exactly this hit
    probability: float  # or die on any hit with this probability
    hits: int = 0


def parse(spec: str) -> dict[str, _Armed]:
    armed: dict[str, _Armed] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            name, _, count = part.partition("=")
            trigger = _Armed(at_hit=int(count), probability=0.0)
        elif "@" in part:
            name, _, prob = part.partition("@")
            trigger = _Armed(at_hit=None, probability=float(prob))
        else:
            raise FaultSpecError(f"{part!r}: use NAME=COUNT or NAME@PROBABILITY")
        if name not in POINTS:
            raise FaultSpecError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
        armed[name] = trigger
    return armed


_armed = parse(os.environ.get(ENV_POINTS, ""))
_rng = random.Random(int(os.environ.get(ENV_SEED, "0")))
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """SIGKILL this process here if the point is armed and its trigger fires; otherwise nothing."""
    trigger = _armed.get(name)
    if trigger is None:
        return
    with _lock:
        trigger.hits += 1
        fire = trigger.hits == trigger.at_hit if trigger.at_hit is not None else _rng.random() < trigger.probability
        if not fire:
            return
        path = os.environ.get(ENV_LOG)
        if path:
            with open(path, "a") as fh:
                fh.write(f"{name} {trigger.hits}\n")
        os.kill(os.getpid(), signal.SIGKILL)
