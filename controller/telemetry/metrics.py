"""Prometheus view of the hub, computed at scrape time.

Gauges are not updated per report (80,000 GPUs at 1 Hz would make metric updates the hub's main
cost); a custom collector reads the latest state when Prometheus scrapes. Domain power sums the
fresh nodes of each power domain; stale nodes are exported with ``wattplane_node_stale 1`` and
left out of domain sums.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from controller.telemetry.hub import TelemetryHub


class HubCollector(Collector):
    def __init__(self, hub: TelemetryHub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        now = hub.now()
        gpu_power = GaugeMetricFamily("wattplane_gpu_power_watts", "GPU power draw", labels=["node", "gpu"])
        gpu_limit = GaugeMetricFamily(
            "wattplane_gpu_power_limit_watts", "GPU power limit in force", labels=["node", "gpu"]
        )
        gpu_util = GaugeMetricFamily("wattplane_gpu_utilisation_ratio", "GPU utilisation", labels=["node", "gpu"])
        node_power = GaugeMetricFamily("wattplane_node_power_watts", "node GPU power", labels=["node", "domain"])
        stale = GaugeMetricFamily("wattplane_node_stale", "1 when the node missed its reports", labels=["node"])
        domain_power = GaugeMetricFamily(
            "wattplane_domain_power_watts", "fresh GPU power per domain", labels=["domain"]
        )
        domains: dict[str, float] = defaultdict(float)
        for name, state in hub.nodes.items():
            is_stale = state.marked_stale or state.stale(now, hub.config.stale_after_s)
            stale.add_metric([name], 1.0 if is_stale else 0.0)
            report = state.last_report
            if report is None:
                continue
            domain = state.power_domain or ""
            total = 0.0
            for g in report.gpus:
                idx = str(g.index)
                gpu_power.add_metric([name, idx], g.power_w)
                gpu_limit.add_metric([name, idx], g.power_limit_w)
                gpu_util.add_metric([name, idx], g.utilisation)
                total += g.power_w
            node_power.add_metric([name, domain], total)
            if not is_stale and domain:
                domains[domain] += total
        for domain, watts in sorted(domains.items()):
            domain_power.add_metric([domain], watts)
        yield from (gpu_power, gpu_limit, gpu_util, node_power, stale, domain_power)

        reports = CounterMetricFamily("wattplane_telemetry_reports", "reports accepted")
        reports.add_metric([], hub.reports_total)
        yield reports
        rejected = CounterMetricFamily("wattplane_telemetry_rejected", "agent messages rejected", labels=["reason"])
        for reason, count in sorted(hub.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        marked = CounterMetricFamily("wattplane_telemetry_stale_marked", "nodes the stale sweep found newly stale")
        marked.add_metric([], hub.stale_marked)
        yield marked
        connected = GaugeMetricFamily("wattplane_telemetry_connected_agents", "agents with an open stream")
        connected.add_metric([], hub.connected_agents())
        yield connected
        pending = GaugeMetricFamily("wattplane_telemetry_commands_pending", "commands without a result yet")
        pending.add_metric([], len(hub.pending_commands()))
        yield pending


def register(hub: TelemetryHub, registry: CollectorRegistry) -> HubCollector:
    collector = HubCollector(hub)
    registry.register(collector)
    return collector
