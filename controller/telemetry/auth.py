"""Who may stream telemetry: bearer tokens checked by a pluggable authenticator.

In a cluster each agent presents its projected ServiceAccount token and the hub asks the API server
(TokenReview) who it is; in simulation and tests a static token table is enough. Authenticators
only answer "who is this token"; the hub decides what that identity may do (stream for any node
name, or only for the node its token is bound to).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Key the API server puts in TokenReview user.extra for pod-bound tokens (Kubernetes >= 1.30).
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


@dataclass(frozen=True)
class Identity:
    """An authenticated agent: its user name and, when the token is node-bound, its node."""

    user: str
    node: str | None = None
    groups: tuple[str, ...] = ()

    def may_report_for(self, node_name: str) -> bool:
        """A node-bound identity may only report for its own node; an unbound one for any."""
        return self.node is None or self.node == node_name


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Identity | None:
        """The identity behind ``token``, or None when it is not valid."""
        ...


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class StaticTokenAuthenticator:
    """A fixed token table, for simulation and tests: token -> identity (or user name)."""

    def __init__(self, tokens: Mapping[str, Identity | str]) -> None:
        self._tokens = {t: (v if isinstance(v, Identity) else Identity(user=v)) for t, v in tokens.items()}

    async def authenticate(self, token: str) -> Identity | None:
        for known, identity in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return identity
        return None


@dataclass
class _Cached:
    identity: Identity | None
    expires: float


@dataclass
class TokenReviewAuthenticator:
    """Kubernetes TokenReview via the official client's ``AuthenticationV1Api``.

    ``allowed_users`` restricts which ServiceAccounts may stream (e.g.
    ``system:serviceaccount:wattplane-system:wattplane-agent``); empty allows any authenticated
    user. Results (positive and negative) are cached for ``cache_ttl_s`` so a reconnect storm
    after a controller restart does not become a TokenReview storm. The blocking client call runs
    in a worker thread.
    """

    api: Any  # kubernetes.client.AuthenticationV1Api
    audiences: tuple[str, ...] = ()
    allowed_users: frozenset[str] = frozenset()
    cache_ttl_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _cache: dict[str, _Cached] = field(default_factory=dict)

    @classmethod
    def in_cluster(cls, **kwargs: Any) -> TokenReviewAuthenticator:
        """Use the pod's own ServiceAccount to call the API server."""
        from kubernetes import client, config

        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return cls(api=client.AuthenticationV1Api(), **kwargs)

    async def authenticate(self, token: str) -> Identity | None:
        now = self.clock()
        hit = self._cache.get(token)
        if hit is not None and hit.expires > now:
            return hit.identity
        identity = await asyncio.to_thread(self._review, token)
        if len(self._cache) > 10_000:
            self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
        self._cache[token] = _Cached(identity, now + self.cache_ttl_s)
        return identity

    def _review(self, token: str) -> Identity | None:
        from kubernetes import client

        spec = client.V1TokenReviewSpec(token=token, audiences=list(self.audiences) or None)
        review = self.api.create_token_review(client.V1TokenReview(spec=spec))
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            return None
        user = status.user.username or ""
        if self.allowed_users and user not in self.allowed_users:
            return None
        extra = status.user.extra or {}
        node_values = extra.get(NODE_NAME_EXTRA) or []
        return Identity(user=user, node=node_values[0] if node_values else None, groups=tuple(status.user.groups or ()))


def token_review_from_kubeconfig(
    kubeconfig: str | None, context: str | None, audiences: tuple[str, ...]
) -> TokenReviewAuthenticator:
    """A TokenReview authenticator built where it is used: hub shard processes each make their own,
    since API clients do not cross process boundaries (pass this with ``functools.partial``)."""
    from kubernetes import client

    from controller.kube import load_configuration

    api = client.AuthenticationV1Api(client.ApiClient(load_configuration(kubeconfig, context)))
    return TokenReviewAuthenticator(api=api, audiences=audiences)
