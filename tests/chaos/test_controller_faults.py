"""The controller killed, paused and cut off from its API server on the real local test cluster.

What each test breaks, and what must hold afterwards (issue 12, part 1):
- SIGKILL at named points of a pass (after the first of several applies, after a delete of a
  group being removed, after the objects but before the status) and at random times, N seeded
  iterations: a restarted controller converges, with no duplicate or orphaned object;
- kube-apiserver and etcd stopped and started (same data, ports, certificates) while the
  controller reconciles a churn of ModelDeployments: the controller process never exits, its
  watches re-list/re-watch, and it converges; no acknowledged spec write is lost;
- the leader SIGSTOPped past its Lease: the standby takes over and acts; on SIGCONT the old
  leader writes nothing (its write fence refuses) and exits; the cluster converges.
Every test prints what it tried and what survived and appends records for ``make chaos``'s table.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.kube import Kube, KubeError
from tests.chaos.cluster_faults import Controller, Want, wait_converged
from tests.chaos.records import ChaosRecorder
from tests.controller.cluster_helpers import md_body, pool_body, wait_for
from wattplane.testcluster import TestCluster

pytestmark = [pytest.mark.chaos, pytest.mark.cluster]
SEED = 12  # the random-kill loop's schedule; change it to explore other interleavings
RANDOM_KILLS = 5


def _uid() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture
def controllers(test_cluster: TestCluster, tmp_path: Path) -> Iterator[Callable[..., Controller]]:
    """Start controllers sharing one Lease (unique to the test); every one is stopped afterwards."""
    lease = f"chaos-{_uid()}"
    procs: list[Controller] = []

    def start(identity: str, **kw: Any) -> Controller:
        c = Controller(test_cluster.kubeconfig, tmp_path, lease, identity, **kw)
        procs.append(c)
        return c

    yield start
    for c in procs:
        c.terminate()


def _pool(cluster: TestCluster, kube: Kube, nodes: int, gpus: int = 8) -> str:
    name = f"c-{_uid()}"
    kube.create("AcceleratorPool", pool_body(name, gpus))
    cluster.add_gpu_nodes(name, nodes, gpus=gpus)
    return name


def _set_replicas(kube: Kube, ns: str, name: str, n: int) -> None:
    """Pin a deployment's replicas (min = max), so the desired state does not depend on demand."""
    kube.patch("ModelDeployment", name, {"spec": {"minReplicas": n, "maxReplicas": n}}, ns)


def _cleanup(kube: Kube, ns: str, controller: Controller) -> None:
    for md in kube.list("ModelDeployment", ns)["items"]:
        kube.delete("ModelDeployment", md["metadata"]["name"], ns)
    wait_for(lambda: not kube.list("ModelDeployment", ns)["items"], 90, what=f"{ns} deleted ({controller.identity})")


def _wait_dead(c: Controller, timeout_s: float = 60.0) -> float:
    start = time.monotonic()
    try:
        c.proc.wait(timeout_s)
    except Exception as exc:
        raise AssertionError(f"armed controller {c.identity} still alive after {timeout_s}s:\n{c.log_tail()}") from exc
    return time.monotonic() - start


