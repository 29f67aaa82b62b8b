"""``wattplane simulate SCENARIO.yaml --cluster KUBECONFIG``: the scenario through the real controller.

What runs: kwok GPU nodes for the scenario's pools (created unless enough exist), the scenario's
custom resources (rendered by :mod:`wattplane.simulate.crs` with the controller's API models) in a
namespace of its own, ``wattplane controller`` as a subprocess with its telemetry hub, one node agent
per node (``agents.agent.Agent`` with a simulated source) streaming over real gRPC with a projected
ServiceAccount token (TokenRequest, audience ``wattplane``), and a router stand-in that receives the
controller's routing tables over HTTP. The scenario's load advances in wall-clock time,
``time_scale`` simulated seconds per wall second; :class:`~wattplane.simulate.live.LiveFleet` serves it
with what the cluster runs and feeds the agents.

Measured from the cluster and its actors (never invented): replicas Running per pool, desired
replicas (ModelDeployment status), power per domain (agents' device readings), caps the agents
acknowledged, node-seconds the agents' guards held, evictions the controller made, the fallback
share in the router's table, solve times from the controller's metrics. Served tokens, latency and
SLO attainment come from the serving model applied to that measured capacity (``live.py``); what
cannot be measured here (expert copies, policy fallbacks) is reported as ``null`` and listed.

Everything created is removed on exit, also on Ctrl-C / SIGTERM: ModelDeployments first (the
controller removes its finalizers and workloads), then the controller and agents stop, then the
namespace, the nodes and pools/domains it added; a FleetPolicy that existed gets its spec back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from agents.agent import Agent, AgentConfig
from controller.api import crdgen
from controller.dataplane.table import RoutingTable, TableHolder
from controller.executor import render as r
from controller.kube import Kube, KubeError
from wattplane.simulate import crs
from wattplane.simulate.engine import SimResult, deployment_metrics, serving_metrics
from wattplane.simulate.live import LiveFleet, LiveScraper, PodView, ScenarioSource
from wattplane.simulate.load import generate_load
from wattplane.simulate.scenario import Scenario
from wattplane.testcluster.cluster import stop_process_group

log = logging.getLogger("wattplane.simulate.cluster")
REPO = Path(__file__).resolve().parents[2]
FIELD_MANAGER = "wattplane-simulate"
AGENT_SA = "wattplane-sim-agent"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
AGENTS_STOP_S = 10.0  # cleanup waits this long in all for the agents to stop

# metric -> where a cluster run's figure comes from
SOURCES: dict[str, str] = {
    "slo_attainment": "model", "ttft_p99_ms": "model", "tpot_p99_ms": "model", "dropped_share": "model",
    "quality": "model (router share in force)", "output_tokens": "model", "requests": "scenario load",
    "cost_per_hour": "cluster (GPUs of Running pods x pool price)", "cost_per_million_tokens": "cluster + model",
    "energy_kwh": "agents (device power readings)", "tokens_per_joule": "model + agents",
    "over_budget_s": "agents (device power readings per domain)", "caps_applied": "agents (controller caps applied)",
    "guard_node_s": "agents (local guard active)", "migrations": "controller (evictions it made)",
    "replica_changes": "cluster (ModelDeployment status desired per pool)",
    "fallback_share": "router stand-in (table in force)",
    "routing_table_stale_s": "router stand-in (simulated seconds a deployment's table had expired)",
    "solver_ms_p99": "controller /metrics (histogram bucket upper bound)",
    "solver_ms_mean": "controller /metrics", "cycles": "controller /metrics (placement solves)",
}
NOT_MEASURED: dict[str, str] = {
    "expert_copies": "expert placements are published as ConfigMaps for engines; no engine runs here to load them",
    "policy_fallback_share": "plan explanations stay inside the controller (only placement's lastDecision is visible)",
    "migrations_rejected": "the controller logs refusals, it does not count them",
    "solver_ms_p50": "the controller's histogram buckets are too coarse for a median",
    "snapshot_ms_p99": "the controller does not export snapshot build time",
}


class ClusterSimError(RuntimeError):
    """The cluster run could not be set up or driven; the message says what and where."""


@dataclass
class ClusterOptions:
    kubeconfig: Path
    time_scale: float = 1.0  # simulated seconds per wall second
    tick_s: float = 1.0  # wall seconds between serving steps
    ready_timeout_s: float = 180.0  # wall seconds the controller gets to run every minimum replica first
    log_dir: Path | None = None  # controller log (default: a temporary directory, kept on failure)
    context: str | None = None


@dataclass
class ClusterReport:
    result: SimResult
    namespace: str
    nodes_created: list[str]
    warmup_s: float
    notes: list[str] = field(default_factory=list)
    controller_log: Path | None = None
    final: dict[str, Any] = field(default_factory=dict)  # the cluster at the end: pods Running, replicas


class _Router:
    """The router's table endpoint (``PUT /v1/router/table``) as the Ray Serve router implements it."""

    def __init__(self) -> None:
        self.tables: dict[str, TableHolder] = {}
        self.lock = threading.Lock()
        holder = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    table = RoutingTable.model_validate_json(body)
                except ValueError as exc:
                    self._reply(422, str(exc))
                    return
                with holder.lock:
                    ok = holder.tables.setdefault(table.deployment, TableHolder()).offer(table, time.monotonic())
                self._reply(200 if ok else 409, "ok" if ok else "newer version installed")

            def _reply(self, code: int, text: str) -> None:
                self.send_response(code)
                self.send_header("content-type", "text/plain")
                self.end_headers()
                self.wfile.write(text.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="router-standin", daemon=True)
        self.thread.start()

    def shares(self) -> dict[str, float]:
        """Fallback share in force per deployment (``ns/name``); a stale table routes nothing, as the router."""
        now = time.monotonic()
        with self.lock:
            return {d: h.table.fallback_share for d, h in self.tables.items()
                    if h.table is not None and not h.is_stale(now)}

    def stale(self) -> list[str]:
        """Deployments whose table has expired (the router then sends everything to the large model)."""
        now = time.monotonic()
        with self.lock:
            return sorted(d for d, h in self.tables.items() if h.is_stale(now))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ClusterRun:
    def __init__(self, scenario: Scenario, seed: int, options: ClusterOptions, base_dir: Path | None = None,
                 data_dir: str | None = None) -> None:
        self.scenario, self.seed, self.opt = scenario, seed, options
        self.base_dir, self.data_dir = base_dir, data_dir
        self.run_id = uuid.uuid4().hex[:6]
        slug = re.sub(r"[^a-z0-9-]+", "-", scenario.name.lower()).strip("-")[:30] or "scenario"
        self.namespace = f"wp-sim-{slug}-{self.run_id}"
        self.kube = Kube.from_config(options.kubeconfig, options.context)
        self.nodes: dict[str, int] = {}  # node -> pool index
        self.nodes_created: list[str] = []
        self.nodes_labelled: list[tuple[str, str]] = []  # (node, label) we added to an existing node
        self.created: list[tuple[str, str]] = []  # cluster-scoped (kind, name) we created
        self.fleet_policy_before: dict[str, Any] | None = None
        self.fleet_policy_created = False
        self.namespace_created = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.router: _Router | None = None
        self.agents: dict[str, Agent] = {}
        self.sources: dict[str, ScenarioSource] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: threading.Thread | None = None
        self.agent_futures: list[Any] = []
        self.notes: list[str] = []
        self.log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="wattplane-sim-"))
        self.log_path = self.log_dir / f"controller-{self.run_id}.log"
        self.metrics_url = ""
        self.running_since: dict[str, float] = {}  # pod uid -> when first seen Running (wall, monotonic)

    # -- the run -----------------------------------------------------------------------------------
    def run(self, progress: Any = None) -> ClusterReport:
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            load = generate_load(self.scenario, self.seed, self.base_dir, self.data_dir)
            fleet = LiveFleet(self.scenario, load, self.namespace)
            self._note_unsupported()
            self._setup()
            hub = self._start_controller()
            self._start_agents(hub, fleet)
            warmup = self._warm_up(fleet)
            self._drive(fleet, progress)
            result = self._result(fleet)
            report = ClusterReport(result, self.namespace, list(self.nodes_created), warmup, self.notes,
                                   self.log_path if self.opt.log_dir else None, self._final_state())
        except ClusterSimError as exc:
            raise ClusterSimError(f"{exc} (controller log: {self.log_path})") from exc
        finally:
            with _ignoring_interrupts():
                self.cleanup()
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)
        if self.opt.log_dir is None:  # a temporary log is kept only when the run failed
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return report

    # -- setup -------------------------------------------------------------------------------------
    def _note_unsupported(self) -> None:
        sc = self.scenario
        if sc.background.count or sc.background.pods_csv:
            self.notes.append("background pods are not created on a cluster run (serving load only)")
        if sc.faults:
            self.notes.append("faults are not injected on a cluster run")
        if any(getattr(sc.policies, st).period_s for st in ("forecast", "routing", "placement", "moe", "power",
                                                          "rescheduling")):
            self.notes.append("stage period_s is not expressible in a FleetPolicy: every stage runs each cycle")

    def _setup(self) -> None:
        self._ensure_crds()
        self.kube.request("POST", "/api/v1/namespaces", body={
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": self.namespace, "labels": {crs.SIM_LABEL: self.run_id}}})
        self.namespace_created = True
        self._ensure_nodes()
        for p in self.scenario.pools:
            self._create_cluster_scoped("AcceleratorPool", crs.pool_object(p, self.run_id))
        for d in self.scenario.power_domains:
            self._create_cluster_scoped("PowerDomain", crs.power_domain_object(d, self.run_id))
        spec = crs.fleet_policy_spec(self.scenario, self.scenario.control_period_s / self.opt.time_scale)
        try:
            current = self.kube.get("FleetPolicy", "default")
            self.fleet_policy_before = current.get("spec") or {}
            self.kube.patch("FleetPolicy", "default", [{"op": "replace", "path": "/spec", "value": spec}],
                            content_type="application/json-patch+json")
        except KubeError as exc:
            if exc.status != 404:
                raise
            self.kube.create("FleetPolicy", {"apiVersion": "wattplane.io/v1alpha1", "kind": "FleetPolicy",
                                             "metadata": {"name": "default", "labels": {crs.SIM_LABEL: self.run_id}},
                                             "spec": spec})
            self.fleet_policy_created = True
        for dep in self.scenario.deployments:
            self.kube.create("ModelDeployment", crs.deployment_object(dep, self.namespace, self.run_id), self.namespace)
        self.router = _Router()

    def _ensure_crds(self) -> None:
        base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        docs = crdgen.generate()
        installed = False
        for text in docs.values():
            import yaml

            crd = yaml.safe_load(text)
            name = crd["metadata"]["name"]
            try:
                self.kube.request("GET", f"{base}/{name}")
                continue
            except KubeError as exc:
                if exc.status != 404:
                    raise
            self.kube.request("PATCH", f"{base}/{name}", body=crd, content_type="application/apply-patch+yaml",
                              query={"fieldManager": FIELD_MANAGER, "force": True})
            self.notes.append(f"installed CRD {name} (left installed: deleting a CRD deletes every object of it)")
            _wait(lambda name=name: any(
                c.get("type") == "Established" and c.get("status") == "True"
                for c in (self.kube.request("GET", f"{base}/{name}").get("status") or {}).get("conditions") or []),
                30, f"CRD {name} established")
            installed = True
        if installed:  # discovery of a fresh CRD lags a little behind Established
            _wait(lambda: self.kube.list("FleetPolicy") is not None, 30, "CRD discovery")

    def _ensure_nodes(self) -> None:
        """Each pool gets ``nodes`` nodes labelled for it: existing ones first, kwok nodes for the rest."""
        existing = {n["metadata"]["name"]: n for n in self.kube.list("Node")["items"]}
        for pi, p in enumerate(self.scenario.pools):
            mine = sorted(n for n, obj in existing.items()
                          if (obj["metadata"].get("labels") or {}).get(crs.POOL_LABEL) == p.name)[: p.nodes]
            k = 0
            while len(mine) < p.nodes:
                name = f"{p.name}-{k:04d}"
                k += 1
                if name in existing:
                    continue
                self.kube.create("Node", _kwok_node(name, p.name, p.accelerator.model, p.gpus_per_node,
                                                    self._domain_labels(p.power_domain), self.run_id))
                self.nodes_created.append(name)
                mine.append(name)
            for name in mine:
                self.nodes[name] = pi
                if p.power_domain and name not in self.nodes_created:
                    label = crs.domain_label(p.power_domain)
                    if (existing[name]["metadata"].get("labels") or {}).get(label) != "true":
                        self.kube.patch("Node", name, {"metadata": {"labels": {label: "true"}}})
                        self.nodes_labelled.append((name, label))
        _wait(lambda: all(_node_ready(self.kube.get("Node", n)) for n in self.nodes), 90,
              f"nodes Ready ({len(self.nodes)}; kwok must manage nodes labelled type=kwok)")

    def _domain_labels(self, domain: str | None) -> dict[str, str]:
        return {crs.domain_label(domain): "true"} if domain else {}

    def _create_cluster_scoped(self, kind: str, body: dict[str, Any]) -> None:
        try:
            self.kube.create(kind, body)
            self.created.append((kind, body["metadata"]["name"]))
        except KubeError as exc:
            if exc.status != 409:
                raise
            self.notes.append(f"{kind} {body['metadata']['name']} already existed: used as it is, left in place")

    def _start_controller(self) -> str:
        assert self.router is not None
        period = max(1.0, self.scenario.control_period_s / self.opt.time_scale)
        args = [sys.executable, "-m", "wattplane", "controller", "--kubeconfig", str(self.opt.kubeconfig),
                "--metrics-port", "0", "--grpc-host", "127.0.0.1", "--grpc-port", "0",
                "--lease-namespace", self.namespace, "--lease-name", "wattplane-simulate",
                "--identity", f"simulate-{self.run_id}", "--lease-duration", "6", "--renew-deadline", "4",
                "--retry-period", "0.5", "--resync", f"{period:g}", "--router-url", self.router.url,
                "--log-level", "INFO"]
        if self.opt.context:
            args += ["--context", self.opt.context]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

        def started() -> tuple[str, str] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterSimError(f"controller exited with {self.proc.returncode}: {self._log_tail()}")
            text = self.log_path.read_text(errors="replace")
            hub = re.search(r"telemetry hub on (\S+:\d+)", text)
            metrics = re.search(r"metrics on (http://\S+)/metrics", text)
            return (hub.group(1), metrics.group(1)) if hub and metrics else None

        hub, self.metrics_url = _wait(started, 60, "controller start (telemetry hub and metrics)")
        return str(hub).replace("0.0.0.0", "127.0.0.1")

    def _agent_token(self) -> str:
        ns = self.namespace
        self.kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
                          body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": AGENT_SA}})
        resp = self.kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{AGENT_SA}/token", body={
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": ["wattplane"], "expirationSeconds": 3600 * 6}})
        return str(resp["status"]["token"])

    def _start_agents(self, hub: str, fleet: LiveFleet) -> None:
        token = self._agent_token()
        loop = asyncio.new_event_loop()
        self.loop = loop
        self.loop_thread = threading.Thread(target=loop.run_forever, name="sim-agents", daemon=True)
        self.loop_thread.start()
        domain_of = {p.name: p.power_domain or "" for p in self.scenario.pools}
        for node, pi in sorted(self.nodes.items()):
            source = ScenarioSource(fleet, node, pi)
            config = AgentConfig(node_name=node, target=hub, token=token, report_interval_s=1.0,
                                 backoff_base_s=0.2, power_domain=domain_of[self.scenario.pools[pi].name])
            self.sources[node] = source
            agent = self.agents[node] = _make_agent(config, source, LiveScraper(fleet, node), loop)
            self.agent_futures.append(asyncio.run_coroutine_threadsafe(agent.run(), loop))

    def _warm_up(self, fleet: LiveFleet) -> float:
        """Bring the fleet to the scenario's opening load before the clock starts.

        The controller places from the ModelDeployments alone (a scenario's ``initial_replicas`` are
        the in-memory fleet's; here the policies decide), so first every agent's stream and every
        minimum replica, then the first control period's load is served over and over (not recorded)
        until the desired replicas are Ready and have not changed for two control periods.
        """
        t0 = time.monotonic()
        _wait(lambda: all(a.connected for a in self.agents.values()), 60, "agents connected to the hub")
        want = {d.name: min(d.min_replicas, d.max_replicas) for d in self.scenario.deployments}

        def ready() -> bool:
            items = self.kube.list("ModelDeployment", self.namespace)["items"]
            have = {m["metadata"]["name"]: (m.get("status") or {}).get("readyReplicas", 0) for m in items}
            return all(have.get(n, 0) >= k for n, k in want.items())

        try:
            _wait(ready, self.opt.ready_timeout_s, "minimum replicas Ready")
        except ClusterSimError as exc:
            self.notes.append(f"load started before convergence: {exc}")
            return time.monotonic() - t0
        deps = {crs_short(d.name): i for i, d in enumerate(self.scenario.deployments)}
        pools = {p.name: i for i, p in enumerate(self.scenario.pools)}
        window = min(self.scenario.control_period_s, self.scenario.duration_s)
        period_wall = max(1.0, self.scenario.control_period_s / self.opt.time_scale)
        stable_since = time.monotonic()
        last: dict[Any, Any] = {}  # desired/ready per (deployment, pool) and the router's shares
        deadline = t0 + self.opt.ready_timeout_s
        while time.monotonic() < deadline:
            pods = self._pods(deps, pools)
            fleet.step(0.0, window, pods, self.nodes, lambda n: self.sources[n].limits_w(),
                       self._shares(fleet))
            fleet.backlog[:] = 0.0  # each pass is the same opening window, not a growing queue
            now: dict[Any, Any] = {("route", d): round(v, 2) for d, v in self._shares(fleet).items()}
            for m in self.kube.list("ModelDeployment", self.namespace)["items"]:
                for e in (m.get("status") or {}).get("pools") or []:
                    now[(m["metadata"]["name"], e["pool"])] = (int(e.get("replicas", 0)), int(e.get("ready", 0)))
            if now != last or any(v[0] != v[1] for k, v in now.items() if k[0] != "route"):
                stable_since, last = time.monotonic(), now
            elif time.monotonic() - stable_since >= 2 * period_wall:
                break
            time.sleep(self.opt.tick_s)
        else:
            self.notes.append(f"warm-up: replicas still changing after {self.opt.ready_timeout_s:g}s; load started")
        fleet.reset()
        # the fleet the warm-up converged to starts warm, as a scenario's initial fleet does in memory
        self.running_since = {uid: -math.inf for uid in self.running_since}
        return time.monotonic() - t0

    def _shares(self, fleet: LiveFleet) -> dict[int, float]:
        assert self.router is not None
        out = {}
        for key, share in self.router.shares().items():
            ns, _, name = key.partition("/")
            if ns == self.namespace and name in fleet.dep_index:
                out[fleet.dep_index[name]] = share
        return out

    # -- the clock ---------------------------------------------------------------------------------
    def _drive(self, fleet: LiveFleet, progress: Any) -> None:
        sc, opt = self.scenario, self.opt
        deps = {crs_short(d.name): i for i, d in enumerate(sc.deployments)}
        pools = {p.name: i for i, p in enumerate(sc.pools)}
        cost = np.array([p.cost_per_device_hour for p in sc.pools])
        domains = {d.name: i for i, d in enumerate(sc.power_domains)}
        node_dom = {n: domains.get(sc.pools[pi].power_domain or "", len(domains)) for n, pi in self.nodes.items()}
        self.desired: dict[tuple[str, str], int] = {}
        self.replica_changes = 0
        self.caps_acked = 0
        self.violations: list[str] = []
        self.stale_table_s = 0.0
        held: dict[tuple[str, int], float | None] = {}
        start = time.monotonic()
        sim_prev = 0.0
        next_tick = start
        while sim_prev < sc.duration_s:
            next_tick += opt.tick_s
            time.sleep(max(0.0, next_tick - time.monotonic()))
            sim_now = min((time.monotonic() - start) * opt.time_scale, sc.duration_s)
            pods = self._pods(deps, pools)
            self._observe_desired()
            fleet.step(sim_prev, sim_now, pods, self.nodes, lambda n: self.sources[n].limits_w(), self._shares(fleet))
            span = sim_now - sim_prev
            power = np.zeros(len(domains) + 1)
            for node, src in self.sources.items():
                power[node_dom[node]] += sum(src.last_power)
            caps = 0
            for node, agent in self.agents.items():
                for i, w in enumerate(agent.limits.controller_w):
                    caps += int(w is not None)
                    if w is not None and held.get((node, i)) != w:
                        self.caps_acked += 1
                    held[(node, i)] = w
            s = fleet.series
            s.power.append(power.tolist())
            s.caps.append(float(caps))
            s.cost.append(float(sum(cost[p.pool] * p.gpus for p in pods if p.running)))
            s.guard_nodes.append(float(sum(a.guard.active for a in self.agents.values())))
            self.stale_table_s += span * len([d for d in self.router.stale()  # type: ignore[union-attr]
                                              if d.startswith(self.namespace + "/")])
            self._check(pods)
            sim_prev = sim_now
            if progress is not None:
                progress(sim_now / sc.duration_s)
            if span <= 0 and sim_now >= sc.duration_s:
                break

    def _pods(self, deps: dict[str, int], pools: dict[str, int]) -> list[PodView]:
        out = []
        for p in self.kube.list("Pod", self.namespace, labelSelector=f"{r.MANAGED_BY}={r.MANAGED_BY_VALUE}")["items"]:
            labels = p["metadata"].get("labels") or {}
            d, pool = deps.get(labels.get(r.L_DEPLOYMENT, "")), pools.get(labels.get(r.L_POOL, ""))
            if d is None or pool is None or p["metadata"].get("deletionTimestamp"):
                continue
            gpus = sum(int(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0) or 0)
                       for c in p["spec"].get("containers") or [])
            node = p["spec"].get("nodeName") or ""
            running = (p.get("status") or {}).get("phase") == "Running" and bool(node)
            uid = p["metadata"].get("uid", p["metadata"]["name"])
            if running:
                self.running_since.setdefault(uid, time.monotonic())
            warm = running and (time.monotonic() - self.running_since.get(uid, math.inf)) * self.opt.time_scale \
                >= self.scenario.replica_startup_s
            out.append(PodView(p["metadata"]["name"], node, d, pool, gpus, running, warm))
        return out

    def _observe_desired(self) -> None:
        for m in self.kube.list("ModelDeployment", self.namespace)["items"]:
            for entry in (m.get("status") or {}).get("pools") or []:
                key = (m["metadata"]["name"], entry["pool"])
                n = int(entry.get("replicas", 0))
                if key in self.desired and self.desired[key] != n:
                    self.replica_changes += 1
                self.desired[key] = n

    def _check(self, pods: list[PodView]) -> None:
        """Invariant: no node runs more GPUs than it has."""
        used: dict[str, int] = {}
        for p in pods:
            if p.running:
                used[p.node] = used.get(p.node, 0) + p.gpus
        for node, n in used.items():
            have = self.scenario.pools[self.nodes[node]].gpus_per_node if node in self.nodes else None
            if have is not None and n > have:
                self.violations.append(f"{node}: {n} GPUs in use of {have}")

    # -- results -----------------------------------------------------------------------------------
    def _result(self, fleet: LiveFleet) -> SimResult:
        sc, s = self.scenario, fleet.series
        span = np.array(s.span)
        n_dom = len(sc.power_domains)
        power = np.array(s.power).T if s.power else np.zeros((n_dom + 1, 0))
        req, met = np.array(s.requests).T, np.array(s.met).T
        ttft, tpot = np.array(s.ttft).T, np.array(s.tpot).T
        served = np.array(s.served).T
        budgets = np.array([d.budget_w for d in sc.power_domains])
        hours = float(span.sum()) / 3600.0
        energy_j = float((power * span).sum())
        tokens = float((served * span).sum())
        cost_total = float((np.array(s.cost) * span).sum() / 3600.0)
        over = float(((power[:n_dom] > budgets[:, None] * (1 + 1e-9)) * span).sum()) if n_dom else 0.0
        addressed, routed = fleet.addressed, fleet.routed
        solver = self._solver_stats()
        if self.stale_table_s > 0:
            self.notes.append(f"the router's routing table expired for {self.stale_table_s:.0f} simulated s "
                              "(deployment-seconds): the router then sends everything to the large model; the "
                              "controller re-pushes the shares in force every 10 s wall (TTL 30 s), so an "
                              "expiry means the controller or the router was unreachable")
        metrics: dict[str, float] = {
            **serving_metrics(met, req, ttft, tpot, cost_total, hours, tokens, energy_j),
            "over_budget_s": over,
            "caps_applied": float(self.caps_acked),
            "migrations": float(self._evictions()),
            "replica_changes": float(self.replica_changes),
            "fallback_share": routed / addressed if addressed else 0.0,
            "solver_ms_p99": solver[0],
            "solver_ms_mean": solver[1],
            "cycles": solver[2],
            "guard_node_s": float((np.array(s.guard_nodes) * span).sum()),
            "routing_table_stale_s": self.stale_table_s,
            "quality": 1.0 - fleet.quality_loss / addressed if addressed else 1.0,
            "dropped_share": fleet.dropped / max(float(fleet.load.output_tokens.sum()), 1.0),
            "output_tokens": tokens,
            "requests": addressed,
            **{k: math.nan for k in NOT_MEASURED},
        }
        names = [d.name for d in sc.deployments]
        per_dep = {
            name: deployment_metrics(met[i], req[i], ttft[i], tpot[i], float((served[i] * span).sum()))
            for i, name in enumerate(names)
        }
        series = {"power_w": power[:n_dom], "budget_w": budgets, "ttft_p99_ms": ttft, "tpot_p99_ms": tpot,
                  "demand_tokens_per_s": np.array(s.demand).T, "served_tokens_per_s": served,
                  "fallback_share": np.array(s.share).T, "ready_replicas": np.array(s.ready).T,
                  "capped_gpus": np.array(s.caps), "cost_per_hour": np.array(s.cost),
                  "fleet_power_w": power.sum(axis=0)}
        labels = {"power_w": [d.name for d in sc.power_domains], "budget_w": [d.name for d in sc.power_domains],
                  "ttft_p99_ms": names, "tpot_p99_ms": names, "demand_tokens_per_s": names,
                  "served_tokens_per_s": names, "fallback_share": names,
                  "ready_replicas": [f"{d}@{p.name}" for d in names for p in sc.pools]}
        methods = {st: getattr(sc.policies, st).method for st in
                   ("forecast", "routing", "placement", "moe", "power", "rescheduling")}
        return SimResult("wattplane", methods, metrics, series, labels, [], self.violations[:20],
                         self._unavailable(), per_dep)

    def _final_state(self) -> dict[str, Any]:
        """What the cluster runs at the end, read from it: Running pods and their GPUs per pool,
        desired / ready replicas per deployment and pool (ModelDeployment status)."""
        sc = self.scenario
        pods = self._pods({crs_short(d.name): i for i, d in enumerate(sc.deployments)},
                          {p.name: i for i, p in enumerate(sc.pools)})
        per_pool = {p.name: {"pods_running": 0, "gpus_running": 0} for p in sc.pools}
        for pod in pods:
            if pod.running:
                per_pool[sc.pools[pod.pool].name]["pods_running"] += 1
                per_pool[sc.pools[pod.pool].name]["gpus_running"] += pod.gpus
        replicas = {m["metadata"]["name"]: {e["pool"]: {"desired": e.get("replicas", 0), "ready": e.get("ready", 0)}
                                            for e in (m.get("status") or {}).get("pools") or []}
                    for m in self.kube.list("ModelDeployment", self.namespace)["items"]}
        return {"pools": per_pool, "replicas": replicas}

    def _controller_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self._controller_text().splitlines()[-lines:])

    def _evictions(self) -> int:
        return len(re.findall(r"migration \S+: evicted", self._controller_text()))

    def _unavailable(self) -> list[str]:
        return sorted(set(re.findall(r"policy pipeline: (\S+) unavailable", self._controller_text())))

    def _solver_stats(self) -> tuple[float, float, float]:
        """(p99 as the upper bound of its bucket, mean, placement solves) over every policy, in ms."""
        try:
            with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError as exc:
            self.notes.append(f"controller metrics unreadable: {exc}")
            return math.nan, math.nan, math.nan
        buckets: dict[float, float] = {}
        total = count = placement = 0.0
        for line in text.splitlines():
            m = re.match(r'wattplane_solver_duration_seconds_(bucket|sum|count)\{(.*)\} (\S+)$', line)
            if not m:
                continue
            kind, labels, value = m.group(1), m.group(2), float(m.group(3))
            if kind == "bucket":
                le = re.search(r'le="([^"]+)"', labels)
                if le:
                    bound = math.inf if le.group(1) == "+Inf" else float(le.group(1))
                    buckets[bound] = buckets.get(bound, 0.0) + value
            elif kind == "sum":
                total += value
            else:
                count += value
                placement += value if 'policy="placement"' in labels else 0.0
        if not count:
            return math.nan, math.nan, 0.0
        p99 = next((b for b in sorted(buckets) if buckets[b] >= 0.99 * count), math.inf)
        return p99 * 1000, total / count * 1000, placement

    # -- cleanup -----------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Remove what the run created; every step is attempted even when an earlier one fails."""
        steps = [self._delete_deployments, self._stop_agents, self._stop_controller, self._delete_namespace,
                 self._delete_nodes, self._delete_cluster_scoped, self._restore_fleet_policy, self._stop_router]
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning: report, do not stop half-way
                self.notes.append(f"cleanup {step.__name__}: {type(exc).__name__}: {exc}")
                log.warning("cleanup %s failed: %s", step.__name__, exc)

    def _delete_deployments(self) -> None:
        if not self.namespace_created:
            return
        for m in self.kube.list("ModelDeployment", self.namespace)["items"]:
            self.kube.delete("ModelDeployment", m["metadata"]["name"], self.namespace)
        alive = self.proc is not None and self.proc.poll() is None
        try:
            _wait(lambda: not self.kube.list("ModelDeployment", self.namespace)["items"], 30 if alive else 0.1,
                  "ModelDeployments finalized by the controller")
        except ClusterSimError:  # the controller is gone: drop our finalizer ourselves
            for m in self.kube.list("ModelDeployment", self.namespace)["items"]:
                self.kube.patch("ModelDeployment", m["metadata"]["name"], {"metadata": {"finalizers": None}},
                                self.namespace)

    def _stop_agents(self) -> None:
        if self.loop is None:
            return
        for agent in self.agents.values():
            self.loop.call_soon_threadsafe(agent.stop)
        deadline = time.monotonic() + AGENTS_STOP_S  # one deadline for all: not 10 s per agent in turn
        for f in self.agent_futures:
            with contextlib.suppress(Exception):
                f.result(max(0.1, deadline - time.monotonic()))
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.loop_thread is not None:
            self.loop_thread.join(5)
        self.loop = None

    def _stop_controller(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)

    def _delete_namespace(self) -> None:
        if self.namespace_created:
            with contextlib.suppress(KubeError):
                self.kube.request("DELETE", f"/api/v1/namespaces/{self.namespace}")

    def _delete_nodes(self) -> None:
        for name in self.nodes_created:
            self.kube.delete("Node", name)
        for name, label in self.nodes_labelled:
            with contextlib.suppress(KubeError):
                self.kube.patch("Node", name, {"metadata": {"labels": {label: None}}})

    def _delete_cluster_scoped(self) -> None:
        for kind, name in reversed(self.created):
            self.kube.delete(kind, name)

    def _restore_fleet_policy(self) -> None:
        if self.fleet_policy_created:
            self.kube.delete("FleetPolicy", "default")
        elif self.fleet_policy_before is not None:
            self.kube.patch("FleetPolicy", "default",
                            [{"op": "replace", "path": "/spec", "value": self.fleet_policy_before}],
                            content_type="application/json-patch+json")

    def _stop_router(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None


def crs_short(name: str) -> str:
    """The deployment label value the executor puts on its pods (``render.short``)."""
    return r.short(name)


def _make_agent(config: AgentConfig, source: ScenarioSource, scraper: LiveScraper,
                loop: asyncio.AbstractEventLoop) -> Agent:
    """Agents create asyncio primitives in __init__: build them on the agents' loop."""
    async def build() -> Agent:
        return Agent(config, source, scraper=scraper)  # type: ignore[arg-type]

    return asyncio.run_coroutine_threadsafe(build(), loop).result(10)


def _kwok_node(name: str, pool: str, accelerator: str, gpus: int, extra: dict[str, str], run_id: str
               ) -> dict[str, Any]:
    """A fake GPU node as ``wattplane.testcluster`` creates them (kwok plays its kubelet)."""
    labels = {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
              "kubernetes.io/arch": "amd64", crs.POOL_LABEL: pool, GPU_PRODUCT_LABEL: accelerator,
              "nvidia.com/gpu.count": str(gpus), "nvidia.com/gpu.present": "true", crs.SIM_LABEL: run_id, **extra}
    capacity = {"cpu": "96", "memory": "1Ti", "pods": "110", "ephemeral-storage": "1Ti", GPU_RESOURCE: str(gpus)}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
            "spec": {}, "status": {"capacity": capacity, "allocatable": capacity}}


