"""Agent authentication against the real API server: projected-style tokens checked with TokenReview."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from kubernetes import client

from controller.main import AGENT_TOKEN_AUDIENCE
from controller.telemetry.auth import TokenReviewAuthenticator
from wattplane.testcluster import TestCluster

pytestmark = pytest.mark.cluster


def _token(core: client.CoreV1Api, ns: str, sa: str, audience: str) -> str:
    req = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[audience],
                                                                             expiration_seconds=600))
    return str(core.create_namespaced_service_account_token(sa, ns, req).status.token)


def test_agent_token_for_the_wattplane_audience_authenticates_and_others_do_not(test_cluster: TestCluster) -> None:
    api = test_cluster.api_client()
    core = client.CoreV1Api(api)
    ns = test_cluster.create_namespace(f"auth-{uuid.uuid4().hex[:6]}")
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="agent")))
    user = f"system:serviceaccount:{ns}:agent"
    auth = TokenReviewAuthenticator(api=client.AuthenticationV1Api(api), audiences=(AGENT_TOKEN_AUDIENCE,),
                                    allowed_users=frozenset({user}))

    good = asyncio.run(auth.authenticate(_token(core, ns, "agent", AGENT_TOKEN_AUDIENCE)))
    assert good is not None and good.user == user
    # a token minted for another audience (e.g. the API server's) is not an agent credential
    assert asyncio.run(auth.authenticate(_token(core, ns, "agent", "https://kubernetes.default.svc"))) is None
    assert asyncio.run(auth.authenticate("not-a-token")) is None
    # another ServiceAccount's valid token is refused by the allow-list
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="other")))
    assert asyncio.run(auth.authenticate(_token(core, ns, "other", AGENT_TOKEN_AUDIENCE))) is None
