"""Start and stop a real local Kubernetes control plane on 127.0.0.1 for tests and demos.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as real processes
built from pinned Go modules (``hack/testcluster/build.sh``); kwok plays the kubelets of fake GPU
nodes. No Docker, no network beyond loopback. State lives in a directory of its own (etcd data
in /dev/shm when it exists) and ``stop()`` leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wattplane.testcluster.pki import make_pki

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "testcluster" / "build.sh"
BIN_ENV = "WATTPLANE_TESTCLUSTER_BIN"
KWOK_LABEL = "type=kwok"
POOL_LABEL = "wattplane.io/pool"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class TestClusterError(RuntimeError):
    """The test cluster could not be built or started; the message names the component and its log."""


def find_binaries(build: bool = True) -> Path:
    """Directory holding the cluster binaries: $WATTPLANE_TESTCLUSTER_BIN, else build (cached) them."""
    env = os.environ.get(BIN_ENV)
    if env:
        path = Path(env)
    elif build:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise TestClusterError(f"building the test cluster failed:\n{proc.stderr[-4000:]}")
        path = Path(proc.stdout.strip().splitlines()[-1])
    else:
        raise TestClusterError(f"set {BIN_ENV} or run hack/testcluster/build.sh")
    missing = [c for c in (*COMPONENTS, "kubectl") if not (path / c).exists() and not shutil.which(c)]
    if missing:
        raise TestClusterError(f"{path}: missing binaries {missing}")
    return path


def _kill_me_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG), so a
    segfaulted or killed test process leaves no control plane behind."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


LOW_PORT = 20_000  # the control plane's ports are drawn from [LOW_PORT, the ephemeral range's start)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port(taken: set[int] | None = None) -> int:
    """A free loopback port below the ephemeral range.

    Why not bind to port 0: that port comes from the ephemeral range, and between picking it and the
    component binding it (seconds later, after etcd and the API server start) any outgoing
    connection, such as the API server's to etcd, may take it as its source port: kube-controller-manager
    then died with "address already in use" (seen in CI). Ports below the range are never handed out
    as source ports; a random one is checked by binding it.
    """
    top = _ephemeral_start()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(LOW_PORT, top) if top > LOW_PORT + 100 else 0
        if taken is not None and port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            got = int(s.getsockname()[1])
        if taken is not None:
            taken.add(got)
        return got
    raise TestClusterError("no free loopback port below the ephemeral range")


def stop_process_group(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM a process started with ``start_new_session=True``; SIGKILL its whole group if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class TestCluster:
    """A running local control plane. Use :meth:`start`; always :meth:`stop` (or use as a context manager)."""

    __test__ = False  # not a pytest test class

    state_dir: Path
    bin_dir: Path
    ports: dict[str, int]
    token: str
    pids: dict[str, int] = field(default_factory=dict)
    args: dict[str, list[str]] = field(default_factory=dict)  # each component's command line, for a restart
    etcd_dir: Path | None = None
    owns_state_dir: bool = True
    die_with_parent: bool = False  # tests: a crashed or killed test run takes its cluster with it

    # -- paths ---------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "pki" / "ca.crt"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def binary(self, name: str) -> str:
        p = self.bin_dir / name
        if p.exists():
            return str(p)
        found = shutil.which(name)
        if not found:
            raise TestClusterError(f"binary {name} not found in {self.bin_dir} or PATH")
        return found

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        bin_dir: Path | None = None,
        state_dir: Path | None = None,
        timeout_s: float = 180.0,
        extra_apiserver_args: Iterable[str] = (),
        die_with_parent: bool = False,
    ) -> TestCluster:
        bin_dir = bin_dir or find_binaries()
        owns = state_dir is None
        state = Path(state_dir or tempfile.mkdtemp(prefix="wattplane-testcluster-"))
        state.mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm")
        etcd_dir = Path(tempfile.mkdtemp(prefix="wattplane-etcd-", dir=shm if shm.is_dir() else None))
        taken: set[int] = set()
        ports = {k: free_port(taken) for k in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok")}
        cluster = cls(state, bin_dir, ports, secrets.token_hex(16), etcd_dir=etcd_dir, owns_state_dir=owns,
                      die_with_parent=die_with_parent)
        try:
            cluster._start_all(timeout_s, list(extra_apiserver_args))
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_all(self, timeout_s: float, extra_apiserver_args: list[str]) -> None:
        deadline = time.monotonic() + timeout_s
        pki = make_pki(self.state_dir / "pki")
        (self.state_dir / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        self._write_kubeconfig()
        self._spawn(
            "etcd",
            [
                "--name=wattplane-test",
                f"--data-dir={self.etcd_dir}",
                f"--listen-client-urls=http://127.0.0.1:{self.ports['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{self.ports['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{self.ports['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{self.ports['etcd-peer']}",
                f"--initial-cluster=wattplane-test=http://127.0.0.1:{self.ports['etcd-peer']}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
        )
        self._wait_http(f"http://127.0.0.1:{self.ports['etcd']}/health", deadline, "etcd")
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                f"--secure-port={self.ports['apiserver']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--token-auth-file={self.state_dir / 'tokens.csv'}",
                f"--client-ca-file={pki.ca_cert}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                f"--cert-dir={self.state_dir / 'certs'}",
                "--profiling=false",
                *extra_apiserver_args,
            ],
        )
        self._wait_http(f"{self.server}/readyz", deadline, "kube-apiserver", auth=True)
        kc = str(self.kubeconfig)
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['kcm']}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                "--use-service-account-credentials=false",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                f"--config={self._scheduler_config()}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
            ],
        )
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={kc}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-label-selector={KWOK_LABEL}",
                f"--server-address=127.0.0.1:{self.ports['kwok']}",
                "--cidr=10.244.0.0/16",
                "--node-ip=127.0.0.1",
                "--node-lease-duration-seconds=40",
                f"--config={self._kwok_config()}",
                *(f"--config={f}" for f in self._kwok_stages()),
            ],
        )
        self._wait_default_service_account("default", deadline)
        self._write_state()

    def _kwok_config(self) -> Path:
        path = self.state_dir / "kwok.yaml"
        path.write_text(
            "apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\noptions:\n"
            "  enableCNI: false\n  nodeLeaseParallelism: 16\n  podPlayStageParallelism: 16\n"
            "  nodePlayStageParallelism: 16\n"
        )
        return path

    def _scheduler_config(self) -> Path:
        """Bin-packing on GPUs (NodeResourcesFit MostAllocated), as GPU clusters configure it, so a
        pod re-created after an eviction lands on the fuller node and whole nodes stay free."""
        path = self.state_dir / "scheduler.yaml"
        path.write_text(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n"
            f"clientConnection:\n  kubeconfig: {self.kubeconfig}\n"
            "leaderElection:\n  leaderElect: false\n"
            "profiles:\n- schedulerName: default-scheduler\n  pluginConfig:\n  - name: NodeResourcesFit\n"
            "    args:\n      scoringStrategy:\n        type: MostAllocated\n        resources:\n"
            f"        - {{name: {GPU_RESOURCE}, weight: 5}}\n        - {{name: cpu, weight: 1}}\n"
            "        - {name: memory, weight: 1}\n"
        )
        return path

    def _kwok_stages(self) -> list[Path]:
        """Stage files (node initialise + heartbeat, pod lifecycle) installed by build.sh beside kwok."""
        stages = sorted((self.bin_dir / "kwok-stages").glob("*.yaml"))
        if not stages:
            raise TestClusterError(
                f"no kwok Stage files in {self.bin_dir / 'kwok-stages'} (hack/testcluster/build.sh installs them)"
            )
        return stages

    def _write_kubeconfig(self) -> None:
        import base64

        ca = base64.b64encode((self.state_dir / "pki" / "ca.crt").read_bytes()).decode()
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "wattplane-test", "cluster": {"server": self.server, "certificate-authority-data": ca}}
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "wattplane-test", "context": {"cluster": "wattplane-test", "user": "admin"}}],
            "current-context": "wattplane-test",
        }
        self.kubeconfig.write_text(json.dumps(cfg, indent=2))
        self.kubeconfig.chmod(0o600)

    def _write_state(self) -> None:
        (self.state_dir / "cluster.json").write_text(
            json.dumps(
                {
                    "bin_dir": str(self.bin_dir),
                    "ports": self.ports,
                    "token": self.token,
                    "pids": self.pids,
                    "etcd_dir": str(self.etcd_dir) if self.etcd_dir else None,
                },
                indent=2,
            )
        )

    @classmethod
    def attach(cls, state_dir: Path) -> TestCluster:
        """Re-open a cluster started by another process (``wattplane testcluster up``)."""
        data = json.loads((state_dir / "cluster.json").read_text())
        return cls(
            state_dir=state_dir,
            bin_dir=Path(data["bin_dir"]),
            ports={k: int(v) for k, v in data["ports"].items()},
            token=data["token"],
            pids={k: int(v) for k, v in data["pids"].items()},
            etcd_dir=Path(data["etcd_dir"]) if data.get("etcd_dir") else None,
            owns_state_dir=False,
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        self.args[name] = list(args)
        log = (self.state_dir / "logs").joinpath(f"{name}.log")
        log.parent.mkdir(exist_ok=True)
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                [self.binary(name), *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() kills it whole, Ctrl-C of a test doesn't
                cwd=self.state_dir,
                preexec_fn=_kill_me_with_parent if self.die_with_parent else None,
            )
        self.pids[name] = proc.pid

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.state_dir / "logs" / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _alive(self, name: str) -> bool:
        pid = self.pids.get(name)
        if pid is None:
            return False
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (attached): probe with signal 0
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True
        return waited == 0

    def _wait_http(self, url: str, deadline: float, name: str, auth: bool = False) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file)) if url.startswith("https") else None
        last = ""
        while time.monotonic() < deadline:
            if not self._alive(name):
                raise TestClusterError(f"{name} exited during start-up; log tail:\n{self.log_tail(name)}")
            req = urllib.request.Request(url)
            if auth:
                req.add_header("Authorization", f"Bearer {self.token}")
            try:
                with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except Exception as exc:  # any failure means "not ready yet"
                last = str(exc)
            time.sleep(0.2)
        raise TestClusterError(f"{name} not ready at {url} ({last}); log tail:\n{self.log_tail(name)}")

    def _wait_default_service_account(self, namespace: str, deadline: float) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        while time.monotonic() < deadline:
            for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
                if not self._alive(name):
                    raise TestClusterError(f"{name} exited during start-up; log tail:\n{self.log_tail(name)}")
            with contextlib.suppress(client.ApiException):
                core.read_namespaced_service_account("default", namespace)
                return
            time.sleep(0.2)
        raise TestClusterError(
            f"service account {namespace}/default never appeared; controller-manager log:\n"
            f"{self.log_tail('kube-controller-manager')}"
        )

    def stop(self) -> None:
        """Terminate every process (whole process groups), then remove state. Idempotent."""
        for name in reversed(COMPONENTS):
            pid = self.pids.get(name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name in reversed(COMPONENTS):
            pid = self.pids.get(name)
            if pid is None:
                continue
            while time.monotonic() < deadline and self._alive(name):
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()
        if self.etcd_dir is not None:
            shutil.rmtree(self.etcd_dir, ignore_errors=True)
        if self.owns_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / "cluster.json").unlink()

    # -- faults (chaos tests): one component down and back, same data dir, ports and certificates ----
    def stop_component(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> float:
        """Stop one component (its whole process group); SIGKILL if it outlives ``timeout_s``.
        Returns the seconds it took to exit. The etcd data directory and all state stay."""
        pid = self.pids.pop(name, None)
        if pid is None:
            raise TestClusterError(f"{name} is not running")
        start = time.monotonic()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            try:
                waited, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if waited:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        return time.monotonic() - start

    def start_component(self, name: str, timeout_s: float = 90.0) -> float:
        """Start a stopped component again with its original command line; wait until it serves
        (etcd /health, kube-apiserver /readyz). Returns the seconds that took."""
        if name in self.pids:
            raise TestClusterError(f"{name} is already running")
        if name not in self.args:
            raise TestClusterError(f"{name} was never started by this TestCluster")
        start = time.monotonic()
        self._spawn(name, self.args[name])
        deadline = start + timeout_s
        if name == "etcd":
            self._wait_http(f"http://127.0.0.1:{self.ports['etcd']}/health", deadline, "etcd")
        elif name == "kube-apiserver":
            self._wait_http(f"{self.server}/readyz", deadline, "kube-apiserver", auth=True)
        self._write_state()
        return time.monotonic() - start

    def __enter__(self) -> TestCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------------
    def api_client(self) -> Any:
        """A configured ``kubernetes.client.ApiClient`` (cluster admin)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.api_key = {"authorization": f"Bearer {self.token}"}
        cfg.verify_ssl = True
        return client.ApiClient(cfg)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.binary("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise TestClusterError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def create_namespace(self, name: str, timeout_s: float = 30.0) -> str:
        """Create a namespace and wait for its default service account (pods need it)."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        self._wait_default_service_account(name, time.monotonic() + timeout_s)
        return name

    def add_gpu_nodes(
        self,
        pool: str,
        count: int,
        gpus: int = 8,
        accelerator: str = "H100-80GB",
        cpu: str = "96",
        memory: str = "1Ti",
        labels: Mapping[str, str] | None = None,
        name_prefix: str | None = None,
        wait_ready_s: float = 60.0,
    ) -> list[str]:
        """Create ``count`` kwok-managed fake GPU nodes for ``pool`` and wait until they are Ready."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        prefix = name_prefix or f"{pool}-node"
        names = []
        for i in range(count):
            name = f"{prefix}-{i:03d}"
            node_labels = {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                POOL_LABEL: pool,
                GPU_PRODUCT_LABEL: accelerator,
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.present": "true",  # as NVIDIA GPU feature discovery labels GPU nodes
                **(labels or {}),
            }
            capacity = {
                "cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "1Ti", GPU_RESOURCE: str(gpus)
            }
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": node_labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
                "spec": {},
                "status": {"capacity": capacity, "allocatable": capacity},
            }
            core.create_node(body)
            names.append(name)
        self.wait_nodes_ready(names, wait_ready_s)
        return names

    def wait_nodes_ready(self, names: list[str], timeout_s: float = 60.0) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for node in core.list_node(label_selector=KWOK_LABEL).items:
                conds = {c.type: c.status for c in (node.status.conditions or [])}
                if conds.get("Ready") == "True":
                    pending.discard(node.metadata.name)
            if pending:
                time.sleep(0.3)
        if pending:
            raise TestClusterError(f"nodes not Ready after {timeout_s}s: {sorted(pending)[:5]}; kwok log:\n"
                                   f"{self.log_tail('kwok')}")