# -- 1. SIGKILL at named points, then at random times ----------------------------------------------------------
def test_sigkill_at_named_points_and_random_times_converges_without_duplicates_or_orphans(
        test_cluster: TestCluster, kube: Kube, controllers: Callable[..., Controller], chaos: ChaosRecorder) -> None:
    small = _pool(test_cluster, kube, nodes=5)  # 40 GPUs: room for the churn's worst case (36)
    wide = _pool(test_cluster, kube, nodes=4)
    ns = test_cluster.create_namespace(f"kill-{_uid()}")
    want: dict[str, Want] = {}
    for i in range(8):  # 23 GPUs of 1- and 2-GPU replicas
        name, n = f"m{i}", 1 + i % 3
        kube.create("ModelDeployment", md_body(name, ns, small, tp=1 + i % 2, min_replicas=n, max_replicas=n), ns)
        want[name] = Want(small, n)
    kube.create("ModelDeployment", md_body("wide", ns, wide, tp=8, pp=2, min_replicas=2, max_replicas=2), ns)
    want["wide"] = Want(wide, 2, group_nodes=2)  # 2 pod groups of 2 nodes each (16 GPUs per replica)
    generation = 0

    def armed_then_restarted(fault: str, points: str, change: Callable[[], None], seed: int = 0) -> None:
        nonlocal generation
        generation += 1
        with chaos.attempt(fault) as a:
            change()
            armed = controllers(f"armed-{generation}", faults=points, seed=seed)
            died = _wait_dead(armed)
            fired = armed.fired()
            assert fired, f"{armed.identity} exited without its fault firing:\n{armed.log_tail()}"
            t0 = time.monotonic()
            fresh = controllers(f"restart-{generation}")
            wait_for(fresh.is_leader, 60, what=f"{fresh.identity} leads")
            wait_converged(kube, ns, want, 120, (armed, fresh))
            a.converge_s = time.monotonic() - t0
            a.detail = {"fired": fired, "died_after_s": round(died, 2)}
            print(f"  {fault}: killed at {fired[0]!r} {died:.1f} s after start; restarted controller converged "
                  f"{a.converge_s:.1f} s after its start (incl. waiting out the dead leader's 3 s Lease): no "
                  f"duplicate, no orphan")
            assert fresh.terminate() == 0

    print(f"\nnamespace {ns}: 8 Deployment-shaped models in pool {small}, one 2x2-node pod group in {wide}")
    # a fresh fleet: killed after the 3rd of ~10 server-side applies
    armed_then_restarted("SIGKILL after the 3rd SSA apply of a rollout", "executor.after_apply=3", lambda: None)

    def grow() -> None:
        for name in ("m0", "m3", "m6"):
            _set_replicas(kube, ns, name, 2)
            want[name] = Want(small, 2)

    armed_then_restarted("SIGKILL after objects, before status", "reconcile.before_status=2", grow)

    def shrink_group() -> None:
        _set_replicas(kube, ns, "wide", 1)
        want["wide"] = Want(wide, 1, group_nodes=2)

    # group 1 goes: 2 pods and a Service deleted; killed after the first delete (Service orphan risk)
    armed_then_restarted("SIGKILL after the 1st delete of a group removal", "executor.after_delete=1", shrink_group)

    rng = random.Random(SEED)
    kills: list[str] = []
    for it in range(RANDOM_KILLS):
        for name in rng.sample(sorted(w for w in want if w != "wide"), 3):
            n = rng.randint(1, 3)
            _set_replicas(kube, ns, name, n)
            want[name] = Want(small, n)
        if it % 2 == 0:  # a random point: every apply and every pass may be the last
            points, seed = "executor.after_apply@0.3,reconcile.before_status@0.3", rng.randrange(1 << 30)
            label = "SIGKILL at a random apply or pass (p=0.3 each)"
            armed_then_restarted(label, points, lambda: None, seed)
            kills.append(label)
            continue
        with chaos.attempt("SIGKILL at a random time") as a:
            victim = controllers(f"random-{it}")
            delay = rng.uniform(2.0, 9.0)  # start-up (~3 s of imports), campaign, cache sync and writes
            time.sleep(delay)
            writes = victim.metric("wattplane_executor_writes_total")
            victim.kill()
            t0 = time.monotonic()
            fresh = controllers(f"after-random-{it}")
            wait_for(fresh.is_leader, 60, what=f"{fresh.identity} leads")
            wait_converged(kube, ns, want, 120, (victim, fresh))
            a.converge_s = time.monotonic() - t0
            a.detail = {"after_s": round(delay, 2), "writes_before_kill": writes}
            print(f"  SIGKILL at a random time: {delay:.2f} s after start ({writes:.0f} writes seen by then); "
                  f"restarted controller converged in {a.converge_s:.1f} s")
            assert fresh.terminate() == 0
            kills.append("random time")
    closing = controllers("cleanup")
    _cleanup(kube, ns, closing)


