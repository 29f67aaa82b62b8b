"""Power and clock limits in force on each device, from three layers, and command application.

The controller's caps, the fail-safe caps and the local guard's caps are kept apart; the device
gets the minimum of the layers (the most protective wins), so clearing one layer never lifts
another. Controller commands are checked against the device's legal range and refused whole,
with nothing changed, when any target is outside it; the guard and fail-safe clamp into range
themselves. Command ids are remembered so an at-least-once re-delivery is answered, not re-applied.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

from agents.sources import DeviceInfo, GPUSource, SourceError
from protos.wattplane.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

MIN_REPORT_INTERVAL_S = 0.1
MAX_REPORT_INTERVAL_S = 300.0
MAX_NODE_SHARE_W = 1_000_000.0
REMEMBERED_COMMANDS = 4096


class Limits:
    """Per-device limit layers and the device writes that keep them in force."""

    def __init__(self, source: GPUSource) -> None:
        self.source = source
        self.devices: Sequence[DeviceInfo] = source.devices()
        n = len(self.devices)
        self.controller_w: list[float | None] = [None] * n
        self.controller_clock_mhz: list[float | None] = [None] * n
        self.guard_w: list[float | None] = [None] * n
        self.failsafe_w: list[float | None] = [None] * n
        self._applied_w: list[float | None] = [None] * n  # what we last wrote to the device
        self._applied_clock: list[float | None] = [None] * n

    def effective_w(self, i: int) -> float:
        dev = self.devices[i]
        caps = [c for c in (self.controller_w[i], self.guard_w[i], self.failsafe_w[i]) if c is not None]
        return clamp(min(caps) if caps else dev.max_power_w, dev.min_power_w, dev.max_power_w)

    def sync(self) -> None:
        """Write the effective limits to devices whose limit changed."""
        for dev in self.devices:
            i = dev.index
            target = self.effective_w(i)
            if self._applied_w[i] is None or abs(target - (self._applied_w[i] or 0.0)) > 0.5:
                self.source.set_power_limit(i, target)
                self._applied_w[i] = target
            clock = self.controller_clock_mhz[i]
            if clock != self._applied_clock[i]:
                self.source.set_clock_limit(i, clock)
                self._applied_clock[i] = clock


def clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


class CommandApplier:
    """Applies controller commands to :class:`Limits`; answers each command id once."""

    def __init__(self, limits: Limits, on_node_share: Callable[[pb.SetNodeShare], None] | None = None) -> None:
        self.limits = limits
        self.report_interval_s: float | None = None  # set by SetReportInterval
        self._on_node_share = on_node_share
        self._done: OrderedDict[str, pb.CommandResult] = OrderedDict()

    def apply(self, cmd: pb.Command) -> pb.CommandResult:
        if cmd.id and cmd.id in self._done:
            return self._done[cmd.id]
        result = self._apply(cmd)
        result.command_id = cmd.id
        if cmd.id:
            self._done[cmd.id] = result
            while len(self._done) > REMEMBERED_COMMANDS:
                self._done.popitem(last=False)
        return result

    def _targets(self, indices: Sequence[int]) -> list[int] | None:
        all_idx = [d.index for d in self.limits.devices]
        if not indices:
            return all_idx
        return list(indices) if all(i in all_idx for i in indices) else None

    def _apply(self, cmd: pb.Command) -> pb.CommandResult:
        kind = cmd.WhichOneof("action")
        lim = self.limits
        if kind == "set_power_limit":
            a = cmd.set_power_limit
            targets = self._targets(a.gpu_indices)
            if targets is None:
                return _result(pb.COMMAND_STATUS_OUT_OF_RANGE, f"unknown gpu index in {list(a.gpu_indices)}")
            bad = [i for i in targets if not lim.devices[i].min_power_w <= a.watts <= lim.devices[i].max_power_w]
            if bad:
                d = lim.devices[bad[0]]
                return _result(
                    pb.COMMAND_STATUS_OUT_OF_RANGE,
                    f"{a.watts} W outside [{d.min_power_w}, {d.max_power_w}] of gpu {bad}",
                )
            for i in targets:
                lim.controller_w[i] = a.watts
            return self._sync(targets)
        if kind == "set_clock_limit":
            c = cmd.set_clock_limit
            targets = self._targets(c.gpu_indices)
            if targets is None:
                return _result(pb.COMMAND_STATUS_OUT_OF_RANGE, f"unknown gpu index in {list(c.gpu_indices)}")
            bad = [
                i
                for i in targets
                if not lim.devices[i].min_clock_mhz <= c.max_sm_clock_mhz <= lim.devices[i].max_clock_mhz
            ]
            if bad:
                d = lim.devices[bad[0]]
                return _result(
                    pb.COMMAND_STATUS_OUT_OF_RANGE,
                    f"{c.max_sm_clock_mhz} MHz outside [{d.min_clock_mhz}, {d.max_clock_mhz}] of gpu {bad}",
                )
            for i in targets:
                lim.controller_clock_mhz[i] = c.max_sm_clock_mhz
            return self._sync(targets)
        if kind == "clear_limits":
            targets = self._targets(cmd.clear_limits.gpu_indices)
            if targets is None:
                return _result(
                    pb.COMMAND_STATUS_OUT_OF_RANGE, f"unknown gpu index in {list(cmd.clear_limits.gpu_indices)}"
                )
            for i in targets:
                lim.controller_w[i] = None
                lim.controller_clock_mhz[i] = None
            return self._sync(targets)
        if kind == "set_report_interval":
            s = cmd.set_report_interval.seconds
            if not MIN_REPORT_INTERVAL_S <= s <= MAX_REPORT_INTERVAL_S:
                return _result(
                    pb.COMMAND_STATUS_OUT_OF_RANGE, f"{s} s outside [{MIN_REPORT_INTERVAL_S}, {MAX_REPORT_INTERVAL_S}]"
                )
            self.report_interval_s = s
            return _result(pb.COMMAND_STATUS_APPLIED, f"report interval {s} s")
        if kind == "set_node_share" and self._on_node_share is not None:
            w = cmd.set_node_share.watts
            if not 0.0 <= w <= MAX_NODE_SHARE_W:
                return _result(pb.COMMAND_STATUS_OUT_OF_RANGE, f"node share {w} W outside [0, {MAX_NODE_SHARE_W}]")
            self._on_node_share(cmd.set_node_share)
            floor = sum(d.min_power_w for d in lim.devices)
            note = (
                f"; below the node's minimum {floor} W: the guard can only hold devices at their minimum"
                if 0 < w < floor
                else ""
            )
            return _result(pb.COMMAND_STATUS_APPLIED, f"node share {w} W{note}")
        return _result(pb.COMMAND_STATUS_UNSUPPORTED, f"unknown command {kind!r}")

    def _sync(self, targets: list[int]) -> pb.CommandResult:
        try:
            self.limits.sync()
        except SourceError as exc:
            log.warning("applying limits failed: %s", exc)
            return _result(pb.COMMAND_STATUS_FAILED, str(exc))
        return _result(pb.COMMAND_STATUS_APPLIED, "applied", [self.limits.effective_w(i) for i in targets])


def _result(status: pb.CommandStatus.ValueType, message: str, applied: list[float] | None = None) -> pb.CommandResult:
    return pb.CommandResult(status=status, message=message, applied_w=applied or [])
