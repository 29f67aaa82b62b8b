"""The controller's Prometheus metrics and its ``/metrics``, ``/healthz`` and ``/readyz`` endpoints.

One registry per controller instance (not the global default), so tests can run several
controllers in one process and read exact values.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total etc., for the benchmark
        self.reconciles = Counter("wattplane_reconcile_total", "Reconcile passes", ["kind", "result"], registry=r)
        self.reconcile_seconds = Histogram(
            "wattplane_reconcile_duration_seconds", "Duration of one reconcile pass", ["kind"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.reconcile_errors = Counter("wattplane_reconcile_errors_total", "Reconcile errors by type",
                                        ["kind", "error"], registry=r)
        self.queue_depth = Gauge("wattplane_workqueue_depth", "Keys waiting in the work queue", registry=r)
        self.solver_seconds = Histogram("wattplane_solver_duration_seconds", "Policy solve time", ["policy"],
                                        registry=r, buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30))
        self.solver_status = Counter("wattplane_solver_status_total", "Policy runs by solver status",
                                     ["policy", "status"], registry=r)
        self.replicas = Gauge("wattplane_replicas", "Desired replicas per model and pool",
                              ["namespace", "deployment", "pool"], registry=r)
        self.api_requests = Counter("wattplane_api_requests_total", "Requests to the API server", ["verb"],
                                    registry=r)
        self.is_leader = Gauge("wattplane_leader", "1 while this instance holds the lease", registry=r)
        self.writes = Counter("wattplane_executor_writes_total", "Executor writes", ["op", "kind"], registry=r)

    def forget_deployment(self, namespace: str, deployment: str) -> None:
        """Drop a deleted ModelDeployment's series: a label set nobody sets again would be exported forever."""
        for metric in self.replicas.collect():
            for sample in metric.samples:
                labels = sample.labels
                if labels.get("namespace") == namespace and labels.get("deployment") == deployment:
                    with contextlib.suppress(KeyError):  # removed meanwhile by another worker
                        self.replicas.remove(namespace, deployment, labels["pool"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """Serves /metrics, /healthz (the process is alive) and /readyz (``ready()`` says so)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool], host: str = "127.0.0.1", port: int = 8080) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif self.path.startswith("/healthz"):
                    self._send(200, b"ok\n")
                elif self.path.startswith("/readyz"):
                    ok = outer.ready()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"not ready\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.metrics = metrics
        self.ready = ready
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