# -- 2. kube-apiserver and etcd stopped and started under load -------------------------------------------------
class Churn:
    """Pins random replica counts on the deployments every ``period_s``, recording what the API server
    acknowledged (the last acknowledged value per deployment is the desired state)."""

    def __init__(self, kube: Kube, ns: str, names: list[str], seed: int, period_s: float = 0.5) -> None:
        self.kube, self.ns, self.names, self.period_s = kube, ns, names, period_s
        self.rng = random.Random(seed)
        self.acked: dict[str, int] = {}
        self.ok = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.period_s):
            name, n = self.rng.choice(self.names), self.rng.randint(1, 3)
            try:
                _set_replicas(self.kube, self.ns, name, n)
            except (KubeError, OSError, Exception):  # the API server is down: the write was not acknowledged
                self.failed += 1
                continue
            self.acked[name] = n
            self.ok += 1


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_api_server_or_etcd_restart_under_churn(test_cluster: TestCluster, kube: Kube,
                                                controllers: Callable[..., Controller], chaos: ChaosRecorder,
                                                component: str) -> None:
    pool = _pool(test_cluster, kube, nodes=3)
    ns = test_cluster.create_namespace(f"{component[:4]}-{_uid()}")
    names = [f"m{i}" for i in range(6)]
    for name in names:
        kube.create("ModelDeployment", md_body(name, ns, pool, tp=1, min_replicas=1, max_replicas=1), ns)
    # a renew deadline longer than the outage: this test is about the informers, not the Lease
    c = controllers("survivor", lease_duration_s=60.0, renew_deadline_s=45.0)
    wait_converged(kube, ns, {n: Want(pool, 1) for n in names}, 90, (c,))
    churn = Churn(kube, ns, names, seed=SEED + len(component))
    churn.thread.start()
    with chaos.attempt(f"{component} SIGKILLed, restarted 5 s later, under churn") as a:
        time.sleep(3.0)
        relists_before = c.metric("wattplane_reconcile_errors_total", 'kind="watch:')
        t_down = time.monotonic()
        down = test_cluster.stop_component(component, signal.SIGKILL)  # a crash: no graceful hand-over
        time.sleep(5.0)
        up = test_cluster.start_component(component)
        if component == "etcd":  # the API server serves again once its etcd client reconnects
            wait_for(lambda: kube.list("ModelDeployment", ns)["items"], 60, what="the API server via etcd")
        outage = time.monotonic() - t_down
        time.sleep(3.0)  # churn goes on after the restart
        churn.stop.set()
        churn.thread.join(10)
        t_steady = time.monotonic()
        spec = {m["metadata"]["name"]: m["spec"]["minReplicas"] for m in kube.list("ModelDeployment", ns)["items"]}
        lost = {n: (v, spec.get(n)) for n, v in churn.acked.items() if spec.get(n) != v}
        a.data_lost = len(lost)
        want = {n: Want(pool, spec[n]) for n in names}
        a.converge_s = wait_converged(kube, ns, want, 120, (c,))
        watch_errors = c.metric("wattplane_reconcile_errors_total", 'kind="watch:') - relists_before
        a.detail = {"acked": churn.ok, "refused": churn.failed, "outage_s": round(outage, 2),
                    "start_s": round(up, 2), "watch_errors": watch_errors}
        print(f"\n{component}: SIGKILLed (gone in {down:.1f} s), started 5 s later, serving {up:.1f} s after that "
              f"(outage {outage:.1f} s); churn "
              f"{churn.ok} spec writes acknowledged, {churn.failed} refused while down; acknowledged writes lost: "
              f"{lost or 0}; controller alive: {c.alive()}, watch errors it retried: {watch_errors:.0f}; "
              f"converged {a.converge_s:.1f} s after the churn stopped ({time.monotonic() - t_steady:.1f} s)")
        assert not lost, f"acknowledged spec writes lost: {lost}"
        assert c.alive(), f"the controller exited:\n{c.log_tail()}"
        assert c.is_leader(), "the controller lost leadership over the outage"
        if component == "kube-apiserver":
            assert watch_errors > 0, "no watch broke: the fault did not reach the controller"
    _cleanup(kube, ns, c)


