"""The Ray Serve router: OpenAI-compatible endpoints that score each request and dispatch it.

(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type
through Ray Serve's ingress wrapper.)

Routes (one FastAPI ingress):

* ``POST /v1/chat/completions`` and ``POST /v1/completions`` — OpenAI request shapes; malformed
  requests get OpenAI-style 400 errors (``{"error": {"message", "type", "param", "code"}}``). The
  prompt (the last user message, or the completion prompt) is scored by the packaged difficulty
  scorer; the routing table decides large or fallback. Response headers say who served and why:
  ``x-wattplane-served-by``, ``x-wattplane-route-reason``, ``x-wattplane-difficulty``,
  ``x-wattplane-table-version``.
* ``PUT /v1/router/table`` / ``GET /v1/router/table`` — the controller's push (versioned; an older
  version gets 409) and a read-back with staleness.
* ``GET /v1/router/stats`` — cumulative offered load (requests, prompt and output tokens), from
  which the controller derives demand; ``GET /metrics`` — Prometheus text for this replica:
  requests and latency per route (served model) and reason, the table version, errors.

Never drop a request: no or stale table -> large only; a failing model -> the other one. Every
router replica serves the same table: it lives in one :class:`TableStoreDeployment` (see
``store.py``) that a PUT on any replica writes and every replica re-reads at most every
``refresh_s``; the store also sums the replicas' counters for ``/v1/router/stats``. Prometheus
metrics stay per replica (scrape each; the ``x-wattplane-router-replica`` header names it).
"""


import asyncio
import json
import os
import socket
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from controller.dataplane.standin import LatencyModel, StandInEngine, count_tokens
from controller.dataplane.store import DEFAULT_REFRESH_S, SharedTable, TableStore
from controller.dataplane.table import RouteReason, RoutingTable
from policies.difficulty import WEIGHTS_PACKAGE, WEIGHTS_RESOURCE, RouterWeights, Scorer, weights_from_json

app = FastAPI(title="wattplane router")

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
DEFAULT_CHAT_MAX_TOKENS = 64
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_TOKENS_LIMIT = 32768
MAX_BODY_BYTES = 4 << 20  # 4 MiB: ~1M tokens of prompt, past any served context; larger bodies get a 413


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def openai_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
                 ) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": None}})


async def read_bounded(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it is over ``limit`` bytes (declared or streamed): scoring reads the
    whole prompt, so an unbounded body would let one request hold a router replica's CPU."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def load_packaged_weights() -> RouterWeights:
    text = resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_RESOURCE).read_text()
    return weights_from_json(text)


def _max_tokens(body: dict[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        if key in body and body[key] is not None:
            v = body[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_TOKENS_LIMIT:
                raise BadRequest(f"'{key}' must be an integer in [1, {MAX_TOKENS_LIMIT}]", key)
            return v
    return default


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(f"{where}[{i}] must be an object with a 'type'", where)
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where}[{i}].text must be a string", where)
                parts.append(part["text"])
        return "\n".join(parts)
    raise BadRequest(f"{where} must be a string or an array of content parts", where)


def _common(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("you must provide a model parameter", "model")
    if body.get("stream"):
        raise BadRequest("streaming is not supported by this router", "stream")
    return body


def parse_chat(body: Any) -> tuple[str, int, str | None]:
    """(prompt text to score, max tokens, subject hint) of a chat completion request."""
    body = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    texts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(ROLES)}", f"messages[{i}].role")
        texts.append((m["role"], _text_of(m.get("content"), f"messages[{i}].content")))
    users = [t for r, t in texts if r == "user"]
    prompt = users[-1] if users else texts[-1][1]
    return prompt, _max_tokens(body, DEFAULT_CHAT_MAX_TOKENS), _subject(body)


def parse_completion(body: Any) -> tuple[str, int, str | None]:
    body = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (or an array of one string)", "prompt")
    return prompt, _max_tokens(body, DEFAULT_COMPLETION_MAX_TOKENS), _subject(body)


def _subject(body: dict[str, Any]) -> str | None:
    meta = body.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("subject"), str):
        return str(meta["subject"])
    return None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class StandInModel:
    """A model server stand-in (see ``standin.py``); many ongoing requests, it queues internally."""

    def __init__(self, model: LatencyModel) -> None:
        self.engine = StandInEngine(model)

    async def generate(self, prompt: str, max_tokens: int) -> dict[str, object]:
        return await self.engine.generate(prompt, max_tokens)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000, num_replicas=1)
