"""``wattplane bench controller``: the controller on the real local test cluster at fleet scale.

Starts the local test Kubernetes (etcd, kube-apiserver, scheduler, controller-manager, kwok),
creates fake GPU nodes in four pools (H100 / A100 x 8 GPUs, L4 x 4 GPUs, plus a second H100
pool for wide pod groups), then:

* ``wattplane``: runs ``wattplane controller`` as a separate process, creates N ModelDeployments
  (a mix of 1-8 GPU replicas and 2-node pod groups) and measures ``seconds_to_ready`` (creation of
  the first until every one reports Ready), ``reconciles_per_s`` (reconcile passes / that time),
  ``api_requests_per_reconcile`` (every request the controller made, Lease renewals and watches
  included, per pass) and ``cpu_s`` (the controller process's user+system CPU seconds up to Ready).
* ``direct``: the floor Kubernetes itself sets: the same workloads created directly as the
  Deployments and pods the controller would render, timed until all their pods are Ready. The
  gap between the two is the controller's own latency.

There is no published anchor for this one; ``direct`` plays that role.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import Case
from controller.api import crdgen
from controller.api import models as api
from controller.executor import render
from controller.kube import Kube

POOLS = (("bh100", 8, "H100-80GB"), ("ba100", 8, "A100-80GB"), ("bl4", 4, "L4"), ("bwide", 8, "H100-80GB"))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=None, help="fake GPU nodes (default 200, quick 32)")
    parser.add_argument("--deployments", type=int, default=None, help="ModelDeployments (default 100, quick 16)")
    parser.add_argument("--workers", type=int, default=4, help="controller reconcile workers")
    parser.add_argument("--timeout", type=float, default=None,
                        help="give up waiting for Ready after this long (default 300 s, quick 40 s)")


_T0 = time.monotonic()


def _say(msg: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    sys.stderr.write(f"[{time.monotonic() - _T0:6.1f}s] {msg}\n")


def _wait(pred: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not done within {timeout_s}s")
        time.sleep(interval_s)
    return time.monotonic() - start


def _md(i: int, ns: str) -> dict[str, Any]:
    """Deployment i of the mix: mostly single-node replicas of 1-8 GPUs, every tenth a 2-node group."""
    if i % 10 == 9:
        pool, tp, pp, reps = "bwide", 8, 2, 1
    else:
        pool = ("bh100", "ba100", "bl4")[i % 3]
        sizes = (1, 2, 4) if pool == "bl4" else (1, 2, 4, 8)
        tp, pp, reps = sizes[(i // 3) % len(sizes)], 1, 1 + (i // 3) % 2
    return {
        "apiVersion": api.API_VERSION, "kind": "ModelDeployment",
        "metadata": {"name": f"m{i:03d}", "namespace": ns},
        "spec": {
            "model": {"name": f"model-{i}", "paramsB": 8, "activeParamsB": 8},
            "engine": {"modelPath": f"org/model-{i}", "terminationGraceS": 0, "cpu": "100m", "memory": "128Mi"},
            "parallelism": {"tp": tp, "pp": pp}, "allowedPools": [pool], "minReplicas": reps, "maxReplicas": 4,
        },
    }


def _nodes_per_pool(total: int) -> dict[str, int]:
    share = {"bh100": 0.3, "ba100": 0.3, "bl4": 0.2, "bwide": 0.2}
    return {p: max(2, int(total * s)) for p, s in share.items()}


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _all_ready(kube: Kube, ns: str, n: int) -> bool:
    items = kube.list("ModelDeployment", ns)["items"]
    done = sum(1 for m in items if any(c["type"] == "Ready" and c["status"] == "True"
                                       for c in (m.get("status") or {}).get("conditions") or []))
    return done == n


def _pods_ready(kube: Kube, ns: str, n: int) -> bool:
    pods = kube.list("Pod", ns)["items"]
    return sum(1 for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                      for c in (p.get("status") or {}).get("conditions") or [])) == n


def _direct(cluster: Any, kube: Kube, mds: list[dict[str, Any]], pools: dict[str, api.AcceleratorPool],
            timeout_s: float) -> float:
    """Create the rendered objects straight away (no controller) and time until every pod is Ready."""
    ns = cluster.create_namespace("bench-direct")
    objs: list[dict[str, Any]] = []
    pods = 0
    for body in mds:
        body = {**body, "metadata": {**body["metadata"], "namespace": ns, "uid": "none"}}
        md = api.ModelDeployment.model_validate(body)
        pool_name = md.spec.allowed_pools[0]
        shape = render.shape_for(md, pools[pool_name])
        for n in range(md.spec.min_replicas):
            if shape.kind == render.SHAPE_DEPLOYMENT:
                if n == 0:
                    objs.append(render.render_deployment(md, pool_name, pools[pool_name], md.spec.min_replicas))
                pods += 1
            else:
                objs.append(render.render_group_service(md, pool_name, n))
                objs += [render.render_group_pod(md, pool_name, pools[pool_name], n, k) for k in range(shape.nodes)]
                pods += shape.nodes
    for o in objs:
        o["metadata"].pop("ownerReferences", None)
    start = time.monotonic()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(kube.apply, objs))
    _wait(lambda: _pods_ready(kube, ns, pods), timeout_s, "direct pods ready", 0.2)
    took = time.monotonic() - start
    _say("direct: cleaning up")
    for kind in ("Deployment", "Service", "Pod"):  # frees the GPUs for the controller's run
        kube.request("DELETE", f"/api/v1/namespaces/{ns}/pods" if kind == "Pod" else
                     (f"/apis/apps/v1/namespaces/{ns}/deployments" if kind == "Deployment" else
                      f"/api/v1/namespaces/{ns}/services"),
                     body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                           "propagationPolicy": "Background"})
    _wait(lambda: not kube.list("Pod", ns)["items"], timeout_s, "direct pods deleted", 0.2)
    return took


def run(args: argparse.Namespace) -> list[Case]:
    from wattplane.testcluster import TestCluster  # the benchmark needs the real local cluster

    quick = bool(args.quick)
    n_nodes = args.nodes or (32 if quick else 200)
    n_mds = args.deployments or (16 if quick else 100)
    args.timeout = args.timeout or (40.0 if quick else 300.0)
    per_pool = _nodes_per_pool(n_nodes)
    # a SIGTERM (e.g. `timeout`) must still stop the cluster processes: turn it into SystemExit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with TestCluster.start() as cluster, tempfile.TemporaryDirectory() as tmp:
        kube = Kube(cluster.api_client())
        cluster.kubectl("apply", "--server-side", "-f", str(crdgen.DEFAULT_OUT))
        _wait(lambda: _crd_ready(kube), 60, "CRDs established")
        pools: dict[str, api.AcceleratorPool] = {}
        for name, gpus, acc in POOLS:
            body = {"apiVersion": api.API_VERSION, "kind": "AcceleratorPool", "metadata": {"name": name},
                    "spec": {"nodeSelector": {"wattplane.io/pool": name}, "gpusPerNode": gpus,
                             "accelerator": {"model": acc, "memoryGiB": 80, "bf16Tflops": 900, "hbmGBps": 3000,
                                             "tdpW": 700, "minPowerW": 200, "maxPowerW": 700}}}
            kube.create("AcceleratorPool", body)
            pools[name] = api.AcceleratorPool.model_validate(body)
            cluster.add_gpu_nodes(name, per_pool[name], gpus=gpus, accelerator=acc, wait_ready_s=180)
        _say(f"cluster up with {n_nodes} nodes")
        mds = [_md(i, "x") for i in range(n_mds)]
        direct_s = _direct(cluster, kube, mds, pools, args.timeout)

        _say(f"direct: {direct_s:.1f}s to ready")
        ns = cluster.create_namespace("bench")
        port = _free_port()
        log = Path(tmp) / "controller.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "wattplane", "controller", "--kubeconfig", str(cluster.kubeconfig),
                 "--metrics-port", str(port), "--lease-name", "bench", "--retry-period", "1",
                 "--workers", str(args.workers),
                 "--log-level", "WARNING"], stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            _wait(lambda: _leader(port), 60, "controller leads")
            base = _metrics(port)
            start = time.monotonic()
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(lambda b: kube.create("ModelDeployment", {**b, "metadata": {**b["metadata"],
                                                                                        "namespace": ns}}, ns), mds))
            _wait(lambda: _all_ready(kube, ns, n_mds), args.timeout, "all ModelDeployments Ready", 0.2)
            took = time.monotonic() - start
            end = _metrics(port)
            _say(f"wattplane: {took:.1f}s to ready")
        except Exception:
            sys.stderr.write(log.read_text()[-3000:])
            raise
        finally:
            proc.terminate()
            proc.wait(30)
    _say("cluster stopped")
    reconciles = end.get("wattplane_reconcile_total", 0) - base.get("wattplane_reconcile_total", 0)
    requests = end.get("wattplane_api_requests_total", 0) - base.get("wattplane_api_requests_total", 0)
    case = Case(
        name=f"fleet-{n_nodes}nodes-{n_mds}deployments",
        params={"nodes": n_nodes, "deployments": n_mds, "pools": per_pool, "workers": args.workers},
        methods={
            "wattplane": {
                "deployments": float(n_mds),
                "seconds_to_ready": round(took, 3),
                "reconciles_per_s": round(reconciles / took, 3) if took else 0.0,
                "api_requests_per_reconcile": round(requests / reconciles, 3) if reconciles else 0.0,
                "cpu_s": round(end.get("process_cpu_seconds_total", 0.0), 3),
            },
            "direct": {"deployments": float(n_mds), "seconds_to_ready": round(direct_s, 3)},
        },
    )
    return [case]


def _crd_ready(kube: Kube) -> bool:
    try:
        kube.list("ModelDeployment")
        kube.list("AcceleratorPool")
        return True
    except Exception:
        return False


def _leader(port: int) -> bool:
    try:
        return _metrics(port).get("wattplane_leader", 0) == 1
    except OSError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
