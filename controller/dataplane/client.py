"""The controller's side of the data plane: push routing tables, read offered load.

:class:`HttpRouterPort` implements the executor's ``RouterPort``: each ``SetRoutingShare`` becomes a
versioned table PUT to the router. A 409 (the router already has a newer version) is not an error:
the newer decision stands.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from controller.dataplane.table import DEFAULT_TTL_S, RoutingTable, table_from_action
from policies.plan import SetRoutingShare


class RouterPushError(RuntimeError):
    pass


class HttpRouterPort:
    def __init__(self, base_url: str, ttl_s: float = DEFAULT_TTL_S, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s

    def set_routing_share(self, action: SetRoutingShare) -> None:
        self.push(table_from_action(action, self.ttl_s))

    def push(self, table: RoutingTable) -> bool:
        """True when the router installed it, False when it already had a newer version."""
        req = urllib.request.Request(
            f"{self.base_url}/v1/router/table", data=table.model_dump_json().encode(), method="PUT",
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s):
                return True
        except urllib.error.HTTPError as exc:
            if exc.code == 409:
                return False
            raise RouterPushError(f"router rejected table v{table.version}: {exc.code} {exc.read()[:300]!r}") from exc

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/v1/router/stats", timeout=self.timeout_s) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
