"""The OpenAI-compatible ASGI app over one :class:`runtime.Engine` or :class:`runtime.Encoder`:
``create_app(engine_or_encoder)``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming with server-sent
events, ``data: [DONE]`` and ``stream_options.include_usage``), ``POST /v1/embeddings`` (an
encoder; :mod:`runtime.serve.embeddings`), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET|HEAD /health`` (live), ``GET|HEAD /ready`` (engine ready and not draining),
``GET /metrics`` (Prometheus text). Each HTTP request submits one engine request per choice
(``n`` choices per prompt, a list of prompts for completions) and reads their events with
``async for``; nothing here blocks the event loop but tokenization, which runs in a thread.

Every route exists for both kinds of model; the ones the served model cannot answer say so with
OpenAI's 404 body (as OpenAI answers a chat request to an embedding model): generation routes on an
encoder, ``/v1/embeddings`` on a decoder.

A client that goes away cancels its requests: while a response has not started, a task watches
the ASGI ``receive`` channel for ``http.disconnect``; once it streams, Starlette cancels the body
iterator, whose cleanup cancels them. With ``n > 1`` and a seed, choice ``j`` uses ``seed + j``
(reproducible, and the choices differ). A sampling field a request leaves out (temperature,
top_p, top_k, min_p, repetition_penalty) takes the artifact's default from its
``generation_config.json`` (:attr:`runtime.Engine.sampling_defaults`, as vLLM's
``--generation-config auto``), else OpenAI's (``temperature`` 1). ``max_tokens`` left out is 16
on ``/v1/completions`` (OpenAI's) and on chat the rest of the context, capped by the artifact's
``max_new_tokens`` and :attr:`ServeLimits.chat_default_max_tokens`.

Hostile input fails its own request only: every integer is bounded by int64 and every float
checked against what float32 holds (:class:`runtime.sampling.SamplingParams`), a body nested
deeper than :data:`MAX_JSON_DEPTH` or holding a lone surrogate is a 400, ``n`` past the engine's
queue is a 400 (it could never be admitted), and an unexpected exception is a 500 that is counted
in ``lmforge_requests_total{outcome="error"}`` and keeps the connection open.

The app does not own the engine: whoever made it closes it (``runtime.serve.server`` does, after
draining). See :mod:`runtime.serve.errors` for the status of each refusal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.encoder import Encoder
from runtime.errors import GenerationError
from runtime.request import FinishReason, Request, TokenEvent
from runtime.sampling import SamplingParams
from runtime.serve.embeddings import EmbeddingService, embedding_inputs, embeddings_response
from runtime.serve.errors import APIError, error_body, from_generation_error, outcome_of
from runtime.serve.metrics import ServeMetrics
from runtime.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    parse_request,
    usage,
)

__all__ = ["ServeLimits", "ServeState", "create_app"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one HTTP request may ask for."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_stop: int = 8  # stop strings per request (OpenAI allows 4)
    max_stop_chars: int = 256  # characters per stop string
    max_choices: int = 16  # prompts × n per request
    completion_default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    # /v1/chat/completions without max_tokens: the rest of the context (vLLM's default), capped by
    # the artifact's max_new_tokens (generation_config.json) where it has one and by this (None:
    # no cap). A small model that never emits EOS would otherwise run to the end of its context.
    chat_default_max_tokens: int | None = 1024
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (runtime.serve.server)
    # Tokens per SSE chunk of a stream (vLLM's --stream-interval): a choice's text is held until
    # this many new tokens arrived, except its first tokens and its last, which go out at once.
    # Each chunk costs the server and the client the same whatever it holds, so on a small CPU,
    # where a step of many requests costs less than streaming each token, holding a few tokens
    # per chunk is what lets HTTP keep up with the engine (docs/serving.md). 1: every event.
    stream_interval: int = 1
    retry_after_s: float = 5.0  # the Retry-After of a 503 while draining
    max_embedding_inputs: int = 2048  # inputs per /v1/embeddings request (OpenAI's limit)
    embedding_batch_size: int = 32  # rows per onnxruntime run inside one embeddings request


class ServeState:
    """What the routes share: the engine, the served name, the limits, the metrics, the drain flag.

    ``engine`` is the :class:`runtime.Engine`, or for an :class:`runtime.Encoder` the
    :class:`~runtime.serve.embeddings.EmbeddingService` around it (``embeddings`` is then that
    service, else None); both have ``ready`` and ``close(drain, timeout)``.
    """

    def __init__(self, engine: Any, model_name: str, api_key: str | None, limits: ServeLimits) -> None:
        self.embeddings: EmbeddingService | None = None
        if isinstance(engine, Encoder):
            engine = EmbeddingService(engine, batch_size=limits.embedding_batch_size)
        if isinstance(engine, EmbeddingService):
            self.embeddings = engine
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.limits = limits
        self.created = int(time.time())
        self.draining = False
        if self.embeddings is not None:
            self.metrics = ServeMetrics(None, lambda: self.draining, endpoints=("embeddings",))
        else:
            self.metrics = ServeMetrics(engine.stats, lambda: self.draining,
                                        core_pid=(lambda: engine.core_pid) if hasattr(engine, "core_pid") else None)

    def start_drain(self) -> None:
        """From now on, generation requests get 503 and ``/ready`` says draining."""
        if not self.draining:
            log.info("draining: new requests get 503")
        self.draining = True

    @property
    def ready(self) -> bool:
        return not self.draining and bool(self.engine.ready)


@dataclasses.dataclass(eq=False)
class _Choice:
    index: int
    request: Request
    prompt_tokens: int
    parts: list[str] = dataclasses.field(default_factory=list)
    new_tokens: int = 0
    last_time: float | None = None
    finish: FinishReason | None = None
    text: str | None = None


class _Events:
    """The events of one HTTP request's choices, merged in arrival order."""

    _END = object()

    def __init__(self, choices: list[_Choice]) -> None:
        self.choices = choices
        self._tasks: list[asyncio.Task[None]] = []
        if len(choices) == 1:
            self._single: AsyncIterator[TokenEvent] | None = choices[0].request.__aiter__()
        else:
            self._single = None
            self._queue: asyncio.Queue[tuple[_Choice, Any]] = asyncio.Queue()
            self._open = len(choices)
            self._tasks = [asyncio.create_task(self._pump(c)) for c in choices]

    async def _pump(self, choice: _Choice) -> None:
        try:
            async for event in choice.request:
                self._queue.put_nowait((choice, event))
        except GenerationError as exc:
            self._queue.put_nowait((choice, exc))
        self._queue.put_nowait((choice, self._END))

    async def next(self) -> tuple[_Choice, TokenEvent] | None:
        """The next event, or None when every choice finished; raises a choice's GenerationError."""
        if self._single is not None:
            try:
                return self.choices[0], await self._single.__anext__()
            except StopAsyncIteration:
                return None
        while self._open:
            choice, item = await self._queue.get()
            if item is self._END:
                self._open -= 1
            elif isinstance(item, GenerationError):
                raise item
            else:
                return choice, item
        return None

    def cancel(self) -> None:
        """Cancel every unfinished request (synchronous: safe inside a cancelled task's cleanup)."""
        for c in self.choices:
            if c.finish is None:
                c.request.cancel()
        for t in self._tasks:
            t.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_json_str: Callable[[str], str] = json.encoder.encode_basestring  # a str as JSON, as json.dumps(ensure_ascii=False)


