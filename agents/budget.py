"""The agent's own view of its PowerDomain's budget, read from the API server, controller or not.

A node's share comes from the controller, computed from the domain budget of that moment. An
operator who lowers the budget (a utility demand-response cut) while the controller is down would
otherwise leave every guard enforcing shares of the old budget until a controller is back. The
agent therefore follows its domain's ``spec.budgetW`` itself (read-only: get/list/watch on
``powerdomains``) and scales its share down when the budget falls (``agents.guard.scaled_share``).

One daemon thread runs the official client's list + watch for a single object (field selector on
its name): the watch resumes from the last resourceVersion when the server ends it, lists again
after ``410 Gone``, and backs off with jitter after errors (never a busy loop). A domain change (the
controller's share names another domain) stops the watch at once and follows the new one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from kubernetes import client, config, watch

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "wattplane.io", "v1alpha1", "powerdomains"
WATCH_TIMEOUT_S = 240  # the server ends each watch after this long; it resumes from the last resourceVersion
REQUEST_TIMEOUT_S = 10.0  # connect/read timeout of the list (the watch's read waits as long as the watch lasts)

# Called with (domain, budget W) when the budget is read or changes; budget None when the object is gone
# or has no readable budget.
BudgetCallback = Callable[[str, "float | None"], None]


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """An API client from a kubeconfig file, or from the pod's ServiceAccount when None (in-cluster)."""
    if kubeconfig is None:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    api: client.ApiClient = config.new_client_from_config(config_file=kubeconfig)
    return api


def budget_of(obj: dict[str, Any]) -> float | None:
    """``spec.budgetW`` as a positive number, else None (an object the CRD should have refused)."""
    value = (obj.get("spec") or {}).get("budgetW")
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return float(value)


class BudgetWatch:
    """Follows one PowerDomain's budget in a thread of its own; ``on_budget`` runs on that thread."""

    def __init__(
        self,
        make_client: Callable[[], client.ApiClient],
        on_budget: BudgetCallback,
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        rng: random.Random | None = None,
    ) -> None:
        self._make_client = make_client
        self._on_budget = on_budget
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._watch_timeout_s = watch_timeout_s
        self._rng = rng or random.Random()
        self._domain = ""
        self._changed = threading.Event()  # domain changed or stop asked: wakes a wait, ends a watch
        self._stopped = False
        self._lock = threading.Lock()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None
        self.errors = 0  # list/watch failures retried (for tests and logs)
        self.watches = 0  # watch requests opened

    @property
    def domain(self) -> str:
        return self._domain

    def follow(self, domain: str) -> None:
        """Watch ``domain`` from now on ("" stops watching); starts the thread on first use."""
        with self._lock:
            if domain == self._domain or self._stopped:
                return
            self._domain = domain
            self._changed.set()
            if self._watch is not None:
                self._watch.stop()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="budget-watch", daemon=True)
                self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stopped = True
            self._changed.set()
            if self._watch is not None:
                self._watch.stop()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    # -- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        api: client.CustomObjectsApi | None = None
        attempt = 0
        while not self._stopped:
            self._changed.clear()
            domain = self._domain
            if not domain:
                self._changed.wait()
                continue
            try:
                if api is None:
                    api = client.CustomObjectsApi(self._make_client())
                self._follow_once(api, domain)
                attempt = 0
            except Exception as exc:  # API server down, Forbidden, network: retry after a backoff
                if self._stopped:
                    return
                if self._changed.is_set():
                    continue  # we closed the watch ourselves to follow another domain
                self.errors += 1
                delay = min(self._backoff_max_s, self._backoff_base_s * 2 ** min(attempt, 16))
                delay = delay / 2 + self._rng.uniform(0, delay / 2)
                attempt += 1
                log.warning("watching PowerDomain %s failed (retry in %.1f s): %s", domain, delay, _short(exc))
                self._changed.wait(delay)

    def _follow_once(self, api: client.CustomObjectsApi, domain: str) -> None:
        """List the domain, publish its budget, then watch it until the domain changes or the
        resourceVersion expires (returns: the caller lists again); errors propagate."""
        selector = f"metadata.name={domain}"
        listed = cast(dict[str, Any], api.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, field_selector=selector, _request_timeout=REQUEST_TIMEOUT_S
        ))
        items = listed.get("items") or []
        self._publish(domain, budget_of(items[0]) if items else None)
        rv = str((listed.get("metadata") or {}).get("resourceVersion") or "")
        while not self._stopped and self._domain == domain:
            w = watch.Watch()
            with self._lock:
                if self._stopped or self._domain != domain:
                    return
                self._watch = w
            self.watches += 1
            opened = time.monotonic()
            events = 0
            try:
                for event in w.stream(
                    api.list_cluster_custom_object, GROUP, VERSION, PLURAL, field_selector=selector,
                    resource_version=rv, timeout_seconds=self._watch_timeout_s, allow_watch_bookmarks=True,
                ):
                    events += 1
                    kind, obj = event.get("type"), event.get("raw_object") or {}
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if kind in ("ADDED", "MODIFIED"):
                        self._publish(domain, budget_of(obj))
                    elif kind == "DELETED":
                        self._publish(domain, None)
            except client.ApiException as exc:
                if exc.status == 410:
                    return  # our resourceVersion is too old: list again
                raise
            finally:
                with self._lock:
                    self._watch = None
            if events == 0 and time.monotonic() - opened < 1.0 and not self._changed.is_set():
                raise RuntimeError("watch ended at once without an event")  # back off, do not spin

    def _publish(self, domain: str, budget_w: float | None) -> None:
        if self._domain != domain or self._stopped:
            return
        try:
            self._on_budget(domain, budget_w)
        except Exception:  # the agent's handler must not end the watch
            log.exception("handling the budget of PowerDomain %s failed", domain)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
