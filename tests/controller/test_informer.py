"""The informer's list-then-watch protocol against a scripted API: bookmarks, resume, 410 -> re-list."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from controller.kube import KubeError
from controller.reconciler.informer import Informer


def obj(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}


class ScriptedKube:
    """Answers list() from ``lists`` and watch() from ``watches`` in order; records the versions asked for."""

    def __init__(self, lists: list[dict[str, Any]], watches: list[list[dict[str, Any]] | Exception]) -> None:
        self.lists = lists
        self.watches = watches
        self.watched_from: list[str] = []
        self.done = threading.Event()

    def list(self, kind: str, **query: Any) -> dict[str, Any]:
        return self.lists.pop(0)

    def watch(self, kind: str, *, resource_version: str, timeout_s: int, label_selector: str | None = None,
              stop: threading.Event | None = None) -> Iterator[dict[str, Any]]:
        self.watched_from.append(resource_version)
        if not self.watches:
            self.done.set()
            assert stop is not None
            stop.wait(5)
            return
        script = self.watches.pop(0)
        if isinstance(script, Exception):
            raise script
        yield from script


def run(kube: ScriptedKube) -> tuple[Informer, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []

    def handler(kind: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        seen.append((kind, (new or old or {})["metadata"]["name"]))

    inf = Informer(kube, "Pod", handler)  # type: ignore[arg-type]
    inf.start()
    assert kube.done.wait(10), "script did not finish"
    inf.stop()
    inf.join(5)
    return inf, seen


def test_watch_resumes_from_bookmarks_and_last_event() -> None:
    kube = ScriptedKube(
        lists=[{"metadata": {"resourceVersion": "10"}, "items": [obj("a", "9")]}],
        watches=[
            [{"type": "ADDED", "object": obj("b", "11")}, {"type": "BOOKMARK", "object": {"metadata": {
                "resourceVersion": "15"}}}],
            [{"type": "MODIFIED", "object": obj("a", "16")}, {"type": "DELETED", "object": obj("b", "17")}],
        ],
    )
    inf, seen = run(kube)
    assert kube.watched_from == ["10", "15", "17"]  # list version, then the bookmark, then the last event
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert set(inf.store) == {"ns/a"} and inf.relists == 1


def test_gone_relists_and_reports_what_changed_meanwhile() -> None:
    kube = ScriptedKube(
        lists=[
            {"metadata": {"resourceVersion": "10"}, "items": [obj("a", "9"), obj("b", "9")]},
            {"metadata": {"resourceVersion": "50"}, "items": [obj("a", "40"), obj("c", "45")]},
        ],
        watches=[[{"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}]],
    )
    inf, seen = run(kube)
    assert kube.watched_from == ["10", "50"]
    assert inf.relists == 2
    # after the re-list: a changed, c appeared, b vanished while we were not watching
    assert seen[2:] == [("MODIFIED", "a"), ("ADDED", "c"), ("DELETED", "b")]
    assert set(inf.store) == {"ns/a", "ns/c"}


def test_http_410_on_watch_start_also_relists() -> None:
    kube = ScriptedKube(
        lists=[{"metadata": {"resourceVersion": "1"}, "items": []},
               {"metadata": {"resourceVersion": "2"}, "items": [obj("x", "2")]}],
        watches=[KubeError(410, "Expired")],
    )
    inf, seen = run(kube)
    assert seen == [("ADDED", "x")] and kube.watched_from == ["1", "2"] and inf.relists == 2
