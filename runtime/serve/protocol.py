"""The OpenAI request bodies the server accepts, and the response objects it returns.

Requests are validated with pydantic in strict mode (a string where a number belongs is a 400,
as OpenAI answers); fields this server does not know are ignored, like ``user``. Fields that
exist in OpenAI's API but cannot be honoured here (``logprobs``, ``tools``, ``echo``, ...) are
refused with a 400 naming the field rather than silently dropped. Extensions, as vLLM names them:
``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``. ``EmbeddingRequest`` is
``/v1/embeddings`` (``dimensions`` is accepted only when it equals the model's width).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.serve.errors import APIError

__all__ = [
    "INT64_MAX",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "StreamOptions",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "new_id",
    "parse_request",
    "usage",
]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


INT64_MAX = 2**63 - 1  # every integer field is bounded by what the engine's int64 inputs hold


class _Sampling(_Body):
    """The fields both endpoints share. Floats refuse NaN and infinity; the finer checks (values
    float32 cannot hold) are :class:`runtime.sampling.SamplingParams`'s, whose errors name the
    field. A sampling field left out of the request takes the artifact's default
    (``generation_config.json``, as vLLM's ``--generation-config auto``), else OpenAI's."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, le=INT64_MAX)  # extension; 0 or -1 = off
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)  # extension
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)  # extension
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)  # extension: no EOS / stop token before this many tokens
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Any] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, le=INT64_MAX)
    logprobs: int | None = Field(None, le=INT64_MAX)

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        if self.logprobs is not None:
            return "logprobs"
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        if self.logit_bias:
            return "logit_bias"
        return None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty | expected a string, strings, or token ids", param="prompt",
                           code="invalid_value")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class _ContentPart(_Body):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` can be served
    (:meth:`ChatMessage.text` refuses the others by their type)."""

    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[_ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; a content part that is not text is a 400 naming its type."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for j, part in enumerate(self.content):
            where = f"messages[{index}].content[{j}]"
            if part.type != "text":
                raise APIError(400, f"{where}: {part.type[:40]!r} content parts are not supported by this server "
                                    "(a text-only model) | expected text parts: "
                                    '{"type": "text", "text": "..."} | send the text alone',
                               param="messages", code="unsupported_content")
            if part.text is None:
                raise APIError(400, f"{where}: a text part without its text | expected "
                                    '{"type": "text", "text": "..."}', param="messages", code="invalid_value")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, le=INT64_MAX)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.logprobs:
            return "logprobs"
        if self.top_logprobs is not None:
            return "top_logprobs"
        if self.tools:
            return "tools"
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return "response_format"
        if self.logit_bias:
            return "logit_bias"
        return None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``; ``input`` is checked by :func:`runtime.serve.embeddings.embedding_inputs`
    (its errors name the item at fault, which a union type's validation error would not)."""

    model: str | None = None
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT64_MAX)
    user: str | None = None


def parse_request(model: type[_Body], body: Any) -> Any:
    """Validate ``body`` (parsed JSON) as ``model``; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object | got {type(body).__name__}",
                       code="invalid_type")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        got = first.get("input")
        got_text = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
        raise APIError(400, f"invalid '{where}' | {first.get('msg', 'invalid value')} | got {got_text}",
                       param=param, code="invalid_type" if "type" in first.get("type", "") else "invalid_value") \
            from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: list[tuple[str, str]], used: dict[str, int],
                        created: int | None = None) -> dict[str, Any]:
    """``choices``: ``(text, finish_reason)`` in index order."""
    return {
        "id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                    for i, (text, reason) in enumerate(choices)],
        "usage": used,
    }


def chat_response(rid: str, model: str, choices: list[tuple[str, str]], used: dict[str, int],
                  created: int | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
        "usage": used,
    }


def completion_chunk(rid: str, model: str, created: int, index: int | None, text: str = "",
                     finish_reason: str | None = None, used: dict[str, int] | None = None,
                     with_usage: bool = False) -> dict[str, Any]:
    """One streamed ``text_completion`` object; ``index=None`` makes the usage-only chunk."""
    chunk: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": [] if index is None else
                             [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = used
    return chunk


def chat_chunk(rid: str, model: str, created: int, index: int | None, delta: dict[str, str] | None = None,
               finish_reason: str | None = None, used: dict[str, int] | None = None,
               with_usage: bool = False) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``index=None`` makes the usage-only chunk."""
    chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [] if index is None else
                             [{"index": index, "delta": delta or {}, "logprobs": None,
                               "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = used
    return chunk
