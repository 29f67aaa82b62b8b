"""List-then-watch caches of API objects, one per kind.

Each informer lists once (taking the list's resourceVersion), then watches from that version with
bookmarks (so a quiet watch still advances its version and a reconnect does not replay history);
a watch that ends is resumed from the last version seen; 410 Gone (the version was compacted
away) means re-list, diff against the cache and report the differences as events, so nothing is
missed. Handlers receive ``(event_type, new, old)`` and must be cheap: they only enqueue keys.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from controller.kube import Kube, KubeError

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any] | None, dict[str, Any] | None], None]


def object_key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else str(meta["name"])


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): re-list."""


class Informer:
    def __init__(self, kube: Kube, kind: str, handler: Handler, *, label_selector: str | None = None,
                 watch_timeout_s: int = 240, on_error: Callable[[str, Exception], None] | None = None) -> None:
        self.kube = kube
        self.kind = kind
        self.handler = handler
        self.label_selector = label_selector
        self.watch_timeout_s = watch_timeout_s
        self.on_error = on_error
        self.store: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self.resource_version = ""
        self.relists = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            return self.store.get(key)

    def items(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.store.values())

    # -- running -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        delay = 0.2
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self.relist()
                    need_list = False
                self._watch_once()
                delay = 0.2
            except Gone:
                log.info("%s watch: resourceVersion %s gone, re-listing", self.kind, self.resource_version)
                need_list = True
            except Exception as exc:  # any failure: back off, resume from the last version
                if self._stop.is_set():
                    return
                if isinstance(exc, KubeError) and exc.status == 410:
                    need_list = True
                    continue
                log.warning("%s watch failed (%s); retrying in %.1fs", self.kind, exc, delay)
                if self.on_error is not None:
                    self.on_error(self.kind, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def relist(self) -> None:
        query: dict[str, Any] = {}
        if self.label_selector:
            query["labelSelector"] = self.label_selector
        doc = self.kube.list(self.kind, **query)
        fresh = {object_key(o): self._stamp(o) for o in doc.get("items", [])}
        with self.lock:
            old = self.store
            self.store = fresh
            self.resource_version = doc["metadata"]["resourceVersion"]
        self.relists += 1
        for key, obj in fresh.items():
            prev = old.get(key)
            if prev is None:
                self.handler("ADDED", obj, None)
            elif prev["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self.handler("MODIFIED", obj, prev)
        for key, prev in old.items():
            if key not in fresh:
                self.handler("DELETED", None, prev)
        self.synced.set()

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj.setdefault("kind", self.kind)  # list items omit kind
        return obj

    def _watch_once(self) -> None:
        for event in self.kube.watch(self.kind, resource_version=self.resource_version,
                                     timeout_s=self.watch_timeout_s, label_selector=self.label_selector,
                                     stop=self._stop):
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone
                raise KubeError(int(obj.get("code", 500)), str(obj.get("message", "")), str(obj.get("reason", "")))
            rv = obj.get("metadata", {}).get("resourceVersion")
            if kind == "BOOKMARK":
                if rv:
                    self.resource_version = rv
                continue
            obj = self._stamp(obj)
            key = object_key(obj)
            with self.lock:
                prev = self.store.get(key)
                if kind == "DELETED":
                    self.store.pop(key, None)
                else:
                    self.store[key] = obj
                if rv:
                    self.resource_version = rv
            self.handler(str(kind), None if kind == "DELETED" else obj, prev if kind != "DELETED" else obj)
            if self._stop.is_set():
                return