# -- 3. the leader paused past its Lease ---------------------------------------------------------------------
def test_leader_paused_past_lease_stops_writing_after_resume(test_cluster: TestCluster, kube: Kube,
                                                             controllers: Callable[..., Controller],
                                                             chaos: ChaosRecorder) -> None:
    pool = _pool(test_cluster, kube, nodes=2)
    ns = test_cluster.create_namespace(f"pause-{_uid()}")
    kube.create("ModelDeployment", md_body("x", ns, pool, tp=1, min_replicas=3, max_replicas=3), ns)
    a_ctl = controllers("a")
    wait_for(a_ctl.is_leader, 30, what="a leads")
    b_ctl = controllers("b")
    wait_for(lambda: b_ctl.get("/readyz")[0] == 200, 30, what="b standby ready")
    wait_converged(kube, ns, {"x": Want(pool, 3)}, 90, (a_ctl, b_ctl))
    # record every write to the namespace's Deployment and ModelDeployments while it happens
    seen: list[tuple[float, str, str, Any]] = []
    stop = threading.Event()

    def watch(kind: str) -> None:
        rv = kube.list(kind, ns)["metadata"]["resourceVersion"]
        while not stop.is_set():
            try:
                for ev in kube.watch(kind, resource_version=rv, timeout_s=5, stop=stop):
                    obj = ev["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if obj["metadata"].get("namespace") == ns and ev["type"] != "BOOKMARK":
                        value = (obj.get("spec") or {}).get("replicas") if kind == "Deployment" else \
                            (obj.get("status") or {}).get("desiredReplicas")
                        seen.append((time.monotonic(), kind, obj["metadata"]["name"], value))
            except Exception:
                time.sleep(0.2)

    watchers = [threading.Thread(target=watch, args=(k,), daemon=True) for k in ("Deployment", "ModelDeployment")]
    for w in watchers:
        w.start()
    time.sleep(1.0)
    with chaos.attempt("leader SIGSTOPped past its Lease, then SIGCONT") as at:
        t_stop = time.monotonic()
        a_ctl.signal(signal.SIGSTOP)
        _set_replicas(kube, ns, "x", 1)  # new intent while the leader sleeps: the standby must act on it
        kube.create("ModelDeployment", md_body("y", ns, pool, tp=1, min_replicas=2, max_replicas=2), ns)
        wait_for(b_ctl.is_leader, 30, what="standby takes over")
        took_over = time.monotonic() - t_stop
        at.converge_s = wait_converged(kube, ns, {"x": Want(pool, 1), "y": Want(pool, 2)}, 90, (b_ctl,)) + took_over
        time.sleep(1.0)
        t_cont = time.monotonic()
        a_ctl.signal(signal.SIGCONT)
        code = a_ctl.proc.wait(30)
        exited = time.monotonic() - t_cont
        time.sleep(2.0)  # anything the old leader sent would have landed by now
        stop.set()
        after = [s for s in seen if s[0] >= t_cont]
        stale = [s for s in after if (s[1], s[2], s[3]) in (("Deployment", "x-" + pool, 3),
                                                            ("ModelDeployment", "x", 3))]
        refused = a_ctl.log_count("NotLeader")
        at.detail = {"took_over_s": round(took_over, 2), "old_leader_exit": code, "exited_after_s": round(exited, 2),
                     "writes_after_resume": len(after), "stale_writes": len(stale), "fenced_writes": refused}
        print(f"\nleader a SIGSTOPped; standby b led after {took_over:.1f} s and converged x 3->1, y 0->2 "
              f"{at.converge_s:.1f} s after the stop; a resumed and exited with {code} after {exited:.2f} s; "
              f"writes to the namespace after the resume: {len(after)} ({len(stale)} restoring the old state); "
              f"writes a's fence refused: {refused}")
        assert code == 1, f"the old leader did not exit on losing the Lease:\n{a_ctl.log_tail()}"
        assert not stale, f"the old leader wrote its stale state after resuming: {stale}"
        assert "lost the lease" in a_ctl.log_tail(60) or "could not renew" in a_ctl.log_tail(60)
        wait_converged(kube, ns, {"x": Want(pool, 1), "y": Want(pool, 2)}, 30, (b_ctl,))
        lease = kube.get("Lease", a_ctl_lease(a_ctl), "default")
        assert lease["spec"]["holderIdentity"] == "b"
    _cleanup(kube, ns, b_ctl)


def a_ctl_lease(c: Controller) -> str:
    args = c.proc.args
    assert isinstance(args, list)
    return str(args[args.index("--lease-name") + 1])
