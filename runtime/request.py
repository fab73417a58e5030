"""One request in flight: what a caller holds after :meth:`runtime.Engine.submit`.

The engine's scheduling loop (one thread, :mod:`runtime.engine`) pushes :class:`TokenEvent` s into
the request; the caller reads them from any thread (``for event in request``) or from asyncio
(``async for event in request``), or waits for the end (:meth:`Request.result`). Nothing here
touches the device. A consumer that stops reading early (breaks out of the loop, or closes the
iterator, or cancels its asyncio task) cancels the request, and the loop frees its slot at the
next step boundary. (An ``async for`` left with ``break`` cancels when the event loop finalizes
the iterator; wrap it in ``contextlib.aclosing(aiter(request))`` to cancel at once.)
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from runtime.errors import GenerationError

if TYPE_CHECKING:  # pragma: no cover
    from runtime.sampling import SamplingParams

__all__ = ["FinishReason", "GenerationResult", "TokenEvent", "Request"]

_ids = itertools.count(1)


class FinishReason(str, enum.Enum):
    """Why a request stopped."""

    EOS = "eos"  # sampled one of the manifest's EOS ids
    STOP_TOKEN = "stop_token"  # sampled one of the request's stop_token_ids
    STOP_STRING = "stop_string"  # the text reached one of the request's stop strings
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # the caller cancelled it (or abandoned its stream)
    DEADLINE = "deadline"  # its deadline passed before it finished

    @property
    def openai(self) -> str:
        """OpenAI's ``finish_reason``: ``stop`` for EOS / stop ids / stop strings, else ``length``."""
        return "stop" if self in (FinishReason.EOS, FinishReason.STOP_TOKEN, FinishReason.STOP_STRING) else "length"


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One request's output, counts and timings.

    ``token_ids`` are the new tokens, the final EOS / stop token included (as transformers
    returns them); ``text`` excludes it and is cut before a stop string. ``queue_s`` is the time
    from submission to admission into the running batch; ``ttft_s`` the time from submission to
    the first token on the host; ``decode_tokens_per_s`` counts the tokens after the first over
    the time after it.
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    finish_reason: FinishReason
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    queue_s: float = 0.0
    step_logits: np.ndarray | None = None
    """Only with ``return_logits=True``: the last-position logits of every step, ``[new_tokens, vocab]``
    float32 on the host (row ``t`` is what the token of step ``t`` was chosen from; for parity checks)."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """What one step (or one block of steps) added to a request.

    ``token_ids`` are the new ids (usually one; a block read back at once gives several),
    ``text`` the text that became certain with them (may be empty: an incomplete UTF-8
    sequence, or text held back while it could still be the start of a stop string), and
    ``result`` is set on the request's last event only.
    """

    token_ids: tuple[int, ...]
    text: str
    result: GenerationResult | None = None
    time: float = 0.0  # time.perf_counter() when the loop produced it


class Request:
    """A submitted request; iterate it for its events, or call :meth:`result`.

    Made by :meth:`runtime.Engine.submit` only. Thread-safe: the engine's loop writes, one
    consumer reads (from a thread or from asyncio).
    """

    def __init__(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                 deadline: float | None, return_logits: bool) -> None:
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.deadline = deadline  # time.perf_counter() value, or None
        self.return_logits = return_logits
        self.submitted = time.perf_counter()
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._cond = threading.Condition()
        self._error: GenerationError | None = None
        self._result: GenerationResult | None = None
        self._cancelled = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._callbacks: list[Callable[[], None]] = []
        self._owner: object = None  # the engine, held while the request is in flight

    # -- the loop's side ------------------------------------------------------------------------

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            if event.result is not None:
                self._result = event.result
                self._owner = None
            self._wake()

    def _fail(self, error: GenerationError) -> None:
        with self._cond:
            if self._result is None and self._error is None:
                self._error = error
            self._owner = None
            self._wake()

    def _wake(self) -> None:  # with self._cond held
        self._cond.notify_all()
        for loop, future in self._waiters:
            loop.call_soon_threadsafe(_set_done, future)
        self._waiters.clear()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called (the loop frees the slot at its next step boundary)."""
        return self._cancelled

    # -- the caller's side ----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True when the request finished, failed or was cancelled and released by the loop."""
        with self._cond:
            return self._result is not None or self._error is not None

    def cancel(self) -> None:
        """Stop generating; the request ends with ``FinishReason.CANCELLED`` (idempotent)."""
        self._cancelled = True

    def take(self) -> tuple[list[TokenEvent], GenerationError | None]:
        """Every event waiting (removed from the stream) and the request's error, if it failed;
        never blocks. For a consumer that multiplexes many requests (the server's engine core)."""
        with self._cond:
            events = list(self._events)
            self._events.clear()
            return events, self._error

    def notify(self, callback: Callable[[], None]) -> bool:
        """Call ``callback`` once, from the engine's loop thread, at this request's next event or
        its end. Returns False, registering nothing, when events are already waiting or the
        request has ended: :meth:`take` them now. ``callback`` must be quick and must not block."""
        with self._cond:
            if self._events or self._error is not None or self._result is not None:
                return False
            self._callbacks.append(callback)
            return True

    def _next(self, timeout: float | None) -> TokenEvent | None:
        """The next event, or None at the end; raises the request's error."""
        with self._cond:
            end = None if timeout is None else time.monotonic() + timeout
            while not self._events:
                if self._error is not None:
                    raise self._error
                if self._result is not None:
                    return None
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"request {self.id}: no event within {timeout} s")
                self._cond.wait(left)
            return self._events.popleft()

    def __iter__(self) -> Iterator[TokenEvent]:
        finished = False
        try:
            while True:
                event = self._next(None)
                if event is None:
                    finished = True
                    return
                yield event
                if event.result is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer left early (break, close, exception): free the slot
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        finished = False
        try:
            while True:
                with self._cond:
                    if not self._events and self._error is None and self._result is None:
                        future: asyncio.Future[None] = loop.create_future()
                        self._waiters.append((loop, future))
                    else:
                        future = None  # type: ignore[assignment]
                if future is not None:
                    await future
                    continue
                event = self._next(0)
                if event is None:
                    finished = True
                    return
                yield event
                if event.result is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer's task was cancelled or it stopped reading
                self.cancel()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end (consuming the remaining events) and return the result."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self._next(None if end is None else max(0.0, end - time.monotonic()))
            if event is None or event.result is not None:
                assert self._result is not None
                return self._result


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
