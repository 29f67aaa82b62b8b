"""A thin JSON client over the official ``kubernetes`` client's transport.

The generated typed APIs deserialize into model objects, which costs CPU and hides the wire form
the controller wants (dicts it can hash, diff and apply). This client keeps the official
configuration, TLS and auth (kubeconfig or in-cluster) and speaks paths and dicts; every request
is counted so the benchmark can report API requests per reconcile.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from kubernetes import client, config

from controller.executor import render as r


class KubeError(Exception):
    """A non-2xx answer from the API server; ``status`` is the HTTP code, ``message`` the server's words."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST tree."""

    group: str  # "" for core
    version: str
    plural: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


RESOURCES: dict[str, Resource] = {
    "Node": Resource("", "v1", "nodes", False),
    "Pod": Resource("", "v1", "pods", True),
    "Service": Resource("", "v1", "services", True),
    "ConfigMap": Resource("", "v1", "configmaps", True),
    "Event": Resource("", "v1", "events", True),
    "Deployment": Resource("apps", "v1", "deployments", True),
    "Lease": Resource("coordination.k8s.io", "v1", "leases", True),
    "PodDisruptionBudget": Resource("policy", "v1", "poddisruptionbudgets", True),
    "AcceleratorPool": Resource("wattplane.io", "v1alpha1", "acceleratorpools", False),
    "PowerDomain": Resource("wattplane.io", "v1alpha1", "powerdomains", False),
    "ModelDeployment": Resource("wattplane.io", "v1alpha1", "modeldeployments", True),
    "FleetPolicy": Resource("wattplane.io", "v1alpha1", "fleetpolicies", False),
}


def load_configuration(kubeconfig: str | Path | None = None, context: str | None = None) -> client.Configuration:
    """Kubeconfig when given (or found), else the in-cluster service account."""
    cfg = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), context=context, client_configuration=cfg)
        return cfg
    try:
        config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            context=context, client_configuration=cfg)
    return cfg


class NotLeader(KubeError):
    """A write refused before it was sent: this instance no longer holds the leader Lease."""

    def __init__(self) -> None:
        super().__init__(0, "this controller no longer holds the leader Lease; write refused", "NotLeader")


class Kube:
    """JSON over the official transport. Thread-safe (urllib3 pool); counts requests by verb."""

    def __init__(self, api_client: client.ApiClient) -> None:
        api_client.configuration.connection_pool_maxsize = max(
            32, api_client.configuration.connection_pool_maxsize or 0
        )
        self.api = client.ApiClient(api_client.configuration)  # own pool with the larger size
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.on_request: Any = None  # optional callback(verb)
        # optional write fence: returns False once this instance must not write (lost or lapsed Lease);
        # Lease requests themselves are exempt (that is how leadership is won and renewed)
        self.may_write: Any = None

    @classmethod
    def from_config(cls, kubeconfig: str | Path | None = None, context: str | None = None) -> Kube:
        return cls(client.ApiClient(load_configuration(kubeconfig, context)))

    def _count(self, verb: str) -> None:
        with self._lock:
            self.requests[verb] = self.requests.get(verb, 0) + 1
        if self.on_request is not None:
            self.on_request(verb)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = 30.0,
        stream: bool = False,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, _, _ = self.api.param_serialize(
            method, path, header_params=headers, auth_settings=["BearerToken"]
        )
        if query:
            url += "?" + urlencode({k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items()})
        if method != "GET" and self.may_write is not None and "/leases" not in path and not self.may_write():
            raise NotLeader
        verb = "watch" if stream else method.lower()
        self._count(verb)
        resp = self.api.rest_client.request(  # type: ignore[no-untyped-call]
            method, url, headers=headers, body=body, _request_timeout=timeout
        )
        if stream and 200 <= resp.status < 300:
            return resp
        data = resp.read()
        if not 200 <= resp.status < 300:
            try:
                doc = json.loads(data)
                raise KubeError(resp.status, doc.get("message", ""), doc.get("reason", ""))
            except (ValueError, AttributeError):
                raise KubeError(resp.status, data.decode(errors="replace")[:500]) from None
        return json.loads(data) if data else {}

    # -- verbs ------------------------------------------------------------------------------
    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        res: dict[str, Any] = self.request("GET", RESOURCES[kind].path(namespace, name))
        return res

    def list(self, kind: str, namespace: str | None = None, **query: Any) -> dict[str, Any]:
        res: dict[str, Any] = self.request("GET", RESOURCES[kind].path(namespace), query=query or None)
        return res

    def create(self, kind: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        res: dict[str, Any] = self.request("POST", RESOURCES[kind].path(namespace), body=body)
        return res

    def replace(self, kind: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        res: dict[str, Any] = self.request("PUT", RESOURCES[kind].path(namespace, body["metadata"]["name"]), body=body)
        return res

    def apply(self, obj: dict[str, Any], *, subresource: str | None = None, force: bool = True) -> dict[str, Any]:
        """Server-side apply with the controller's field manager."""
        meta = obj["metadata"]
        path = RESOURCES[obj["kind"]].path(meta.get("namespace"), meta["name"], subresource)
        res: dict[str, Any] = self.request(
            "PATCH", path, body=obj, content_type="application/apply-patch+yaml",
            query={"fieldManager": r.FIELD_MANAGER, "force": force},
        )
        return res

    def patch(self, kind: str, name: str, patch: Any, namespace: str | None = None, *, subresource: str | None = None,
              content_type: str = "application/merge-patch+json") -> dict[str, Any]:
        res: dict[str, Any] = self.request("PATCH", RESOURCES[kind].path(namespace, name, subresource), body=patch,
                                           content_type=content_type)
        return res

    def delete(self, kind: str, name: str, namespace: str | None = None, *, missing_ok: bool = True,
               propagation: str = "Background") -> None:
        try:
            self.request("DELETE", RESOURCES[kind].path(namespace, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
        except KubeError as exc:
            if not (missing_ok and exc.status == 404):
                raise

    def delete_collection(self, kind: str, namespace: str, label_selector: str) -> None:
        self.request("DELETE", RESOURCES[kind].path(namespace), query={"labelSelector": label_selector},
                     body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})

    def watch(self, kind: str, *, resource_version: str, timeout_s: int, label_selector: str | None = None,
              stop: threading.Event | None = None) -> Iterator[dict[str, Any]]:
        """Watch events (dicts) from ``resource_version``, with bookmarks; ends after ``timeout_s``."""
        query: dict[str, Any] = {"watch": True, "resourceVersion": resource_version, "allowWatchBookmarks": True,
                                 "timeoutSeconds": timeout_s}
        if label_selector:
            query["labelSelector"] = label_selector
        resp = self.request("GET", RESOURCES[kind].path(), query=query, stream=True, timeout=(10, timeout_s + 15))
        buf = b""
        try:
            for chunk in resp.response.stream(65536, decode_content=True):
                if stop is not None and stop.is_set():
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.response.release_conn()


class KubeClusterPort:
    """The executor's ClusterPort against the API server."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def apply(self, obj: dict[str, Any]) -> None:
        self.kube.apply(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.kube.delete(kind, name, namespace)

    def delete_all(self, namespace: str, label_selector: str) -> None:
        for kind in ("Deployment", "Pod", "Service", "ConfigMap"):
            self.kube.delete_collection(kind, namespace, label_selector)