def _node_ready(node: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (node.get("status") or {}).get("conditions") or [])


def _wait(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            value = predicate()
        except KubeError as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterSimError(f"timed out after {timeout_s:g}s waiting for {what}"
                                  + (f" (last error: {last})" if last else ""))
        time.sleep(interval_s)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C while it runs is ignored (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


def cluster_json(report: ClusterReport, scenario: Scenario, seed: int, time_scale: float) -> dict[str, Any]:
    """The in-memory run's JSON shape (``report.to_json``), unmeasurable metrics ``null`` and listed."""
    from wattplane.simulate.report import to_json

    doc = to_json(scenario.name, seed, scenario.step_s, scenario.duration_s, [report.result])
    entry = doc["policy_sets"]["wattplane"]
    entry["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in entry["metrics"].items()}
    doc["cluster"] = {
        "namespace": report.namespace, "time_scale": time_scale, "warmup_wall_s": round(report.warmup_s, 2),
        "nodes_created": len(report.nodes_created), "final": report.final,
        "not_measured": NOT_MEASURED, "metric_sources": SOURCES,
        "notes": report.notes, "controller_log": str(report.controller_log) if report.controller_log else None,
    }
    return doc


__all__ = ["ClusterOptions", "ClusterReport", "ClusterRun", "ClusterSimError", "cluster_json"]