class _TextChunks:
    """The SSE event of one stream's text delta, ``chunks(index, text)``: the same characters as
    ``_sse(completion_chunk(...))`` / ``_sse(chat_chunk(..., {"content": text}))``, rendered from
    a template made once per stream (the id, model, created and usage fields never change within
    it), so that a chunk costs one string escape, not a dict and a JSON encoding."""

    def __init__(self, chat: bool, rid: str, model: str, created: int, with_usage: bool) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (f'data: {{"id":{_json_str(rid)},"object":"{obj}","created":{int(created)},'
                      f'"model":{_json_str(model)},"choices":[{{"index":')
        self._mid = ',"delta":{"content":' if chat else ',"text":'
        self._tail = (("}" if chat else "") + ',"logprobs":null,"finish_reason":null}]'
                      + (',"usage":null' if with_usage else "") + "}\n\n")

    def __call__(self, index: int, text: str) -> str:
        return f"{self._head}{index}{self._mid}{_json_str(text)}{self._tail}"


async def _read_json(request: HTTPRequest, limit: int) -> Any:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"request body too large | expected at most {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON | {exc}", code="invalid_json") from None
    _check_json(body, surrogates=_SURROGATE_ESCAPE.search(raw) is not None)
    return body


MAX_JSON_DEPTH = 64
"""Nesting levels of arrays and objects a request body may have (the API's own bodies use fewer
than ten); deeper ones are refused before anything walks them recursively."""
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _too_deep() -> APIError:
    return APIError(400, f"the request body is nested too deeply | expected at most {MAX_JSON_DEPTH} levels of "
                         "arrays and objects", code="invalid_json")


