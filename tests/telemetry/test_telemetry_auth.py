"""Authenticators: static tokens, and TokenReview through the official client's request objects."""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes import client

from controller.telemetry.auth import (
    NODE_NAME_EXTRA,
    Identity,
    StaticTokenAuthenticator,
    TokenReviewAuthenticator,
    bearer_token,
)

AGENT_SA = "system:serviceaccount:wattplane-system:wattplane-agent"


class FakeAuthenticationApi:
    """Stands in for ``AuthenticationV1Api``: answers TokenReviews from a table, counts calls."""

    def __init__(self, users: dict[str, tuple[str, str | None]]) -> None:
        self.users = users
        self.reviews: list[client.V1TokenReview] = []

    def create_token_review(self, body: client.V1TokenReview) -> client.V1TokenReview:
        self.reviews.append(body)
        found = self.users.get(body.spec.token)
        if found is None:
            return client.V1TokenReview(spec=body.spec, status=client.V1TokenReviewStatus(authenticated=False))
        user, node = found
        extra: dict[str, Any] = {NODE_NAME_EXTRA: [node]} if node else {}
        info = client.V1UserInfo(username=user, groups=["system:serviceaccounts"], extra=extra)
        return client.V1TokenReview(spec=body.spec, status=client.V1TokenReviewStatus(authenticated=True, user=info))


def test_token_review_maps_users_nodes_and_caches() -> None:
    api = FakeAuthenticationApi(
        {"agent-tok": (AGENT_SA, "gpu-node-7"), "other-tok": ("system:serviceaccount:x:y", None)}
    )
    now = [0.0]
    auth = TokenReviewAuthenticator(
        api=api, audiences=("wattplane",), allowed_users=frozenset({AGENT_SA}), cache_ttl_s=30, clock=lambda: now[0]
    )

    async def body() -> None:
        ident = await auth.authenticate("agent-tok")
        assert ident == Identity(user=AGENT_SA, node="gpu-node-7", groups=("system:serviceaccounts",))
        assert ident.may_report_for("gpu-node-7") and not ident.may_report_for("gpu-node-8")
        assert await auth.authenticate("other-tok") is None  # authenticated, but not an allowed user
        assert await auth.authenticate("forged") is None
        assert await auth.authenticate("agent-tok") == ident
        assert len(api.reviews) == 3, "the repeat was served from the cache"
        now[0] = 31.0
        await auth.authenticate("agent-tok")
        assert len(api.reviews) == 4, "and the cache expires"

    asyncio.run(body())
    assert api.reviews[0].spec.audiences == ["wattplane"]


def test_static_tokens_and_bearer_parsing() -> None:
    auth = StaticTokenAuthenticator({"s3cret": "sim", "bound": Identity(user="a", node="n1")})
    assert asyncio.run(auth.authenticate("s3cret")) == Identity(user="sim")
    assert asyncio.run(auth.authenticate("s3cre")) is None
    assert bearer_token([("authorization", "Bearer abc ")]) == "abc"
    assert bearer_token([("Authorization", b"bearer xyz")]) == "xyz"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None
