"""Running real controller processes against the test cluster, and waiting on what they do."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from controller.api import crdgen
from controller.kube import Kube, KubeError
from wattplane.testcluster.cluster import free_port

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float = 60.0, interval_s: float = 0.25, what: str = "") -> T:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            value = predicate()
        except KubeError as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate} (last error: {last})")
        time.sleep(interval_s)


def install_crds(kube: Kube, kubectl: Callable[..., Any]) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crdgen.DEFAULT_OUT))
    for name in crdgen.generate():
        plural = name.split("_", 1)[1].removesuffix(".yaml")

        def established(plural: str = plural) -> bool:
            crd = kube.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.wattplane.io")
            return any(c["type"] == "Established" and c["status"] == "True"
                       for c in crd.get("status", {}).get("conditions", []))

        wait_for(established, 30, what=f"CRD {plural} established")
    # discovery of a fresh CRD lags a little behind Established
    wait_for(lambda: kube.list("FleetPolicy") is not None, 30, what="CRD discovery")


class ControllerProcess:
    """``wattplane controller`` as a real process (so it can be SIGKILLed mid-work)."""

    def __init__(self, kubeconfig: Path, log_dir: Path, lease: str, identity: str, *, resync_s: float = 5.0,
                 lease_duration_s: float = 3.0, extra_args: tuple[str, ...] = ()) -> None:
        self.identity = identity
        self.port = free_port()
        self.log_path = log_dir / f"controller-{identity}.log"
        args = [sys.executable, "-m", "wattplane", "controller", "--kubeconfig", str(kubeconfig),
                "--metrics-port", str(self.port), "--lease-name", lease, "--identity", identity,
                "--lease-duration", str(lease_duration_s), "--renew-deadline", str(lease_duration_s * 0.66),
                "--retry-period", "0.3", "--resync", str(resync_s), "--log-level", "INFO",
                "--grpc-host", "127.0.0.1", "--grpc-port", "0", *extra_args]  # with the telemetry hub
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                         start_new_session=True)
        wait_for(lambda: self.get("/healthz")[0] == 200, 30, 0.2, what=f"controller {identity} /healthz")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples whose label text contains ``labels``."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in "{ ") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def is_leader(self) -> bool:
        return self.metric("wattplane_leader") == 1.0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def md_body(name: str, ns: str, pool: str, *, tp: int = 1, pp: int = 1, min_replicas: int = 1,
            max_replicas: int = 10, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "wattplane.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"name": name, "paramsB": 8, "activeParamsB": 8},
            "engine": {"modelPath": f"org/{name}", "terminationGraceS": 0, "cpu": "1", "memory": "1Gi"},
            "parallelism": {"tp": tp, "pp": pp},
            "allowedPools": [pool],
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            **spec,
        },
    }
    return body


def pool_body(name: str, gpus: int = 8, accelerator: str = "H100-80GB") -> dict[str, Any]:
    return {
        "apiVersion": "wattplane.io/v1alpha1",
        "kind": "AcceleratorPool",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"wattplane.io/pool": name},
            "accelerator": {"model": accelerator, "memoryGiB": 80, "bf16Tflops": 989, "hbmGBps": 3350, "tdpW": 700,
                            "minPowerW": 200, "maxPowerW": 700},
            "gpusPerNode": gpus,
        },
    }


def condition(md: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (md.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return {}


def ready(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    md = kube.get("ModelDeployment", name, ns)
    return md if condition(md, "Ready").get("status") == "True" else None


MANAGED = "app.kubernetes.io/managed-by=wattplane"  # label selector of everything the controller manages
