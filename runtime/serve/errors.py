"""OpenAI-shaped error bodies, and the one mapping from lmforge's errors to HTTP statuses.

Every refusal the server sends has OpenAI's body, ``{"error": {"message", "type", "param",
"code"}}``, so that OpenAI clients raise their usual exceptions (``BadRequestError``,
``NotFoundError``, ``RateLimitError``, ...). The mapping:

=========================================  ======  ===========================================
cause                                      status  headers
=========================================  ======  ===========================================
bad JSON, wrong types, bad values           400
(int64 / float32 bounds, deep nesting,
lone surrogates, ``n`` past the queue)
:class:`~runtime.errors.InvalidRequestError` 400
missing or wrong API key                    401     ``WWW-Authenticate: Bearer``
unknown model / route                       404
request body over the limit                 413
:class:`~runtime.errors.QueueFullError`      429     ``Retry-After`` (whole seconds, >= 1)
other :class:`~runtime.errors.GenerationError` 500 (that request only)
an unexpected exception (a bug)             500     counted; the connection stays open
:class:`~runtime.errors.EngineClosedError`,  503     ``Retry-After``
draining after SIGTERM
=========================================  ======  ===========================================
"""

from __future__ import annotations

import math
from typing import Any

from runtime.errors import (
    EngineClosedError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
)

__all__ = ["APIError", "error_body", "from_generation_error", "outcome_of"]


class APIError(Exception):
    """An HTTP error the server answers with (status, OpenAI body, extra headers)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object. Text that UTF-8 cannot encode (a lone surrogate a request sent) is
    written as ``\\udXXX`` escapes, so that the error itself can always be sent."""
    return {"error": {"message": _encodable(message), "type": type,
                      "param": None if param is None else _encodable(param), "code": code}}


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def from_generation_error(exc: GenerationError) -> APIError:
    """The HTTP answer to an error raised by ``Engine.submit`` or by a request's iteration."""
    text = str(exc)
    if isinstance(exc, InvalidRequestError):
        code = "context_length_exceeded" if "context" in text else "invalid_value"
        return APIError(400, text, code=code)
    if isinstance(exc, QueueFullError):
        return APIError(429, text, type="rate_limit_error", code="queue_full",
                        headers=_retry_after(getattr(exc, "retry_after_s", 1.0)))
    if isinstance(exc, EngineClosedError):
        return APIError(503, text, type="server_error", code="engine_closed", headers=_retry_after(5.0))
    return APIError(500, f"generation failed: {text}", type="server_error", code="generation_failed")


_OUTCOMES = {400: "invalid", 401: "unauthorized", 404: "not_found", 413: "too_large", 429: "rejected",
             500: "error", 503: "unavailable"}


def outcome_of(status: int) -> str:
    """The ``outcome`` label of ``lmforge_requests_total`` for a refused request."""
    return _OUTCOMES.get(status, "invalid" if 400 <= status < 500 else "error")
