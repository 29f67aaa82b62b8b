"""Controller churn soak: the real controller process on the local test Kubernetes under constant change.

For ``minutes`` a seeded driver keeps changing the cluster at about one operation a second:
ModelDeployments created, scaled (``minReplicas``), edited (engine resources, which re-renders
the workloads), deleted, and bad specs of two kinds — one the API server must refuse (CEL:
``minReplicas > maxReplicas``) and ones only the controller can judge (an allowed pool or a
fallback that does not exist: it must mark them ``Degraded``). Every ``node_every_s`` a kwok GPU
node is added or a previously added one deleted (its pods go with it). The live population is
held near a constant size, so the first and last windows face the same load.

Every ``sample_s`` it samples the controller process: RSS, threads, CPU (``/proc``), open FDs, and
its ``/metrics`` (parsed with ``prometheus_client``'s text parser): the reconcile duration
histogram, the number of exposed series, API requests and errors. Reconcile p50/p99 per window
come from the histogram's bucket deltas (linear within a bucket, as ``histogram_quantile`` does).

After the churn it measures the time until every valid ModelDeployment left is Ready and every
bad one Degraded (``time_to_converge_s``), then deletes them all and counts objects the
controller leaves behind (orphans). Nothing of a valid spec may be lost: ``data_lost`` counts valid
deployments that never converged plus orphans.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from wattplane.soak.probe import cpu_seconds, drift, growth, open_fds, proc_status
from wattplane.testcluster.cluster import stop_process_group

API_VERSION = "wattplane.io/v1alpha1"
MANAGED = "app.kubernetes.io/managed-by=wattplane"
POOLS = (("soak-h100", 8, "H100-80GB", 0.65), ("soak-l4", 4, "L4", 0.35))
RECONCILE = "wattplane_reconcile_duration_seconds"


def _say(msg: str, on: bool) -> None:
    if on:
        sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
        sys.stderr.flush()


def wait_until(pred: Callable[[], Any], timeout_s: float, interval_s: float = 0.5) -> float | None:
    """Seconds until ``pred()`` is truthy, or None after ``timeout_s``."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if pred():
                return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            return None
        time.sleep(interval_s)


class ControllerProc:
    """``wattplane controller`` as its own process, as it runs in a cluster (leader election, hub, /metrics)."""

    def __init__(self, kubeconfig: Path, log: Path, workers: int = 4) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.log = log
        args = [sys.executable, "-m", "wattplane", "controller", "--kubeconfig", str(kubeconfig),
                "--metrics-port", str(self.port), "--lease-name", "soak", "--identity", "soak",
                "--retry-period", "1", "--resync", "30", "--workers", str(workers), "--log-level", "WARNING",
                "--grpc-host", "127.0.0.1", "--grpc-port", "0"]
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self.proc.pid

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process_group(self.proc)

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@dataclass
class MetricsSample:
    buckets: dict[float, float]  # le -> cumulative count, summed over kinds
    by_kind: dict[str, dict[float, float]]  # kind -> le -> cumulative count
    series: int  # samples in the exposition: grows with label sets nobody removes
    values: dict[str, float]  # plain counters/gauges summed over labels
    naming: int = 0  # samples with a label equal to ``naming`` (e.g. a namespace whose objects are all gone)


def parse_metrics(text: str, naming: str | None = None) -> MetricsSample:
    buckets: dict[float, float] = {}
    by_kind: dict[str, dict[float, float]] = {}
    values: dict[str, float] = {}
    series = named = 0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            series += 1
            named += int(naming is not None and naming in s.labels.values())
            if s.name == f"{RECONCILE}_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
                kind = by_kind.setdefault(s.labels.get("kind", ""), {})
                kind[le] = kind.get(le, 0.0) + s.value
            else:
                values[s.name] = values.get(s.name, 0.0) + s.value
    return MetricsSample(buckets, by_kind, series, values, named)