def _check_json(body: Any, surrogates: bool) -> None:
    """Refuse a parsed body nested deeper than :data:`MAX_JSON_DEPTH`, or (when the raw body had
    a ``\\uD800``-``\\uDFFF`` escape) holding a lone surrogate: JSON allows the escape, but the
    text is not Unicode and cannot be tokenized or even encoded into an error message. Iterative,
    so a deep body cannot exhaust the stack here either."""
    stack: list[tuple[Any, int, str | None]] = [(body, 0, None)]
    while stack:
        item, depth, top = stack.pop()
        if isinstance(item, str):
            if surrogates and _has_surrogate(item):
                raise APIError(400, f"invalid '{top or 'body'}' | a lone UTF-16 surrogate "
                                    f"({_escaped(item)[:40]}) is not valid Unicode text | expected text whose "
                                    "\\uD800-\\uDFFF escapes come in pairs", param=top, code="invalid_value")
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(item, dict):
            for key, value in item.items():
                stack.append((key, depth + 1, top or key))
                stack.append((value, depth + 1, top or key))
        else:
            stack.extend((value, depth + 1, top) for value in item if isinstance(value, (str, dict, list)))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _ApiKeyMiddleware:
    """Every route but ``/health`` needs ``Authorization: Bearer <key>`` (constant-time compare)."""

    def __init__(self, app: ASGIApp, key: str, state: ServeState) -> None:
        self.app = app
        self.key = key.encode()
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        endpoint = {"/v1/completions": "completions", "/v1/chat/completions": "chat",
                    "/v1/embeddings": "embeddings"}.get(scope["path"])
        if endpoint:
            self.state.metrics.requests.labels(endpoint, "unauthorized").inc()
        what = "missing API key" if not header else "invalid API key"
        response = JSONResponse(
            error_body(f"{what} | expected the header 'Authorization: Bearer <key>' | "
                       "pass the server's --api-key (or $LMFORGE_API_KEY)", code="invalid_api_key"),
            status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def create_app(engine: Any, *, served_model_name: str | None = None, api_key: str | None = None,
               limits: ServeLimits | None = None) -> FastAPI:
    """The ASGI app serving ``engine``; mount it or run it with uvicorn.

    ``engine`` is a :class:`runtime.Engine` (a decoder: completions and chat) or a
    :class:`runtime.Encoder` (an encoder: ``/v1/embeddings``); which one decides the routes that
    answer — the others return OpenAI's 404 body saying what the model is. The app does not own it:
    close it yourself (``runtime.serve.serve`` does, after draining). ``served_model_name``
    defaults to the artifact folder's name; ``api_key`` (if set) is required as a bearer token on
    every route but ``/health``. ``app.state.lmforge`` is the
    :class:`ServeState` (``start_drain()``, ``metrics``).
    """
    name = served_model_name or Path(str(engine.artifact.path)).name
    state = ServeState(engine, name, api_key or None, limits or ServeLimits())
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    if state.api_key:
        app.add_middleware(_ApiKeyMiddleware, key=state.api_key, state=state)
    _install_error_handlers(app)
    server = _Handlers(state)

    app.add_api_route("/health", server.health, methods=["GET", "HEAD"])
    app.add_api_route("/ready", server.ready, methods=["GET", "HEAD"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", server.model, methods=["GET"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_api_route("/v1/embeddings", server.embeddings, methods=["POST"])
    from runtime.serve.rerank import rerank_routes  # re-rankers / classifiers: /v1/rerank, /rerank, /v1/score, /predict

    for path, handler in rerank_routes(state, _read_json):
        app.add_api_route(path, handler, methods=["POST"])
    return app


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: HTTPRequest, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(_: HTTPRequest, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), kind, None, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def validation_error(_: HTTPRequest, exc: Exception) -> Response:
        return JSONResponse(error_body(f"invalid request | {exc}", code="invalid_value"), status_code=400)

    async def unexpected(_: HTTPRequest, exc: Exception) -> Response:
        log.exception("unexpected server error", exc_info=exc)
        return JSONResponse(error_body(f"internal server error | {type(exc).__name__}", "server_error", None,
                                       "internal_error"), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def _internal_error(exc: Exception) -> APIError:
    """The 500 a route answers for an unexpected exception (a bug), logged with its traceback. Raised
    as an :class:`APIError`, it is answered like any other error: counted by the route, and the
    connection stays open (an exception left to Starlette's last handler is re-raised to uvicorn,
    which drops the keep-alive connection)."""
    log.error("unexpected server error", exc_info=exc)
    return APIError(500, f"internal server error | {type(exc).__name__} | this is a bug in lmforge: please report "
                         "it with the server's log", type="server_error", code="internal_error")


class _Handlers:
    def __init__(self, state: ServeState) -> None:
        self.state = state
        self.engine = state.engine
        self.m = state.metrics
        self.defaults: dict[str, Any] = dict(getattr(state.engine, "sampling_defaults", None) or {})

    # -- plain routes --------------------------------------------------------------------------

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def ready(self) -> Response:
        if self.state.ready:
            return JSONResponse({"status": "ready"})
        why = "draining" if self.state.draining else "not ready"
        return JSONResponse({"status": why}, status_code=503)

    async def metrics(self) -> Response:
        body, content_type = self.m.render()
        return Response(body, media_type=content_type)

    def _card(self) -> dict[str, Any]:
        card = {"id": self.state.model_name, "object": "model", "created": self.state.created,
                "owned_by": "lmforge", "max_model_len": int(self.engine.max_context),
                "vocab_size": int(self.engine.vocab)}
        if self.state.embeddings is not None:
            card["embedding_dimensions"] = self.state.embeddings.dim
        return card

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._card()

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.state.model_name:
            raise APIError(404, f"the model '{model}' does not exist | expected '{self.state.model_name}' "
                                "| see GET /v1/models", param="model", code="model_not_found")

    # -- generation ----------------------------------------------------------------------------

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, "completions")

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._generate(request, "chat")

    def _wrong_kind(self, endpoint: str) -> APIError:
        name = self.state.model_name
        if endpoint == "embeddings":
            return APIError(404, f"the model '{name}' is a decoder (text generation) and has no embeddings "
                                 "| expected an encoder artifact on /v1/embeddings | serve an encoder artifact "
                                 "(e.g. `lmforge convert builtin:minilm-l6`) for embeddings, and use "
                                 "/v1/completions or /v1/chat/completions with this one",
                            param="model", code="model_not_supported")
        route = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        return APIError(404, f"the model '{name}' is an encoder (embeddings) and cannot generate text "
                             f"| expected a decoder artifact on {route} | use POST /v1/embeddings with this "
                             "model, or serve a decoder artifact for text generation",
                        param="model", code="model_not_supported")

    async def embeddings(self, http: HTTPRequest) -> Response:
        t0 = time.perf_counter()
        service = self.state.embeddings
        try:
            if service is None:
                raise self._wrong_kind("embeddings")
            body = await _read_json(http, self.state.limits.max_body_bytes)
            req = parse_request(EmbeddingRequest, body)
            self._check_model(req.model)
            if req.dimensions is not None and req.dimensions != service.dim:
                raise APIError(400, f"this model's embeddings have {service.dim} dimensions | expected "
                                    f"'dimensions' unset or {service.dim} | got {req.dimensions} "
                                    "| drop 'dimensions' (this model cannot shorten its embeddings)",
                               param="dimensions", code="invalid_value")
            inputs = embedding_inputs(req.input, self.state.limits.max_embedding_inputs, service.vocab)
            if self.state.draining:
                raise self._draining_error()
            try:
                vectors, tokens = await run_in_threadpool(service.embed, inputs)
            except GenerationError as exc:
                raise from_generation_error(exc) from None
            response = embeddings_response(self.state.model_name, vectors, tokens, req.encoding_format)
        except APIError as exc:
            self.m.requests.labels("embeddings", outcome_of(exc.status)).inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: a counted 500 on a connection kept open
            self.m.requests.labels("embeddings", "error").inc()
            raise _internal_error(exc) from None
        self.m.requests.labels("embeddings", "ok").inc()
        self.m.embedding_inputs.inc(len(inputs))
        self.m.embedding_tokens.inc(tokens)
        self.m.embedding_latency.observe(time.perf_counter() - t0)
        return JSONResponse(response)

    def _draining_error(self) -> APIError:
        return APIError(503, "the server is draining (shutting down) | retry on another replica",
                        type="server_error", code="draining",
                        headers={"Retry-After": str(int(self.state.limits.retry_after_s))})

    async def _generate(self, http: HTTPRequest, endpoint: str) -> Response:
        t0 = time.perf_counter()
        try:
            if self.state.embeddings is not None:
                raise self._wrong_kind(endpoint)
            body = await _read_json(http, self.state.limits.max_body_bytes)
            if endpoint == "chat":
                req = parse_request(ChatCompletionRequest, body)
            else:
                req = parse_request(CompletionRequest, body)
            self._check_model(req.model)
            bad = req.unsupported()
            if bad:
                raise APIError(400, f"'{bad}' is not supported by this server | expected it unset "
                                    "| remove it from the request", param=bad, code="unsupported_parameter")
            stops = self._stops(req.stops())
            prompts = await self._prompt_ids(req, endpoint)
            limit = req.token_limit() if endpoint == "chat" else req.max_tokens
            plan = [(ids, self._max_new(len(ids), limit, endpoint)) for ids in prompts]
            self._check_choices(len(plan), req.n)
            samplings = [self._sampling(req, stops, j) for j in range(req.n)]
            if self.state.draining:
                raise self._draining_error()
            choices = self._submit(plan, samplings)
        except APIError as exc:
            self.m.requests.labels(endpoint, outcome_of(exc.status)).inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: a counted 500 on a connection kept open
            self.m.requests.labels(endpoint, "error").inc()
            raise _internal_error(exc) from None
        rid = new_id("chatcmpl" if endpoint == "chat" else "cmpl")
        try:
            if req.stream:
                return await self._stream(http, endpoint, req, rid, choices, t0)
            return await self._complete(http, endpoint, rid, choices, t0)
        except APIError:
            raise  # counted where it was raised
        except Exception as exc:  # noqa: BLE001 - as above
            self.m.requests.labels(endpoint, "error").inc()
            raise _internal_error(exc) from None

    def _check_choices(self, prompts: int, n: int) -> None:
        """prompts × n within the server's limit, and within the engine's queue: the choices of one
        request are queued together, so more than ``max_queue`` of them could never be admitted
        (a 400 that says so, not a 429 whose retry can never succeed)."""
        limit = self.state.limits.max_choices
        if prompts * n > limit:
            raise APIError(400, f"too many choices | expected prompts × n <= {limit} | got {prompts} × {n}",
                           param="n", code="invalid_value")
        queue = getattr(self.engine, "max_queue", None)
        if isinstance(queue, int) and prompts * n > queue:
            raise APIError(400, f"too many choices for this server's queue | expected prompts × n <= {queue} (the "
                                f"server's --max-queue) | got {prompts} × {n} | lower n, or serve with a larger "
                                "--max-queue", param="n", code="invalid_value")

    def _stops(self, stops: tuple[str, ...]) -> tuple[str, ...]:
        lim = self.state.limits
        if len(stops) > lim.max_stop:
            raise APIError(400, f"too many stop strings | expected at most {lim.max_stop} | got {len(stops)}",
                           param="stop", code="invalid_value")
        for s in stops:
            if not s or len(s) > lim.max_stop_chars:
                raise APIError(400, f"invalid stop string | expected 1 to {lim.max_stop_chars} characters "
                                    f"| got {len(s)}", param="stop", code="invalid_value")
        return stops

    async def _prompt_ids(self, req: Any, endpoint: str) -> list[list[int]]:
        try:
            if endpoint == "chat":
                return [await asyncio.to_thread(self.engine.chat_ids, req.engine_messages())]
            out = []
            for p in req.prompts():
                if isinstance(p, str):
                    ids = await asyncio.to_thread(self.engine.encode, p)
                else:
                    vocab = int(self.engine.vocab)
                    if any(not 0 <= i < vocab for i in p):
                        raise APIError(400, f"invalid token id in prompt | expected ids in [0, {vocab})",
                                       param="prompt", code="invalid_value")
                    ids = list(p)
                if not ids:
                    raise APIError(400, "prompt is empty | expected at least one token", param="prompt",
                                   code="invalid_value")
                out.append(ids)
            return out
        except GenerationError as exc:  # bad messages, no chat template: the request's fault
            raise APIError(400, str(exc), param="messages" if endpoint == "chat" else "prompt",
                           code="invalid_value") from None

    def _max_new(self, prompt_len: int, limit: int | None, endpoint: str) -> int:
        ctx = int(self.engine.max_context)
        if limit is None:
            limit = self._default_max_tokens(prompt_len, endpoint)
        if prompt_len + max(limit, 1) > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens | expected prompt + "
                                f"max_tokens <= {ctx} | got {prompt_len} prompt tokens + {max(limit, 1)} max_tokens "
                                "| shorten the prompt or lower max_tokens", param="messages" if endpoint == "chat"
                           else "prompt", code="context_length_exceeded")
        return limit

    def _default_max_tokens(self, prompt_len: int, endpoint: str) -> int:
        """max_tokens for a request that sets none: OpenAI's 16 on /v1/completions; on chat the
        rest of the context (as vLLM), capped by the artifact's ``max_new_tokens`` and by
        :attr:`ServeLimits.chat_default_max_tokens`. A prompt that fills the context gets 1 (and
        the context-length error)."""
        if endpoint != "chat":
            return self.state.limits.completion_default_max_tokens
        caps = [int(self.engine.max_context) - prompt_len]
        if "max_new_tokens" in self.defaults:
            caps.append(int(self.defaults["max_new_tokens"]))
        if self.state.limits.chat_default_max_tokens:
            caps.append(self.state.limits.chat_default_max_tokens)
        return max(1, min(caps))

    def _sampling(self, req: Any, stops: tuple[str, ...], j: int) -> SamplingParams:
        """Choice ``j``'s parameters: the request's, and for a sampling field it left out the
        artifact's default (:attr:`runtime.Engine.sampling_defaults`), else OpenAI's."""
        seed = None if req.seed is None else (req.seed + j) % 2**63
        given = req.model_fields_set
        values = {name: getattr(req, name) for name in ("temperature", "top_p", "top_k", "min_p",
                                                         "repetition_penalty")}
        values.update({k: v for k, v in self.defaults.items() if k in values and k not in given})
        try:
            return SamplingParams(
                temperature=values["temperature"], top_k=max(values["top_k"], 0), top_p=values["top_p"],
                min_p=values["min_p"], repetition_penalty=values["repetition_penalty"],
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=seed,
                min_new_tokens=req.min_tokens, stop=stops,
            )
        except GenerationError as exc:
            field = exc.what.removeprefix("invalid ")
            param = {"min_new_tokens": "min_tokens", "stop string": "stop"}.get(field, field)
            raise APIError(400, str(exc), param=param if param in type(req).model_fields else None,
                           code="invalid_value") from None

    def _submit(self, plan: list[tuple[list[int], int]], samplings: list[SamplingParams]) -> list[_Choice]:
        choices: list[_Choice] = []
        try:
            for ids, max_new in plan:
                for sampling in samplings:
                    r = self.engine.submit(ids, max_new_tokens=max_new, sampling=sampling)
                    choices.append(_Choice(len(choices), r, len(ids)))
        except GenerationError as exc:
            for c in choices:
                c.request.cancel()
            raise from_generation_error(exc) from None
        for c in choices:
            self.m.prompt_tokens.inc(c.prompt_tokens)
        return choices

    def _observe(self, choice: _Choice, event: TokenEvent) -> None:
        now = event.time or time.perf_counter()
        n = len(event.token_ids)
        if n:
            if choice.last_time is None:
                self.m.ttft.observe(max(0.0, now - choice.request.submitted))
                n_gaps = n - 1
            else:
                n_gaps = n
            if n_gaps and choice.last_time is not None:
                gap = (now - choice.last_time) / n_gaps
                for _ in range(n_gaps):
                    self.m.itl.observe(gap)
            choice.last_time = now
            choice.new_tokens += n
            self.m.generation_tokens.inc(n)
        if event.text:
            choice.parts.append(event.text)
        if event.result is not None:
            choice.finish = event.result.finish_reason
            choice.text = event.result.text
            self.m.queue_wait.observe(event.result.queue_s)

    def _outcome(self, choices: list[_Choice]) -> str:
        reasons = {c.finish for c in choices}
        if FinishReason.CANCELLED in reasons:
            return "cancelled"
        if FinishReason.DEADLINE in reasons:
            return "deadline"
        return "ok"

    def _finished(self, endpoint: str, choices: list[_Choice], t0: float) -> None:
        outcome = self._outcome(choices)
        self.m.requests.labels(endpoint, outcome).inc()
        if outcome != "cancelled":
            self.m.e2e.observe(time.perf_counter() - t0)

    async def _watch(self, receive: Callable[[], Awaitable[Any]], events: _Events) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log.debug("client disconnected: cancelling %d request(s)", len(events.choices))
                events.cancel()
                return

    async def _complete(self, http: HTTPRequest, endpoint: str, rid: str, choices: list[_Choice],
                        t0: float) -> Response:
        events = _Events(choices)
        watcher = asyncio.create_task(self._watch(http.receive, events))
        try:
            while (item := await events.next()) is not None:
                self._observe(*item)
        except GenerationError as exc:  # a split server's refusals arrive here (queue full: 429)
            events.cancel()
            error = from_generation_error(exc)
            self.m.requests.labels(endpoint, outcome_of(error.status)).inc()
            raise error from None
        except BaseException:
            events.cancel()
            raise
        finally:
            watcher.cancel()
        self._finished(endpoint, choices, t0)
        used = usage(sum(c.prompt_tokens for c in choices), sum(c.new_tokens for c in choices))
        out = [("".join(c.parts) if c.text is None else c.text,
                c.finish.openai if c.finish is not None else "stop") for c in choices]
        build = chat_response if endpoint == "chat" else completion_response
        return JSONResponse(build(rid, self.state.model_name, out, used))

    async def _stream(self, http: HTTPRequest, endpoint: str, req: Any, rid: str, choices: list[_Choice],
                      t0: float) -> Response:
        events = _Events(choices)
        watcher = asyncio.create_task(self._watch(http.receive, events))
        try:  # the first event before the headers: a failure before any token is still a plain 500
            first = await events.next()
        except GenerationError as exc:  # a split server's refusals arrive here (queue full: 429)
            events.cancel()
            error = from_generation_error(exc)
            self.m.requests.labels(endpoint, outcome_of(error.status)).inc()
            raise error from None
        except BaseException:
            events.cancel()
            raise
        finally:
            watcher.cancel()
        return StreamingResponse(self._sse(endpoint, req, rid, events, first, t0), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, endpoint: str, req: Any, rid: str, events: _Events,
                   first: tuple[_Choice, TokenEvent] | None, t0: float) -> AsyncIterator[str]:
        """The stream's SSE events. What is ready at once goes out as one body chunk (one write):
        the chat role chunks with the first text, a choice's finish chunk with its last text, the
        usage chunk and ``[DONE]`` with them; each event is still its own ``data:`` line."""
        model, created, with_usage = self.state.model_name, int(time.time()), req.include_usage()
        chat = endpoint == "chat"
        text_chunk = _TextChunks(chat, rid, model, created, with_usage)
        done = False
        out: list[str] = []
        try:
            if chat:
                for c in events.choices:
                    out.append(_sse(chat_chunk(rid, model, created, c.index, {"role": "assistant", "content": ""},
                                               with_usage=with_usage)))
            interval = self.state.limits.stream_interval
            held: dict[int, tuple[list[str], int]] = {}  # choice → text held back, its token count
            sent: set[int] = set()  # choices whose first text went out
            item = first
            while item is not None:
                choice, event = item
                self._observe(choice, event)
                parts, tokens = held.pop(choice.index, ([], 0))
                if event.text:
                    parts.append(event.text)
                tokens += len(event.token_ids)
                if not parts or (choice.index in sent and tokens < interval and choice.finish is None):
                    held[choice.index] = (parts, tokens)  # more tokens into this chunk
                else:
                    sent.add(choice.index)
                    out.append(text_chunk(choice.index, parts[0] if len(parts) == 1 else "".join(parts)))
                if choice.finish is not None:
                    reason = choice.finish.openai
                    out.append(_sse(chat_chunk(rid, model, created, choice.index, {}, reason, with_usage=with_usage)
                                    if chat else
                                    completion_chunk(rid, model, created, choice.index, "", reason,
                                                     with_usage=with_usage)))
                # a single choice that finished: its events are over (the next is None at once),
                # so its last chunks wait for the usage chunk and [DONE], to go out with them
                if out and not (choice.finish is not None and len(events.choices) == 1):
                    yield "".join(out) if len(out) > 1 else out[0]
                    out.clear()
                item = await events.next()
            if with_usage:
                used = usage(sum(c.prompt_tokens for c in events.choices),
                             sum(c.new_tokens for c in events.choices))
                out.append(_sse(chat_chunk(rid, model, created, None, used=used, with_usage=True) if chat else
                                completion_chunk(rid, model, created, None, used=used, with_usage=True)))
            out.append("data: [DONE]\n\n")
            yield "".join(out)
            done = True
            self._finished(endpoint, events.choices, t0)
        except Exception as exc:  # noqa: BLE001 - mid-stream: the status is sent already; an error event ends it
            events.cancel()
            done = True
            self.m.requests.labels(endpoint, "error").inc()
            error = from_generation_error(exc) if isinstance(exc, GenerationError) else _internal_error(exc)
            yield "".join(out) + _sse(error.body()) + "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (task cancelled or iterator closed)
                events.cancel()
                self.m.requests.labels(endpoint, "cancelled").inc()
