"""One routing table for every router replica: the shared store and each replica's cached view.

Ray Serve runs the router as several replicas behind its proxy; a controller's PUT reaches one of
them. If each replica kept its own table, a push would change routing for one replica's share of
the traffic only, and the others would go stale and fall back to "large only" after the TTL. So
the table lives in one place, :class:`TableStore` (a single-replica Serve deployment in the same
application, so it lives and dies with the router): a PUT on any replica writes to the store (the
version check happens there, once), and every replica re-reads it at most every
``refresh_s`` seconds (:class:`SharedTable`). The store also sums the replicas' offered-load
counters, so ``GET /v1/router/stats`` on any replica gives the whole router's load — the
controller's demand signal must not depend on which replica the proxy picked.

Staleness is measured by the store's clock: it returns the table's *age*, and the replica places
the receipt time on its own monotonic clock (``now - age``), so replicas on other hosts (other
clocks) agree on when a table expires.
"""

from __future__ import annotations

from collections.abc import Mapping

from controller.dataplane.table import RoutingTable, TableHolder

DEFAULT_REFRESH_S = 0.2  # a replica re-reads the shared table at most this often (bounds push -> effect lag)
STAT_KEYS = ("requests", "prompt_tokens", "output_tokens")


class TableStore:
    """The latest routing table (highest version wins) and each router replica's cumulative counters.

    Plain Python: the Serve deployment in ``serve_app.py`` wraps it; tests drive it directly.
    """

    def __init__(self) -> None:
        self.table: RoutingTable | None = None
        self.received_at = 0.0
        self.counters: dict[str, dict[str, int]] = {}

    def offer(self, table_json: str, now: float) -> tuple[bool, int]:
        """(installed?, version in force): refuse older versions, refresh the TTL on an equal one."""
        table = RoutingTable.model_validate_json(table_json)
        if self.table is not None and table.version < self.table.version:
            return False, self.table.version
        self.table = table
        self.received_at = now
        return True, table.version

    def sync(self, replica: str, counters: Mapping[str, int], now: float) -> tuple[str | None, float]:
        """Record ``replica``'s counters; return (the table as JSON or None, its age in seconds)."""
        self.counters[replica] = {k: int(counters.get(k, 0)) for k in STAT_KEYS}
        if self.table is None:
            return None, 0.0
        return self.table.model_dump_json(), max(now - self.received_at, 0.0)

    def totals(self) -> dict[str, int]:
        """Offered load summed over every replica that has reported (cumulative, like each replica's own)."""
        return {k: sum(c[k] for c in self.counters.values()) for k in STAT_KEYS}


class SharedTable:
    """A replica's view of the shared table: a :class:`TableHolder` refreshed from the store.

    The holder keeps its own recent scores (the share -> threshold quantile is per replica: every
    replica sees a sample of the same traffic), while the table and its receipt time come from the
    store. ``due`` says when to re-read; ``install`` applies what the store returned.
    """

    def __init__(self, refresh_s: float = DEFAULT_REFRESH_S) -> None:
        self.holder = TableHolder()
        self.refresh_s = refresh_s
        self.synced_at: float | None = None

    def due(self, now: float) -> bool:
        return self.synced_at is None or now - self.synced_at >= self.refresh_s

    def install(self, table_json: str | None, age_s: float, now: float) -> None:
        self.synced_at = now
        if table_json is None:
            return
        table = RoutingTable.model_validate_json(table_json)
        current = self.holder.table
        if current is not None and table.version < current.version:
            return  # the store lost its table (restarted) and got an older one: keep ours until TTL
        if current is not None and table == current:
            self.holder.received_at = now - age_s  # same table, refreshed TTL; keep the cached threshold
            return
        self.holder.offer(table, now - age_s)