class TableStoreDeployment:
    """The one routing table all router replicas serve (exactly one replica: it is the source of truth)."""

    def __init__(self) -> None:
        self.store = TableStore()

    async def offer(self, table_json: str) -> tuple[bool, int]:
        return self.store.offer(table_json, time.monotonic())

    async def sync(self, replica: str, counters: dict[str, int]) -> tuple[str | None, float]:
        return self.store.sync(replica, counters, time.monotonic())

    async def totals(self) -> dict[str, int]:
        return self.store.totals()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
@serve.ingress(app)
class Router:
    def __init__(
        self, large: DeploymentHandle[Any], small: DeploymentHandle[Any], store: DeploymentHandle[Any],
        deployment: str, fallback: str, weights_json: str | None = None, refresh_s: float = DEFAULT_REFRESH_S,
    ) -> None:
        self.large = large
        self.small = small
        self.store = store
        self.deployment = deployment
        self.fallback = fallback
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.scorer = Scorer(weights_from_json(weights_json) if weights_json else load_packaged_weights())
        self.shared = SharedTable(refresh_s)
        self._syncing = False
        self._loop: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter("wattplane_router_requests", "Requests served, by route (model) and reason",
                                ["route", "reason"], registry=self.registry)
        self.latency = Histogram("wattplane_router_request_seconds", "End-to-end latency by route", ["route"],
                                 registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
        self.errors = Counter("wattplane_router_errors", "Requests rejected or failed, by HTTP status",
                              ["status"], registry=self.registry)
        self.version = Gauge("wattplane_router_table_version", "Routing table version in force (-1: none)",
                             registry=self.registry)
        self.version.set(-1)
        Gauge("wattplane_router_info", "This router replica (metrics are per replica)", ["replica"],
              registry=self.registry).labels(self.replica_id).set(1)
        self.stats = {"requests": 0, "prompt_tokens": 0, "output_tokens": 0}

    # -- OpenAI surface -----------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def _serve(self, request: Request, chat: bool) -> Response:
        start = time.monotonic()
        raw = await read_bounded(request, MAX_BODY_BYTES)
        if raw is None:
            self.errors.labels("413").inc()
            return openai_error(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.errors.labels("400").inc()
            return openai_error(400, f"could not parse the JSON body: {exc}")
        try:
            prompt, max_tokens, subject = parse_chat(body) if chat else parse_completion(body)
        except BadRequest as exc:
            self.errors.labels("400").inc()
            return openai_error(400, str(exc), exc.param)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += count_tokens(prompt)
        self.stats["output_tokens"] += max_tokens
        difficulty = self.scorer.score(prompt, subject)
        await self._refresh()
        use_small, reason = self.shared.holder.decide(difficulty, time.monotonic())
        first, second = (self.small, self.large) if use_small else (self.large, self.small)
        try:
            result = await first.generate.remote(prompt, max_tokens)
        except Exception:  # never drop a request: the other model serves it
            reason = RouteReason.FALLBACK_FAILED if use_small else RouteReason.LARGE_FAILED
            try:
                result = await second.generate.remote(prompt, max_tokens)
            except Exception as exc:
                self.errors.labels("503").inc()
                return openai_error(503, f"no model could serve the request: {exc}", kind="server_error")
        route = str(result["model"])
        elapsed = time.monotonic() - start
        self.requests.labels(route, reason.value).inc()
        self.latency.labels(route).observe(elapsed)
        table = self.shared.holder.table
        headers = {
            "x-wattplane-served-by": route,
            "x-wattplane-route-reason": reason.value,
            "x-wattplane-difficulty": f"{difficulty:.5f}",
            "x-wattplane-table-version": str(table.version if table else -1),
            "x-wattplane-router-replica": self.replica_id,
        }
        usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                 "total_tokens": int(str(result["prompt_tokens"])) + int(str(result["completion_tokens"]))}
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.stats['requests']:x}-{int(start * 1e6) & 0xFFFFFF:x}"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": result["text"]}
        else:
            choice["text"] = result["text"]
        content = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                   "model": route, "choices": [choice], "usage": usage}
        return JSONResponse(content=content, headers=headers)

    # -- the shared table -----------------------------------------------------------------
    async def _refresh(self, force: bool = False) -> None:
        """Re-read the shared table (and report our counters) when due; one read in flight at a time.

        A store that cannot be reached leaves the cached table in force; its TTL still runs, so a
        lost store ends in "large only", never in dropped requests.
        """
        if self._loop is None:  # started lazily: the constructor may run outside the replica's event loop
            self._loop = asyncio.get_running_loop().create_task(self._sync_forever())
        if self._syncing or not (force or self.shared.due(time.monotonic())):
            return
        self._syncing = True
        try:
            table_json, age = await self.store.sync.remote(self.replica_id, dict(self.stats))
            self.shared.install(table_json, age, time.monotonic())
        except Exception:  # the store is down or restarting: keep serving from the cache
            self.shared.synced_at = time.monotonic()
        finally:
            self._syncing = False
        table = self.shared.holder.table
        self.version.set(table.version if table else -1)

    async def _sync_forever(self) -> None:
        """Keep the table and our counters fresh between requests too (an idle replica must not go stale)."""
        while True:
            await asyncio.sleep(self.shared.refresh_s)
            await self._refresh()

    # -- controller surface -------------------------------------------------------------
    @app.put("/v1/router/table")
    async def put_table(self, request: Request) -> Response:
        try:
            table = RoutingTable.model_validate_json(await request.body())
        except ValidationError as exc:
            return openai_error(400, f"bad routing table: {exc.errors()[:3]}")
        if table.deployment != self.deployment or table.fallback != self.fallback:
            return openai_error(400, f"this router serves {self.deployment} -> {self.fallback}, "
                                     f"not {table.deployment} -> {table.fallback}")
        accepted, have = await self.store.offer.remote(table.model_dump_json())
        if not accepted:
            return openai_error(409, f"table version {table.version} is older than {have}", "version", kind="conflict")
        await self._refresh(force=True)
        return JSONResponse(content={"accepted": table.version})

    @app.get("/v1/router/table")
    async def get_table(self) -> Response:
        await self._refresh(force=True)
        holder = self.shared.holder
        table = holder.table
        now = time.monotonic()
        return JSONResponse(content={
            "table": table.model_dump() if table else None,
            "age_s": now - holder.received_at if table else None,
            "stale": holder.is_stale(now),
            "replica": self.replica_id,
        })

    @app.get("/v1/router/stats")
    async def get_stats(self) -> Response:
        """Offered load summed over every router replica (each reports its counters to the store)."""
        await self._refresh(force=True)
        totals: dict[str, int] = await self.store.totals.remote()
        return JSONResponse(content=totals)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(content=generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def build_app(large: LatencyModel, small: LatencyModel, deployment: str, fallback: str,
              weights_json: str | None = None, router_replicas: int = 1, refresh_s: float = DEFAULT_REFRESH_S) -> Any:
    """The application graph: ``router_replicas`` routers -> (large, small) stand-ins, one shared table store."""
    large_app = StandInModel.options(name=f"model-{deployment}").bind(large)  # type: ignore[attr-defined]
    small_app = StandInModel.options(name=f"model-{fallback}").bind(small)  # type: ignore[attr-defined]
    store = TableStoreDeployment.bind()  # type: ignore[attr-defined]
    router = Router.options(num_replicas=router_replicas)  # type: ignore[attr-defined]
    return router.bind(large_app, small_app, store, deployment, fallback, weights_json, refresh_s)
