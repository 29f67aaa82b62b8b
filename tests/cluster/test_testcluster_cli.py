"""`wattplane testcluster up|env|status|down` from the shell, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wattplane", "testcluster", *args],
                          capture_output=True, text=True, timeout=300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers signal 0; it has exited though
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_up_lists_ready_gpu_nodes_and_down_leaves_no_process(tmp_path: Path) -> None:
    state = tmp_path / "tc"
    up = _cli("up", "--state-dir", str(state), "--nodes", "2", "--pool", "cli-pool", "--gpus", "4")
    assert up.returncode == 0, up.stderr
    kubeconfig = Path(up.stdout.strip().splitlines()[-1])
    assert kubeconfig.exists()
    pids = json.loads((state / "cluster.json").read_text())["pids"]
    try:
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
        assert _cli("status", "--state-dir", str(state)).returncode == 0
        env = _cli("env", "--state-dir", str(state))
        assert env.stdout.strip() == f"export KUBECONFIG={kubeconfig}"
        bin_dir = Path(json.loads((state / "cluster.json").read_text())["bin_dir"])
        nodes = subprocess.run(
            [str(bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", "get", "nodes", "--no-headers",
             "-o", "custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type=='Ready')].status,"
             "GPU:.status.allocatable.nvidia\\.com/gpu"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.split("\n")
        rows = [line.split() for line in nodes if line.strip()]
        assert rows == [["cli-pool-node-000", "True", "4"], ["cli-pool-node-001", "True", "4"]]
        # a second `up` on the same state refuses instead of starting a duplicate
        assert _cli("up", "--state-dir", str(state)).returncode == 1
    finally:
        down = _cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, p in pids.items() if _alive(p)]
    assert not state.exists()
