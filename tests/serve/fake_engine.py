"""A small stand-in for :class:`runtime.Engine` with the same request interface, for the server's tests.

Byte-level "tokenizer" (id = UTF-8 byte); the output of a prompt is deterministic: token ``i`` is
the letter ``(sum(prompt) + i) % 26`` (see :func:`expected_text`). A prompt containing ``FAIL``
makes its request fail after ``fail_after`` tokens with a plain GenerationError, as an
onnxruntime failure would. One thread runs the loop: at most ``max_batch`` requests run, at most
``max_queue`` wait, one token per running request every ``step_s`` seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

from runtime.errors import (
    EngineClosedError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
)
from runtime.request import FinishReason, GenerationResult, Request, TokenEvent

__all__ = ["FakeEngine", "FakeStats", "expected_text", "openai_error"]


def openai_error(r: Any, status: int) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error response with ``status`` (asserted)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def expected_text(prompt_ids: list[int], n: int) -> str:
    base = sum(prompt_ids)
    return "".join(chr(ord("a") + (base + i) % 26) for i in range(n))


@dataclasses.dataclass(frozen=True)
class FakeStats:
    queued: int
    running: int
    max_batch: int
    max_queue: int
    steps: int
    closed: bool


@dataclasses.dataclass(frozen=True)
class _Artifact:
    path: Path


class FakeEngine:
    def __init__(self, max_batch: int = 4, max_queue: int = 8, step_s: float = 0.002, max_context: int = 256,
                 fail_after: int = 2) -> None:
        self.max_batch, self.max_queue, self.step_s = max_batch, max_queue, step_s
        self.max_context, self.vocab, self.fail_after = max_context, 256, fail_after
        self.artifact = _Artifact(Path("/models/fake-model"))
        self.device = "cpu"
        self.chat_template = "fake"
        self.eos_token_ids = frozenset()
        self.submitted: list[Request] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._made: dict[int, int] = {}
        self._lock = threading.Lock()
        self._steps = 0
        self._closing = False
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # -- the Engine interface the server uses ------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self._closing

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        parts = []
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise InvalidRequestError("invalid chat message role", expected="system, user or assistant",
                                          got=repr(m.get("role")))
            parts.append(f"<{m['role']}>{m['content']}")
        return self.encode("".join(parts) + "<assistant>")

    def submit(self, prompt: str | list[int], max_new_tokens: int = 128, sampling: Any = None,
               deadline_s: float | None = None, return_logits: bool = False) -> Request:
        if self._closing:
            raise EngineClosedError("the engine is closed", fix="start a new one")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + max_new_tokens > self.max_context:
            raise InvalidRequestError(
                "prompt too long", expected=f"prompt + max_new_tokens <= max_context {self.max_context}",
                got=f"{len(ids)} prompt tokens + {max_new_tokens} max_new_tokens")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError("queue full", expected=f"at most {self.max_queue} waiting", retry_after_s=2.5)
            req = Request(ids, max_new_tokens, sampling, None, return_logits)
            self._waiting.append(req)
            self.submitted.append(req)
        return req

    def stats(self) -> FakeStats:
        with self._lock:
            return FakeStats(len(self._waiting), len(self._running), self.max_batch, self.max_queue, self._steps,
                             self._closing)

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        self._closing = True
        end = time.monotonic() + timeout
        while drain and time.monotonic() < end:
            with self._lock:
                if not self._waiting and not self._running:
                    break
            time.sleep(0.005)
        self._stop = True
        self._thread.join(5)

    # -- the loop --------------------------------------------------------------------------------

    def _finish(self, req: Request, reason: FinishReason, ids: tuple[int, ...], text: str) -> None:
        made = self._made.pop(req.id, 0)
        now = time.perf_counter()
        full = expected_text(req.prompt_ids, made)
        result = GenerationResult(text=full, token_ids=tuple(ord(c) for c in full), prompt_tokens=len(req.prompt_ids),
                                  new_tokens=made, finish_reason=reason, ttft_s=0.001, decode_tokens_per_s=1.0,
                                  total_s=now - req.submitted, queue_s=0.0005)
        req._push(TokenEvent(ids, text, result, now))

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                while self._waiting and len(self._running) < self.max_batch:
                    self._running.append(self._waiting.popleft())
                running = list(self._running)
            for req in running:
                done = False
                if req.cancelled:
                    self._finish(req, FinishReason.CANCELLED, (), "")
                    done = True
                elif b"FAIL" in bytes(req.prompt_ids) and self._made.get(req.id, 0) >= self.fail_after:
                    self._made.pop(req.id, None)
                    req._fail(GenerationError("onnxruntime failed", got="a simulated failure"))
                    done = True
                else:
                    i = self._made.get(req.id, 0)
                    ch = expected_text(req.prompt_ids, i + 1)[-1]
                    self._made[req.id] = i + 1
                    if i + 1 >= req.max_new_tokens:
                        self._finish(req, FinishReason.LENGTH, (ord(ch),), ch)
                        done = True
                    else:
                        req._push(TokenEvent((ord(ch),), ch, None, time.perf_counter()))
                if done:
                    with self._lock:
                        self._running.remove(req)
            self._steps += 1
            time.sleep(self.step_s)
        with self._lock:
            leftover = [*self._running, *self._waiting]
            self._running.clear()
            self._waiting.clear()
        for req in leftover:
            self._finish(req, FinishReason.CANCELLED, (), "")
