"""``/v1/embeddings`` over one :class:`runtime.Encoder`: the service the app calls, the request's
input checks, and the response in OpenAI's shape.

:class:`EmbeddingService` gives an ``Encoder`` the part of the ``Engine`` interface the server uses
(``artifact``, ``ready``, ``max_context``, ``vocab``, ``close(drain, timeout)``), so the app, its
drain on SIGTERM and ``--instances`` treat both kinds alike. ``embed`` is blocking (tokenize + one
onnxruntime run per length bucket); the app calls it in starlette's thread pool, so the event loop
keeps answering ``/health`` and ``/metrics`` while a batch runs.

Concurrent requests do not share batches: each request's inputs are one ``Encoder.encode`` call
(length-bucketed batches of ``batch_size``), and calls run side by side in threads
(``InferenceSession.run`` is thread-safe). ``Encoder``'s docstring gives the reason it does not
merge callers: on a CPU one batch already keeps every intra-op thread busy; for more throughput
run several pinned instances (``lmforge serve --instances N``).

Input (OpenAI's): a string, a list of strings, one list of token ids, or a list of token-id lists
(special tokens included, as ``Encoder.encode_ids`` takes them). ``encoding_format: "base64"`` is
the float32 vector's little-endian bytes, base64-encoded — what OpenAI's client decodes with
``np.frombuffer(base64.b64decode(s), dtype="float32")``.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from runtime.encoder import Encoder
from runtime.errors import EngineClosedError
from runtime.serve.errors import APIError

__all__ = ["EmbeddingService", "embedding_inputs", "embeddings_response", "encode_vector"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class EmbeddingService:
    """An :class:`Encoder` behind the server: in-flight accounting for the drain, and ``close``."""

    def __init__(self, encoder: Encoder, batch_size: int = 32) -> None:
        self.encoder = encoder
        self.artifact = encoder.artifact
        self.batch_size = batch_size
        self.dim = int(encoder.dim)
        self.max_context = int(encoder.max_length)
        self.vocab = int(encoder.artifact.architecture.get("vocab") or 0)
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closed = False

    @property
    def ready(self) -> bool:
        return not self._closed

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` counted as a call in flight (the drain waits for it); blocking."""
        with self._cond:
            if self._closed:
                raise EngineClosedError("the encoder is closed", fix="retry on another replica")
            self._in_flight += 1
        try:
            return fn(*args)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def embed(self, inputs: list[str] | list[list[int]]) -> tuple[np.ndarray, int]:
        """Pooled embeddings ``[n, dim]`` of ``inputs`` in order and the tokens they had (blocking:
        call it from a worker thread)."""
        if self.encoder.is_classifier:
            raise APIError(404, f"the model '{self.artifact.path.name}' is a re-ranker / classifier and has no "
                                "embeddings | expected an embedding model on /v1/embeddings | use POST /v1/rerank, "
                                "/v1/score or /predict with this model", param="model", code="model_not_supported")
        with self._cond:
            if self._closed:
                raise EngineClosedError("the encoder is closed", fix="retry on another replica")
            self._in_flight += 1
        try:
            if inputs and isinstance(inputs[0], list):
                vectors = self.encoder.encode_ids(inputs, batch_size=self.batch_size)  # type: ignore[arg-type]
                return vectors, sum(min(len(row), self.max_context) for row in inputs)
            result = self.encoder.encode_with_stats(inputs, batch_size=self.batch_size)  # type: ignore[arg-type]
            return result.embeddings, int(result.stats.tokens)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new calls; with ``drain``, wait (up to ``timeout`` s) for calls in flight; close."""
        with self._cond:
            self._closed = True
            if drain:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._in_flight:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        log.warning("closing the encoder with %d call(s) still running", self._in_flight)
                        break
                    self._cond.wait(left)
            idle = self._in_flight == 0
        if idle:
            self.encoder.close()
        else:  # a call still running keeps the session; closing it under the call would fail that call
            log.debug("leaving the encoder open under %d call(s) in flight", self._in_flight)


def _bad(message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param="input", code=code)


def embedding_inputs(value: Any, max_inputs: int, vocab: int) -> list[str] | list[list[int]]:
    """OpenAI's ``input`` as a list of strings or a list of token-id lists; a 400 names what is wrong."""
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        if not value:
            raise _bad("'input' is an empty list | expected at least one string or token array")
        items = [value] if all(is_int(x) for x in value) else value
    else:
        raise _bad(f"'input' must be a string, a list of strings or token arrays | got {type(value).__name__}",
                   code="invalid_type")
    if len(items) > max_inputs:
        raise _bad(f"too many inputs | expected at most {max_inputs} per request | got {len(items)} "
                   "| split them over several requests")
    if all(isinstance(x, str) for x in items):
        for i, text in enumerate(items):
            if not text.strip():
                raise _bad(f"'input[{i}]' is empty | expected a non-empty string | got {text!r}")
        return items
    if all(isinstance(x, list) for x in items):
        for i, row in enumerate(items):
            if not row or not all(is_int(t) for t in row):
                raise _bad(f"'input[{i}]' is not a non-empty list of token ids | expected integers "
                           f"| got {repr(row)[:60]}", code="invalid_type")
            if vocab and any(not 0 <= t < vocab for t in row):
                raise _bad(f"'input[{i}]' has token ids outside the vocabulary | expected 0 <= id < {vocab}")
        return items
    kind = str if isinstance(items[0], str) else list
    first = next(i for i, x in enumerate(items) if not isinstance(x, kind))
    raise _bad(f"'input[{first}]' is a {type(items[first]).__name__} | expected every item a string "
               "(or every item a list of token ids)", code="invalid_type")


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One embedding as a JSON list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32, copy=False).tolist()


def embeddings_response(model: str, vectors: np.ndarray, tokens: int, encoding_format: str) -> dict[str, Any]:
    """OpenAI's ``CreateEmbeddingResponse``: ``data[i]`` is input ``i``'s vector."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_vector(row, encoding_format)}
                 for i, row in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
