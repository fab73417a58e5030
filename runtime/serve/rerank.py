"""Re-ranking and classification routes over a sequence-classification :class:`runtime.Encoder`.

The shapes are the ones re-ranker clients already send:

``POST /v1/rerank`` and ``POST /rerank`` — Cohere's / Jina's / vLLM's re-rank API::

    {"model"?, "query": str, "documents": [str | {"text": str}], "top_n"?: int, "return_documents"?: bool}
    → {"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}], "usage": {"total_tokens"}}

  ``results`` are sorted by ``relevance_score``, highest first, cut to ``top_n``; the score is the
  head's activation of its one logit (sigmoid unless the checkpoint names another), what
  sentence-transformers' ``CrossEncoder.predict`` returns. text-embeddings-inference's own
  ``/rerank`` body (``"texts"`` instead of ``"documents"``, ``raw_scores``, ``return_text``) is
  answered in its shape, a list of ``{"index", "score", "text"?}``.

``POST /v1/score`` — vLLM's score API: ``{"model"?, "text_1": str | [str], "text_2": str | [str]}``
  (one ``text_1`` against every ``text_2``, or pairs of equal lists) → ``{"id", "object": "list",
  "created", "model", "data": [{"index", "object": "score", "score"}], "usage"}``.

``POST /predict`` — text-embeddings-inference's classification API: ``{"inputs": str | [str, str]
  pair | [str | [str, str], …], "raw_scores"?: bool}`` → ``[{"label", "score"}, …]`` (all labels,
  highest first) for one input, a list of those for a batch.

Errors are OpenAI's error body (:class:`runtime.serve.errors.APIError`): 400 for a malformed
request (naming the field), 404 when the served model is not a classifier, 413 for a body over the
limit, 503 while draining. The scoring runs in starlette's thread pool under the
:class:`~runtime.serve.embeddings.EmbeddingService`'s in-flight accounting, like ``/v1/embeddings``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from runtime.errors import GenerationError
from runtime.serve.errors import APIError, from_generation_error, outcome_of
from runtime.serve.protocol import INT64_MAX, _Body, parse_request

__all__ = ["MAX_DOCUMENTS", "RerankRequest", "TEIRerankRequest", "ScoreRequest", "PredictRequest",
           "rerank_routes"]

MAX_DOCUMENTS = 1000  # documents (or pairs) per request: Cohere's limit


class RerankRequest(_Body):
    model: str | None = None
    query: str
    documents: list[Any]
    top_n: int | None = Field(None, ge=1, le=INT64_MAX)
    return_documents: bool = False
    max_chunks_per_doc: int | None = None  # Cohere's; accepted and ignored (one score per document)


class TEIRerankRequest(_Body):
    query: str
    texts: list[Any]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = None


class ScoreRequest(_Body):
    model: str | None = None
    text_1: str | list[Any]
    text_2: str | list[Any]
    encoding_format: Literal["float"] | None = None
    truncate_prompt_tokens: int | None = None


class PredictRequest(_Body):
    inputs: Any
    raw_scores: bool = False
    truncate: bool | None = None


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _texts(values: list[Any], param: str, allow_objects: bool = False) -> list[str]:
    """A list of non-empty strings (or ``{"text": str}`` objects where Cohere allows them)."""
    if not values:
        raise _bad(f"'{param}' is an empty list | expected at least one text", param)
    if len(values) > MAX_DOCUMENTS:
        raise _bad(f"too many {param} | expected at most {MAX_DOCUMENTS} | got {len(values)} "
                   "| split them over several requests", param)
    out = []
    for i, value in enumerate(values):
        if allow_objects and isinstance(value, dict):
            value = value.get("text")
        if not isinstance(value, str):
            expected = 'a string or {"text": string}' if allow_objects else "a string"
            raise _bad(f"'{param}[{i}]' is not a string | expected {expected} | got {type(value).__name__}",
                       param, code="invalid_type")
        if not value.strip():
            raise _bad(f"'{param}[{i}]' is empty | expected a non-empty string", param)
        out.append(value)
    return out


def _query(value: str, param: str = "query") -> str:
    if not value.strip():
        raise _bad(f"'{param}' is empty | expected a non-empty string", param)
    return value


class _Routes:
    """The four handlers; ``state`` is the app's :class:`runtime.serve.app.ServeState`."""

    def __init__(self, state: Any, read_json: Any) -> None:
        self.state = state
        self._read_json = read_json

    def _service(self, route: str) -> Any:
        service = self.state.embeddings
        if service is None or not service.encoder.is_classifier:
            kind = "a decoder (text generation)" if service is None else "an embedding model"
            raise APIError(404, f"the model '{self.state.model_name}' is {kind}, not a re-ranker or classifier "
                                f"| expected a sequence-classification artifact on {route} | serve an artifact "
                                "converted from a *ForSequenceClassification checkpoint (a cross-encoder)",
                           param="model", code="model_not_supported")
        return service

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.state.model_name:
            raise APIError(404, f"the model '{model}' does not exist | expected '{self.state.model_name}' "
                                "| see GET /v1/models", param="model", code="model_not_found")

    async def _scores(self, service: Any, inputs: list[Any], raw: bool) -> tuple[Any, int]:
        if self.state.draining:
            raise APIError(503, "the server is draining (shutting down) | retry on another replica",
                           type="server_error", code="draining",
                           headers={"Retry-After": str(int(self.state.limits.retry_after_s))})
        try:
            scores, stats = await run_in_threadpool(service.run, service.encoder.predict, inputs,
                                                    self.state.limits.embedding_batch_size, raw)
        except GenerationError as exc:
            raise from_generation_error(exc) from None
        return scores, int(stats.tokens)

    async def _answer(self, http: HTTPRequest, endpoint: str, handler: Any) -> Response:
        metrics = self.state.metrics
        try:
            body = await self._read_json(http, self.state.limits.max_body_bytes)
            response = await handler(body)
        except APIError as exc:
            metrics.requests.labels(endpoint, outcome_of(exc.status)).inc()
            raise
        except Exception as exc:  # a bug: a counted 500 with OpenAI's body
            metrics.requests.labels(endpoint, "error").inc()
            raise APIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                           code="internal_error") from exc
        metrics.requests.labels(endpoint, "ok").inc()
        return JSONResponse(response)

    # -- routes ---------------------------------------------------------------------------------

    async def rerank(self, http: HTTPRequest) -> Response:
        return await self._answer(http, "rerank", self._rerank)

    async def _rerank(self, body: Any) -> Any:
        route = "/v1/rerank"
        if isinstance(body, dict) and "texts" in body and "documents" not in body:
            return await self._tei_rerank(body)
        req = parse_request(RerankRequest, body)
        self._check_model(req.model)
        service = self._service(route)
        if len(service.encoder.labels) != 1:
            raise APIError(400, f"the model '{self.state.model_name}' has {len(service.encoder.labels)} labels, "
                                "not one relevance score | expected a re-ranker | use POST /predict to classify",
                           param="model", code="model_not_supported")
        query = _query(req.query)
        documents = _texts(req.documents, "documents", allow_objects=True)
        scores, tokens = await self._scores(service, [(query, d) for d in documents], raw=False)
        order = sorted(range(len(documents)), key=lambda i: -float(scores[i, 0]))[: req.top_n or len(documents)]
        results = []
        for i in order:
            item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i, 0])}
            if req.return_documents:
                item["document"] = {"text": documents[i]}
            results.append(item)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": self.state.model_name, "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _tei_rerank(self, body: Any) -> Any:
        req = parse_request(TEIRerankRequest, body)
        service = self._service("/rerank")
        query = _query(req.query)
        texts = _texts(req.texts, "texts")
        scores, _ = await self._scores(service, [(query, t) for t in texts], raw=req.raw_scores)
        order = sorted(range(len(texts)), key=lambda i: -float(scores[i, 0]))
        return [{"index": i, "score": float(scores[i, 0]), **({"text": texts[i]} if req.return_text else {})}
                for i in order]

    async def score(self, http: HTTPRequest) -> Response:
        return await self._answer(http, "score", self._score)

    async def _score(self, body: Any) -> Any:
        req = parse_request(ScoreRequest, body)
        self._check_model(req.model)
        service = self._service("/v1/score")
        left = [_query(req.text_1, "text_1")] if isinstance(req.text_1, str) else _texts(req.text_1, "text_1")
        right = [_query(req.text_2, "text_2")] if isinstance(req.text_2, str) else _texts(req.text_2, "text_2")
        if len(left) == 1:
            left = left * len(right)
        if len(left) != len(right):
            raise _bad(f"'text_1' and 'text_2' differ in length | expected one text_1, or as many as text_2 "
                       f"| got {len(left)} and {len(right)}", "text_2")
        if len(service.encoder.labels) != 1:
            raise APIError(400, f"the model '{self.state.model_name}' has {len(service.encoder.labels)} labels, "
                                "not one score | use POST /predict to classify", param="model",
                           code="model_not_supported")
        scores, tokens = await self._scores(service, list(zip(left, right)), raw=False)
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": self.state.model_name,
                "data": [{"index": i, "object": "score", "score": float(scores[i, 0])} for i in range(len(left))],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

    async def predict(self, http: HTTPRequest) -> Response:
        return await self._answer(http, "predict", self._predict)

    async def _predict(self, body: Any) -> Any:
        req = parse_request(PredictRequest, body)
        service = self._service("/predict")
        value = req.inputs
        # TEI's reading: a string, or a list of exactly two strings, is one input (a pair); else a batch
        single = isinstance(value, str) or (isinstance(value, list) and len(value) == 2
                                            and all(isinstance(v, str) for v in value))
        items = [value] if single else value
        if not isinstance(items, list):
            raise _bad(f"'inputs' must be a string, a [text, text_pair] pair or a list of them "
                       f"| got {type(value).__name__}", "inputs", code="invalid_type")
        if not items or len(items) > MAX_DOCUMENTS:
            raise _bad(f"'inputs' has {len(items)} items | expected 1 to {MAX_DOCUMENTS}", "inputs")
        inputs: list[Any] = []
        for i, item in enumerate(items):
            parts = [item] if isinstance(item, str) else item
            if not isinstance(parts, list) or len(parts) not in (1, 2) or \
                    not all(isinstance(p, str) and p.strip() for p in parts):
                raise _bad(f"'inputs[{i}]' is not a non-empty string or a pair of them | got {repr(item)[:60]}",
                           "inputs", code="invalid_type")
            inputs.append(parts[0] if len(parts) == 1 else (parts[0], parts[1]))
        scores, _ = await self._scores(service, inputs, raw=req.raw_scores)
        labels = service.encoder.labels
        answers = [sorted(({"label": label, "score": float(s)} for label, s in zip(labels, row)),
                          key=lambda x: -x["score"]) for row in scores]
        return answers[0] if single else answers


def rerank_routes(state: Any, read_json: Any) -> list[tuple[str, Any]]:
    """``(path, handler)`` for ``/v1/rerank``, ``/rerank``, ``/v1/score`` and ``/predict`` (all POST)."""
    routes = _Routes(state, read_json)
    return [("/v1/rerank", routes.rerank), ("/rerank", routes.rerank), ("/v1/score", routes.score),
            ("/predict", routes.predict)]
