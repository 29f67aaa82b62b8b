"""The shared table store and a replica's cached view of it (no Ray: the Serve wrappers only forward)."""

from __future__ import annotations

from controller.dataplane.store import SharedTable, TableStore
from controller.dataplane.table import RouteReason, RoutingTable


def table(version: int, share: float = 1.0, ttl: float = 10.0) -> str:
    return RoutingTable(version=version, deployment="big", fallback="small", threshold=1e9 if share else -1e9,
                        fallback_share=share, ttl_s=ttl).model_dump_json()


def test_store_keeps_the_newest_version() -> None:
    store = TableStore()
    assert store.offer(table(3), now=0.0) == (True, 3)
    assert store.offer(table(2, share=0.0), now=1.0) == (False, 3)
    assert store.offer(table(3), now=2.0) == (True, 3)  # an equal version refreshes the TTL
    text, age = store.sync("r1", {}, now=5.0)
    assert text is not None and RoutingTable.model_validate_json(text).version == 3
    assert age == 3.0


def test_two_replicas_serve_the_table_pushed_through_either() -> None:
    store = TableStore()
    a, b = SharedTable(refresh_s=0.2), SharedTable(refresh_s=0.2)
    for view in (a, b):
        view.install(*store.sync("x", {}, now=0.0), now=0.0)
        assert view.holder.decide(0.0, 0.0) == (False, RouteReason.NO_TABLE)
    store.offer(table(1, share=1.0), now=1.0)  # pushed through replica a
    assert not b.due(0.1) and b.due(0.2)
    for view in (a, b):
        view.install(*store.sync("x", {}, now=1.0), now=1.0)
        assert view.holder.decide(0.5, 1.0) == (True, RouteReason.BELOW_THRESHOLD)
    store.offer(table(2, share=0.0), now=2.0)  # a newer table pushed through replica b
    for view in (a, b):
        view.install(*store.sync("x", {}, now=2.0), now=2.0)
        assert view.holder.table is not None and view.holder.table.version == 2
        assert view.holder.decide(0.5, 2.0) == (False, RouteReason.ABOVE_THRESHOLD)


def test_staleness_follows_the_store_clock_not_the_replica_clock() -> None:
    store = TableStore()
    store.offer(table(1, ttl=5.0), now=100.0)
    view = SharedTable()
    # this replica's clock reads 7.0 when the store's reads 104.0: the table is 4 s old either way
    view.install(*store.sync("r", {}, now=104.0), now=7.0)
    assert not view.holder.is_stale(7.9)  # 4.9 s old by the store's clock
    assert view.holder.is_stale(8.1)
    # the controller re-pushes the same version: the TTL restarts for every replica
    store.offer(table(1, ttl=5.0), now=106.0)
    view.install(*store.sync("r", {}, now=106.0), now=9.0)
    assert not view.holder.is_stale(13.5)


def test_a_store_that_lost_its_table_does_not_roll_a_replica_back() -> None:
    view = SharedTable()
    view.install(table(5, share=1.0), 0.0, now=0.0)
    view.install(table(1, share=0.0), 0.0, now=1.0)
    assert view.holder.table is not None and view.holder.table.version == 5


def test_stats_sum_over_replicas() -> None:
    store = TableStore()
    store.sync("r1", {"requests": 3, "prompt_tokens": 30, "output_tokens": 12}, now=0.0)
    store.sync("r2", {"requests": 2, "prompt_tokens": 10, "output_tokens": 8}, now=0.0)
    store.sync("r1", {"requests": 4, "prompt_tokens": 40, "output_tokens": 16}, now=1.0)  # cumulative: replaces
    assert store.totals() == {"requests": 6, "prompt_tokens": 50, "output_tokens": 24}