def histogram_quantile(q: float, start: dict[float, float], end: dict[float, float]) -> float:
    """The q-quantile of the observations made between two cumulative bucket snapshots (NaN if none)."""
    les = sorted(end)
    cum = [end[le] - start.get(le, 0.0) for le in les]
    if not cum or cum[-1] <= 0:
        return float("nan")
    rank = q * cum[-1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in zip(les, cum, strict=True):
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return prev_le


@dataclass
class Driver:
    """The churn: a seeded random walk over create/scale/edit/delete/bad-spec and node add/remove."""

    kube: Any
    cluster: Any
    ns: str
    rng: random.Random
    capacity: dict[str, int] = field(default_factory=dict)  # pool -> GPUs on its base nodes
    target: int = 10
    max_extra_nodes: int = 4
    fill: float = 0.6  # never ask for more than this share of a pool's base GPUs (node churn only adds)
    counts: dict[str, int] = field(default_factory=dict)
    live: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> spec we last set (valid ones)
    bad: dict[str, str] = field(default_factory=dict)  # name -> expected Degraded reason
    bad_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_nodes: list[str] = field(default_factory=list)
    seq: int = 0

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _body(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": "ModelDeployment", "metadata": {"name": name, "namespace": self.ns},
                "spec": spec}

    def _spec(self) -> dict[str, Any]:
        pool, gpus = self.rng.choice([(p, g) for p, g, _, _ in POOLS])
        tp = self.rng.choice([t for t in (1, 2, 4) if t <= gpus])
        return {"model": {"name": "m", "paramsB": 8, "activeParamsB": 8},
                "engine": {"modelPath": "org/m", "terminationGraceS": 0, "cpu": "100m", "memory": "128Mi"},
                "parallelism": {"tp": tp, "pp": 1}, "allowedPools": [pool],
                "minReplicas": self.rng.randint(1, 2), "maxReplicas": 4}

    def _demand(self, pool: str) -> int:
        specs = [*self.live.values(), *self.bad_specs.values()]
        return sum(sp["parallelism"]["tp"] * sp["minReplicas"] for sp in specs if sp["allowedPools"] == [pool])

    def _fits(self, pool: str, extra: int) -> bool:
        return self._demand(pool) + extra <= self.fill * self.capacity.get(pool, 0)

    def step(self) -> None:
        from controller.kube import KubeError

        n = len(self.live)
        ops = ["create"] * (3 if n < self.target else 1) + ["delete"] * (3 if n > self.target else 1)
        ops += ["scale"] * 3 + ["edit"] * 2 + ["bad"] * (1 if len(self.bad) < 3 else 0) + ["fix_bad"] * len(self.bad)
        op = self.rng.choice(ops)
        try:
            self._do(op)
        except KubeError as exc:
            self._count(f"error_{exc.status}")

    def _do(self, op: str) -> None:
        from controller.kube import KubeError

        if op == "create" or (op in ("scale", "edit", "delete") and not self.live):
            spec = self._spec()
            if not self._fits(spec["allowedPools"][0], spec["parallelism"]["tp"] * spec["minReplicas"]):
                self._count("skipped_full")
                return
            self.seq += 1
            name = f"md-{self.seq:05d}"
            if self.live and self.rng.random() < 0.3:  # a routed pair: the new one falls back to a live one
                spec["fallback"] = {"deployment": self.rng.choice(sorted(self.live)), "qualityFloor": 0.9}
            self.kube.create("ModelDeployment", self._body(name, spec), self.ns)
            self.live[name] = spec
            self._count("created")
        elif op == "delete":
            name = self.rng.choice(sorted(self.live))
            for other, sp in self.live.items():  # whoever falls back to it stops doing so first
                if (sp.get("fallback") or {}).get("deployment") == name:
                    self.kube.patch("ModelDeployment", other, {"spec": {"fallback": None}}, self.ns)
                    sp.pop("fallback")
                    self._count("fallback_cleared")
            self.kube.delete("ModelDeployment", name, self.ns)
            del self.live[name]
            self._count("deleted")
        elif op == "scale":
            name = self.rng.choice(sorted(self.live))
            reps = self.rng.randint(1, 3)
            sp = self.live[name]
            if reps > sp["minReplicas"] and not self._fits(sp["allowedPools"][0],
                                                           sp["parallelism"]["tp"] * (reps - sp["minReplicas"])):
                self._count("skipped_full")
                return
            self.kube.patch("ModelDeployment", name, {"spec": {"minReplicas": reps}}, self.ns)
            self.live[name]["minReplicas"] = reps
            self._count("scaled")
        elif op == "edit":
            name = self.rng.choice(sorted(self.live))
            cpu = self.rng.choice(["100m", "200m", "250m"])
            self.kube.patch("ModelDeployment", name, {"spec": {"engine": {"cpu": cpu}}}, self.ns)
            self.live[name]["engine"]["cpu"] = cpu
            self._count("edited")
        elif op == "bad":
            self.seq += 1
            name = f"bad-{self.seq:05d}"
            kind = self.rng.choice(["cel", "pool", "fallback"])
            spec = self._spec()
            if kind == "cel":
                spec.update(minReplicas=3, maxReplicas=1)
                try:
                    self.kube.create("ModelDeployment", self._body(name, spec), self.ns)
                    self._count("bad_cel_accepted")  # the API server should have refused it
                    self.kube.delete("ModelDeployment", name, self.ns)
                except KubeError as exc:
                    self._count("bad_cel_refused" if exc.status == 422 else f"bad_cel_{exc.status}")
                return
            if kind == "pool":
                spec["allowedPools"] = ["no-such-pool"]
                self.bad[name] = "NoAllowedPool"
            else:
                if not self._fits(spec["allowedPools"][0], spec["parallelism"]["tp"] * spec["minReplicas"]):
                    self._count("skipped_full")
                    return
                spec["fallback"] = {"deployment": "no-such-model", "qualityFloor": 0.9}
                self.bad[name] = "UnknownFallback"
            self.bad_specs[name] = spec
            self.kube.create("ModelDeployment", self._body(name, spec), self.ns)
            self._count(f"bad_{kind}")
        elif op == "fix_bad":  # a bad spec is deleted again after a while
            name = self.rng.choice(sorted(self.bad))
            self.kube.delete("ModelDeployment", name, self.ns)
            del self.bad[name]
            del self.bad_specs[name]
            self._count("bad_deleted")

    def node_step(self) -> None:
        add = len(self.extra_nodes) < self.max_extra_nodes and (not self.extra_nodes or self.rng.random() < 0.5)
        if add:
            self.seq += 1
            pool, gpus, acc, _ = self.rng.choice(POOLS)
            name = self.cluster.add_gpu_nodes(pool, 1, gpus=gpus, accelerator=acc, name_prefix=f"churn-{self.seq:05d}",
                                              wait_ready_s=60)[0]
            self.extra_nodes.append(name)
            self._count("nodes_added")
        else:
            name = self.extra_nodes.pop(self.rng.randrange(len(self.extra_nodes)))
            self.kube.delete("Node", name)
            self._count("nodes_removed")

    def converged(self) -> bool:
        items = {m["metadata"]["name"]: m for m in self.kube.list("ModelDeployment", self.ns)["items"]}
        if any(_cond(items.get(name), "Ready")[0] != "True" for name in self.live):
            return False
        for name, reason in self.bad.items():
            status, why = _cond(items.get(name), "Degraded")
            if status != "True" or why != reason:
                return False
        return True

    def not_converged(self) -> list[str]:
        items = {m["metadata"]["name"]: m for m in self.kube.list("ModelDeployment", self.ns)["items"]}
        out = [f"{n}: Ready={_cond(items.get(n), 'Ready')}" for n in self.live
               if _cond(items.get(n), "Ready")[0] != "True"]
        out += [f"{n}: Degraded={_cond(items.get(n), 'Degraded')} want {r}" for n, r in self.bad.items()
                if _cond(items.get(n), "Degraded") != ("True", r)]
        return out


def _cond(md: dict[str, Any] | None, type_: str) -> tuple[str | None, str | None]:
    for c in ((md or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c.get("status"), c.get("reason")
    return None, None


def _managed_objects(kube: Any, ns: str) -> int:
    return sum(len(kube.list(kind, ns, labelSelector=MANAGED)["items"]) for kind in ("Deployment", "Pod", "Service"))


def run_churn_soak(minutes: float = 30.0, sample_s: float = 10.0, window_s: float = 300.0, nodes: int = 24,
                   seed: int = 0, bounds: dict[str, float] | None = None, progress: bool = True,
                   cluster: Any = None, op_interval_s: float = 1.0, node_every_s: float = 15.0) -> dict[str, Any]:
    """Run the churn soak (starting a test cluster unless one is given) and return the report."""
    from controller.api import crdgen
    from controller.kube import Kube

    bounds = {"max_rss_mib_per_h": 60.0, "max_rss_growth_mib": 64.0, "max_fd_growth": 20.0,
              "max_thread_growth": 10.0, "max_latency_drift": 2.0, "max_stale_series": 0.0, **(bounds or {})}
    owned = cluster is None
    if owned:
        from wattplane.testcluster import TestCluster

        _say("starting the local test cluster", progress)
        cluster = TestCluster.start(die_with_parent=True)
    tmp = Path(tempfile.mkdtemp(prefix="wattplane-soak-"))
    controller: ControllerProc | None = None
    capacity: dict[str, int] = {}
    made_fleet = False
    try:
        kube = Kube(cluster.api_client())
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crdgen.DEFAULT_OUT))
        if wait_until(lambda: kube.list("ModelDeployment") is not None and kube.list("AcceleratorPool"), 60) is None:
            raise RuntimeError("CRDs not served within 60 s")
        for pool, gpus, acc, share in POOLS:
            with contextlib.suppress(Exception):
                kube.create("AcceleratorPool", {
                    "apiVersion": API_VERSION, "kind": "AcceleratorPool", "metadata": {"name": pool},
                    "spec": {"nodeSelector": {"wattplane.io/pool": pool}, "gpusPerNode": gpus,
                             "accelerator": {"model": acc, "memoryGiB": 80, "bf16Tflops": 900, "hbmGBps": 3000,
                                             "tdpW": 700, "minPowerW": 200, "maxPowerW": 700}}})
            n = max(1, round(nodes * share))
            cluster.add_gpu_nodes(pool, n, gpus=gpus, accelerator=acc, name_prefix=f"{pool}-base-{seed}-{os.getpid()}",
                                  wait_ready_s=180)
            capacity[pool] = n * gpus
        made_fleet = False
        with contextlib.suppress(Exception):  # the pipeline state is persisted in the FleetPolicy status
            kube.create("FleetPolicy", {"apiVersion": API_VERSION, "kind": "FleetPolicy",
                                        "metadata": {"name": "default"}, "spec": {}})
            made_fleet = True
        ns = cluster.create_namespace(f"soak-{seed}-{os.getpid()}")
        controller = ControllerProc(cluster.kubeconfig, tmp / "controller.log")
        if wait_until(lambda: parse_metrics(controller.metrics_text()).values.get("wattplane_leader") == 1, 60) is None:
            raise RuntimeError(f"controller did not lead within 60 s:\n{controller.log_tail()}")
        _say(f"controller pid {controller.pid} leads; churning for {minutes:g} min", progress)
        driver = Driver(kube, cluster, ns, random.Random(seed), capacity)
        rows: list[dict[str, Any]] = []
        start = time.monotonic()
        end = start + minutes * 60
        next_sample, next_node, next_say = start, start + node_every_s, start + 60
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                rows.append(sample(controller, now - start, kube, ns))
                next_sample += sample_s
            if now >= next_node:
                driver.node_step()
                next_node += node_every_s
            if not controller.alive():
                raise RuntimeError(f"controller exited with {controller.proc.returncode}:\n{controller.log_tail()}")
            driver.step()
            if now >= next_say:
                _say(f"{(now - start) / 60:.1f} min: rss {rows[-1]['rss_mib']:.1f} MiB, fds {rows[-1]['fds']}, "
                     f"threads {rows[-1]['threads']:.0f}, {driver.counts}", progress)
                next_say += 60
            time.sleep(max(0.0, op_interval_s - (time.monotonic() - now)))
        rows.append(sample(controller, time.monotonic() - start, kube, ns))
        _say("churn over; waiting for convergence", progress)
        converge = wait_until(driver.converged, 180, 1.0)
        stuck = [] if converge is not None else driver.not_converged()
        valid_left = len(driver.live)
        for m in kube.list("ModelDeployment", ns)["items"]:
            kube.delete("ModelDeployment", m["metadata"]["name"], ns)
        cleaned = wait_until(lambda: not kube.list("ModelDeployment", ns)["items"] and _managed_objects(kube, ns) == 0,
                             120, 1.0)
        orphans = 0 if cleaned is not None else _managed_objects(kube, ns)
        time.sleep(min(sample_s, 10.0))  # one more pipeline pass without them
        rows.append(sample(controller, time.monotonic() - start, kube, ns))
        report = analyse(rows, window_s, bounds, minutes)
        lost = len(stuck) + orphans
        if converge is None:
            report["failures"].append(f"not converged 180 s after the churn: {stuck[:5]}")
        if orphans:
            report["failures"].append(f"{orphans} managed objects left 120 s after their ModelDeployments were deleted")
        if rows[-1]["series_naming_ns"] > bounds["max_stale_series"]:
            report["failures"].append(
                f"{rows[-1]['series_naming_ns']} /metrics series still name namespace {ns} after all its "
                f"ModelDeployments were deleted (> {bounds['max_stale_series']:g}): label sets never removed")
        if driver.counts.get("bad_cel_accepted"):
            report["failures"].append("the API server accepted minReplicas > maxReplicas")
        errors = {k: v for k, v in driver.counts.items() if k.startswith("error_")}
        report.update({
            "params": {"minutes": minutes, "sample_s": sample_s, "window_s": window_s, "base_nodes": nodes,
                       "seed": seed, "op_interval_s": op_interval_s, "node_every_s": node_every_s,
                       "target_live_deployments": driver.target},
            "churn": dict(sorted(driver.counts.items())),
            "client_errors": errors,
            "valid_left_at_end": valid_left, "bad_left_at_end": len(driver.bad),
            "time_to_converge_s": round(converge, 1) if converge is not None else None,
            "cleanup_s": round(cleaned, 1) if cleaned is not None else None,
            "orphans": orphans, "data_lost": lost,
        })
        shutil.rmtree(tmp, ignore_errors=True)  # the controller's log is kept only when the run raised
        return report
    finally:
        if controller is not None:
            controller.stop()
        if made_fleet and not owned:
            with contextlib.suppress(Exception):
                Kube(cluster.api_client()).delete("FleetPolicy", "default")
        if owned:
            cluster.stop()


def state_sizes(kube: Any) -> dict[str, int]:
    """JSON bytes of each stage's State the controller persisted in the FleetPolicy status."""
    with contextlib.suppress(Exception):
        saved = (kube.get("FleetPolicy", "default").get("status") or {}).get("pipelineState") or {}
        out = {k: len(json.dumps(v)) for k, v in (saved.get("states") or {}).items()}
        out["total"] = len(json.dumps(saved))
        return out
    return {}


def sample(c: ControllerProc, t: float, kube: Any = None, ns: str | None = None) -> dict[str, Any]:
    m = parse_metrics(c.metrics_text(), ns)
    return {"t": t, **proc_status(c.pid), "fds": open_fds(c.pid), "cpu_s": cpu_seconds(c.pid),
            "state_bytes": state_sizes(kube) if kube is not None else {},
            "buckets": m.buckets, "by_kind": m.by_kind, "series": m.series, "series_naming_ns": m.naming,
            "reconciles": m.values.get(f"{RECONCILE}_count", 0.0),
            "api_requests": m.values.get("wattplane_api_requests_total", 0.0),
            "reconcile_errors": m.values.get("wattplane_reconcile_errors_total", 0.0),
            "queue_depth": m.values.get("wattplane_workqueue_depth", 0.0)}


def analyse(rows: list[dict[str, Any]], window_s: float, bounds: dict[str, float], minutes: float) -> dict[str, Any]:
    churn_rows = rows[:-1]  # the last row is after the clean-up
    t = [r["t"] for r in churn_rows]
    mem = {k: growth(k, unit, t, [float(r[k]) for r in churn_rows], window_s).to_json()
           for k, unit in (("rss_mib", "MiB"), ("fds", "count"), ("threads", "count"), ("series", "samples"))}
    first_end = next((r for r in churn_rows if r["t"] > t[0] + window_s), churn_rows[-1])
    last_start = next((r for r in churn_rows if r["t"] >= t[-1] - window_s), churn_rows[0])
    lat = {
        "first_p50_ms": 1000 * histogram_quantile(0.5, churn_rows[0]["buckets"], first_end["buckets"]),
        "first_p99_ms": 1000 * histogram_quantile(0.99, churn_rows[0]["buckets"], first_end["buckets"]),
        "last_p50_ms": 1000 * histogram_quantile(0.5, last_start["buckets"], churn_rows[-1]["buckets"]),
        "last_p99_ms": 1000 * histogram_quantile(0.99, last_start["buckets"], churn_rows[-1]["buckets"]),
        "first_reconciles": first_end["reconciles"] - churn_rows[0]["reconciles"],
        "last_reconciles": churn_rows[-1]["reconciles"] - last_start["reconciles"],
    }
    def q(quantile: float, a: dict[str, Any], b: dict[str, Any], kind: str) -> float:
        return 1000 * histogram_quantile(quantile, a["by_kind"].get(kind, {}), b["by_kind"][kind])

    lat["per_kind"] = {
        kind: {"first_p50_ms": q(0.5, churn_rows[0], first_end, kind),
               "first_p99_ms": q(0.99, churn_rows[0], first_end, kind),
               "last_p50_ms": q(0.5, last_start, churn_rows[-1], kind),
               "last_p99_ms": q(0.99, last_start, churn_rows[-1], kind)}
        for kind in sorted(set(first_end["by_kind"]) & set(churn_rows[-1]["by_kind"]))
    }
    lat["p50_ratio"] = lat["last_p50_ms"] / lat["first_p50_ms"] if lat["first_p50_ms"] > 0 else float("nan")
    lat["p99_ratio"] = lat["last_p99_ms"] / lat["first_p99_ms"] if lat["first_p99_ms"] > 0 else float("nan")
    span = max(t[-1] - t[0], 1e-9)
    cpu = drift("cpu_per_reconcile", "ms", [r["t"] for r in churn_rows[1:]],
                [1000 * (b["cpu_s"] - a["cpu_s"]) / max(b["reconciles"] - a["reconciles"], 1)
                 for a, b in itertools.pairwise(churn_rows)], window_s)
    keys = sorted({k for r in churn_rows for k in r["state_bytes"]})
    state = {k: growth(f"state.{k}", "bytes", t, [float(r["state_bytes"].get(k, 0)) for r in churn_rows],
                       window_s).to_json() for k in keys}
    failures = []
    rss = mem["rss_mib"]
    if rss["growth"] > bounds["max_rss_growth_mib"]:
        failures.append(f"RSS grew {rss['growth']:.1f} MiB first->last window > {bounds['max_rss_growth_mib']}")
    if minutes >= 10 and rss["slope_per_h"] > bounds["max_rss_mib_per_h"]:
        failures.append(f"RSS slope {rss['slope_per_h']:.1f} MiB/h after warm-up > {bounds['max_rss_mib_per_h']}")
    if mem["fds"]["growth"] > bounds["max_fd_growth"]:
        failures.append(f"open FDs grew {mem['fds']['growth']:.0f} > {bounds['max_fd_growth']}")
    if mem["threads"]["growth"] > bounds["max_thread_growth"]:
        failures.append(f"threads grew {mem['threads']['growth']:.0f} > {bounds['max_thread_growth']}")
    enough = lat["first_reconciles"] >= 20 and lat["last_reconciles"] >= 20
    if enough and lat["p50_ratio"] > bounds["max_latency_drift"]:
        failures.append(f"reconcile p50 last/first window {lat['p50_ratio']:.2f} > {bounds['max_latency_drift']}")
    return {
        "bounds": bounds,
        "memory": mem,
        "state_bytes": state,
        "state_bytes_after_cleanup": rows[-1]["state_bytes"],
        "latency": {"reconcile": {"name": "reconcile_ms (histogram)", "unit": "ms", **lat},
                    "cpu_per_reconcile": cpu.to_json()},
        "controller": {"reconciles": churn_rows[-1]["reconciles"] - churn_rows[0]["reconciles"],
                       "reconciles_per_s": (churn_rows[-1]["reconciles"] - churn_rows[0]["reconciles"]) / span,
                       "api_requests": churn_rows[-1]["api_requests"] - churn_rows[0]["api_requests"],
                       "reconcile_errors": churn_rows[-1]["reconcile_errors"] - churn_rows[0]["reconcile_errors"],
                       "cpu_s": churn_rows[-1]["cpu_s"] - churn_rows[0]["cpu_s"],
                       "peak_rss_mib": max(r["rss_mib"] for r in rows),
                       "rss_after_cleanup_mib": rows[-1]["rss_mib"], "series_after_cleanup": rows[-1]["series"],
                       "stale_series_after_cleanup": rows[-1]["series_naming_ns"]},
        "timeline": [{"t_min": round(r["t"] / 60, 2), "rss_mib": round(r["rss_mib"], 1), "fds": r["fds"],
                      "threads": r["threads"], "series": r["series"], "reconciles": r["reconciles"]}
                     for r in rows[:: max(1, len(rows) // 40)]],
        "failures": failures,
    }


__all__ = ["ControllerProc", "Driver", "histogram_quantile", "parse_metrics", "run_churn_soak", "sample"]
