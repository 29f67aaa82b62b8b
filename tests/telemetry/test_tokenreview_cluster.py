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


def test_sharded_hub_shards_check_agent_tokens_with_their_own_tokenreview_client(test_cluster: TestCluster) -> None:
    """``--hub-shards``: each shard process builds its TokenReview client from the kubeconfig."""
    import functools

    from agents.agent import Agent, AgentConfig
    from agents.sources.simulated import SimulatedSource, constant_load
    from controller.telemetry.auth import token_review_from_kubeconfig
    from controller.telemetry.shards import ShardedHub

    core = client.CoreV1Api(test_cluster.api_client())
    ns = test_cluster.create_namespace(f"shard-{uuid.uuid4().hex[:6]}")
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="agent")))
    token = _token(core, ns, "agent", AGENT_TOKEN_AUDIENCE)
    kubeconfig = str(test_cluster.kubeconfig)
    factory = functools.partial(token_review_from_kubeconfig, kubeconfig, None, (AGENT_TOKEN_AUDIENCE,))

    async def body() -> None:
        hub = ShardedHub(factory, shards=2)
        port = await hub.start()
        agents = [
            Agent(AgentConfig(node_name=name, target=f"127.0.0.1:{port}", token=tok, report_interval_s=0.1,
                              backoff_base_s=0.05, backoff_max_s=0.2),
                  SimulatedSource(gpus=1, load=constant_load(0.1, 0.5), node_name=name))
            for name, tok in (("good", token), ("bad", "not-a-token"))
        ]  # fmt: skip
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 30
            while not ("good" in hub.nodes and hub.rejected["unauthenticated"] >= 1):
                assert loop.time() < end, "the shards did not authenticate through TokenReview"
                await asyncio.sleep(0.1)
            assert "bad" not in hub.nodes and agents[1].connections == 0
            assert hub.nodes["good"].identity.user == f"system:serviceaccount:{ns}:agent"
        finally:
            for a in agents:
                a.stop()
            await asyncio.gather(*tasks)
            await hub.stop()

    asyncio.run(body())
