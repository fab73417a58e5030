"""The front-end's side of a split server: :class:`CoreClient`, an engine-like object over an
engine core process (:mod:`runtime.serve.core`), as vLLM V1's ``AsyncLLM`` is over its ``EngineCore``.

``create_app(CoreClient(...))`` serves it like an in-process :class:`runtime.Engine`: it has the
attributes and methods the app uses (``encode``, ``chat_ids``, ``submit``, ``stats``, ``ready``,
``close``, ``vocab``, ``max_context``, ``max_queue``, ``sampling_defaults``, ``artifact``). The
tokenizer, the chat template, **incremental detokenization and stop strings run here**, in the
front-end's process; the core sends token ids only, a block per request per message.

:meth:`CoreClient.submit` returns a :class:`RemoteRequest` to read with ``async for`` (from one
asyncio event loop: the server's). A refusal by the engine (queue full, invalid values) arrives as
the request's first event and raises there, with the engine's own error class.

**Who reads the core's messages.** A thread reads them until the first request: it takes the
handshake while the client is built, and the heartbeats while no event loop uses the client.
From the first :meth:`~CoreClient.submit` on, the event loop reads them itself: the socket's file
descriptor is one of the loop's readers, and a message's blocks are delivered in the callback
that received it. A second Python thread would contend with the loop for the interpreter lock at
every message and wake the loop through its self-pipe (the vLLM ``AsyncLLM`` reads its
``EngineCore``'s output in the loop for the same reason). The thread stays as the heartbeat
watchdog, and takes the reading back when that loop is closed (``asyncio.run`` per call).

If the core goes silent for ``core_timeout_s`` (it heartbeats every
:data:`runtime.serve.transport.HEARTBEAT_S` seconds), or its parent says it died
(:meth:`core_lost`), or a new core answers, every request in flight fails with
:class:`runtime.errors.EngineClosedError` saying so, and ``ready`` is False until a core answers.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import zmq

from runtime.detokenize import IncrementalDetokenizer, StopStrings
from runtime.engine import EngineStats
from runtime.errors import EngineClosedError, GenerationError, LmforgeError
from runtime.request import FinishReason, GenerationResult, TokenEvent
from runtime.sampling import SamplingParams
from runtime.serve.transport import (
    CANCEL,
    HELLO,
    OUTPUT,
    SUBMIT,
    Addresses,
    error_from_wire,
    pack,
    sampling_to_wire,
    unpack,
)
from runtime.tokenizer import TextHelpers

__all__ = ["CoreClient", "RemoteRequest"]

log = logging.getLogger(__name__)

_STOPPED_BY_TOKEN = (FinishReason.EOS.value, FinishReason.STOP_TOKEN.value)


class RemoteRequest:
    """One request in a core process, read here (``async for event in request``); like
    :class:`runtime.request.Request`, leaving the loop early cancels it."""

    def __init__(self, client: CoreClient, rid: int, prompt_ids: list[int], max_new_tokens: int,
                 sampling: SamplingParams) -> None:
        self.id = rid
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.submitted = time.perf_counter()
        self._client = client
        tokenizer = client.tokenizer
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self._stops = StopStrings(sampling.stop)
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: GenerationError | None = None
        self._result: GenerationResult | None = None
        self._new_ids: list[int] = []
        self._t_first = 0.0
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def cancel(self) -> None:
        """Stop generating (idempotent); the core frees the slot at its next step boundary."""
        if not self._cancelled and not self.done:
            self._cancelled = True
            self._client._cancel(self.id)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: GenerationError) -> None:
        if not self.done:
            self._error = error
            self._client._forget(self.id)
            self._wake()

    def _deliver(self, ids: list[int], finish: str | None, queue_s: float, now: float) -> None:
        """A block of new ids from the core (the event loop's thread): text, stop strings, an event."""
        if self.done:
            return
        if not self._new_ids and ids:
            self._t_first = now
        last = len(ids) - 1 if finish in _STOPPED_BY_TOKEN else -1  # the stop token has no text
        accepted: list[int] = []
        text = ""
        reason = None
        for i, token in enumerate(ids):
            accepted.append(token)
            if i == last:
                break
            if self._detok is not None:
                text += self._stops.add(self._detok.push(token))
                if self._stops.stopped:
                    reason = FinishReason.STOP_STRING
                    break
        self._new_ids.extend(accepted)
        if reason is None and finish is not None:
            reason = FinishReason(finish)
        if reason is None:
            if accepted or text:
                self._events.append(TokenEvent(tuple(accepted), text, None, now))
            self._wake()
            return
        if finish is None:  # a stop string ended it here: the core would go on
            self._client._cancel(self.id)
        if self._detok is not None and reason is not FinishReason.STOP_STRING:
            text += self._stops.add(self._detok.flush())
            if self._stops.stopped:
                reason = FinishReason.STOP_STRING
            text += self._stops.finish()
        n = len(self._new_ids)
        decode_s = now - self._t_first
        self._result = GenerationResult(
            text=self._stops.text, token_ids=tuple(self._new_ids), prompt_tokens=len(self.prompt_ids), new_tokens=n,
            finish_reason=reason, ttft_s=(self._t_first or now) - self.submitted,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=now - self.submitted, queue_s=queue_s)
        self._events.append(TokenEvent(tuple(accepted), text, self._result, now))
        self._client._forget(self.id)
        self._wake()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                while not self._events:
                    if self._error is not None:
                        raise self._error
                    if self._result is not None:
                        finished = True
                        return
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
                    self._waiter = None
                event = self._events.popleft()
                if self._events:  # the reader fell behind: one event (one SSE chunk) for all it missed
                    event = _merge(event, self._events)
                yield event
                if event.result is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel()


def _merge(first: TokenEvent, rest: collections.deque[TokenEvent]) -> TokenEvent:
    """``first`` and every event queued after it as one (ids and text joined; the last one's result)."""
    ids, parts = list(first.token_ids), [first.text]
    last = first
    while rest:
        last = rest.popleft()
        ids.extend(last.token_ids)
        parts.append(last.text)
    return TokenEvent(tuple(ids), "".join(parts), last.result, last.time)


@dataclasses.dataclass(frozen=True)
class _Artifact:
    path: str


class CoreClient(TextHelpers):
    """An engine core process reached at ``addresses`` as front-end number ``frontend``.

    Blocks until the core answers (``connect_timeout_s``; it may still be loading). The
    tokenizer and chat template are read from ``artifact`` (the folder the core serves).
    """

    def __init__(self, addresses: Addresses, artifact: str, *, frontend: int = 0, core_timeout_s: float = 5.0,
                 connect_timeout_s: float = 600.0) -> None:
        from runtime.artifact import load_artifact

        loaded = load_artifact(artifact, verify_hashes=False)
        self.artifact = _Artifact(str(loaded.path))
        self._load_text(loaded.path, loaded.tokenizer_dir)
        self.frontend = frontend
        self.core_timeout_s = core_timeout_s
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(addresses.inbound)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.connect(addresses.outbound(frontend))
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._requests: dict[int, RemoteRequest] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.AbstractEventLoop | None = None  # the loop that reads ``_pull`` (else the thread)
        self._handoff: asyncio.AbstractEventLoop | None = None  # a loop the thread is to hand the reading to
        self._handoff_lock = threading.Lock()
        self._fd: int = int(self._pull.getsockopt(zmq.FD))
        self._epoch: int | None = None
        self._alive = False
        self._closing = False
        self._closed = threading.Event()
        self._hello = threading.Event()
        self._last_seen = time.monotonic()
        self._stats: list[int] = [0, 0, 0, 0, 0]
        self.info: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._receive, name=f"lmforge-core-client-{frontend}", daemon=True)
        self._thread.start()
        if not self._hello.wait(connect_timeout_s):
            self.close(drain=False)
            raise LmforgeError("the engine core did not answer", expected=f"a heartbeat within {connect_timeout_s:g} s",
                               got=f"nothing on {addresses.outbound(frontend)}",
                               fix="see the core's log (rerun with --debug)")
        info = self.info
        self.vocab: int = int(info["vocab"])
        self.max_context: int = int(info["max_context"])
        self.max_batch: int = int(info["max_batch"])
        self.max_queue: int = int(info["max_queue"])
        self.eos_token_ids = frozenset(int(i) for i in info["eos_token_ids"])
        self.sampling_defaults: dict[str, Any] = dict(info["sampling_defaults"])

    # -- what the app uses ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """A core answers and this client is not closing."""
        return self._alive and not self._closing

    @property
    def core_pid(self) -> int | None:
        return self.info.get("pid")

    def stats(self) -> EngineStats:
        queued, running, max_batch, max_queue, steps = self._stats[:5]
        return EngineStats(queued=queued, running=running, max_batch=max_batch, max_queue=max_queue, steps=steps,
                           closed=not self.ready, backend=str(self.info.get("backend", "")))

    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 128, sampling: SamplingParams | None = None,
               *, deadline_s: float | None = None) -> RemoteRequest:
        """Send one request to the core; call from the event loop that reads it. Raises
        :class:`EngineClosedError` at once while no core answers or after :meth:`close`."""
        if self._closing:
            raise EngineClosedError("the server is closing and takes no new requests",
                                    fix="send it to another replica")
        if not self._alive:
            raise EngineClosedError("the engine core process is not running", expected="a live engine core",
                                    fix="retry shortly: the server restarts its core (GET /ready says when)")
        params = sampling or SamplingParams()
        if params.stop and self.tokenizer is None:
            self._need_tokenizer("stop strings")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # the first request, or a new loop after the last one closed
            if self._requests and self._loop is not None and not self._loop.is_closed():
                raise GenerationError("a CoreClient serves one asyncio event loop at a time",
                                      fix="submit from the loop that reads the requests already in flight")
            self._loop = loop
            self._read_on(loop)
        rid = next(self._ids)
        request = RemoteRequest(self, rid, ids, int(max_new_tokens), params)
        self._requests[rid] = request
        wire = sampling_to_wire(dataclasses.replace(params, stop=()) if params.stop else params)
        self._send([SUBMIT, self._epoch, self.frontend, rid, ids, int(max_new_tokens), wire, deadline_s])
        return request

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Take no new requests; with ``drain`` wait (up to ``timeout``) for the ones in flight, then
        cancel what is left and stop reading. The core process is its parent's to stop."""
        self._closing = True
        if drain and self._alive:
            end = time.monotonic() + (timeout if timeout is not None else 1e9)
            while self._requests and time.monotonic() < end and self._alive:
                time.sleep(0.02)
        if self._requests:
            self._on_loop(self._abandon, EngineClosedError("the server stopped before this request finished"))
            self._cancel_all()
        with self._send_lock:  # no send is under way on a socket destroyed here
            self._closed.set()
        reader = self._reader
        if reader is not None and not reader.is_closed():
            if _running_loop() is reader:
                reader.remove_reader(self._fd)
            elif reader.is_running():  # (its reader removes itself anyway at its next wake-up)
                try:
                    reader.call_soon_threadsafe(reader.remove_reader, self._fd)
                except RuntimeError:
                    pass
        if threading.current_thread() is not self._thread:
            self._thread.join(2)
        with self._send_lock:
            self._ctx.destroy(linger=0)

    def core_lost(self, why: str = "the engine core process died") -> None:
        """The core is gone (its parent saw it exit): fail what is in flight, report not ready."""
        self._alive = False
        self._on_loop(self._abandon, EngineClosedError(
            "the engine core process stopped while serving this request", got=why,
            fix="retry: the server restarts its core (GET /ready says when it is back)"))

    # -- internals -------------------------------------------------------------------------------

    def _send(self, message: list[Any]) -> None:
        frame = pack(message)
        with self._send_lock:
            if not self._closed.is_set():
                self._push.send(frame)

    def _cancel(self, rid: int) -> None:
        if self._alive:
            self._send([CANCEL, self._epoch, self.frontend, [rid]])

    def _cancel_all(self) -> None:
        rids = list(self._requests)
        if rids and self._alive:
            self._send([CANCEL, self._epoch, self.frontend, rids])

    def _forget(self, rid: int) -> None:
        self._requests.pop(rid, None)

    def _on_loop(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop: at once when called there (or when there is none)."""
        loop = self._loop
        if loop is None or loop.is_closed() or _running_loop() is loop:
            fn(*args)
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed meanwhile
            fn(*args)

    def _abandon(self, error: GenerationError) -> None:
        for request in list(self._requests.values()):
            request._fail(error)
        self._requests.clear()

    def _dispatch(self, items: list[list[Any]], now: float) -> None:
        for rid, ids, finish, queue_s, error in items:
            request = self._requests.get(rid)
            if request is None:
                continue
            if error is not None:
                request._fail(error_from_wire(error))
            else:
                request._deliver(ids, finish, queue_s, now)

    # -- reading the core's messages -------------------------------------------------------------

    def _handle(self, msg: list[Any], now: float) -> None:
        """One message from the core, on whichever side reads (the thread, or the loop's reader)."""
        self._last_seen = time.monotonic()
        kind, epoch = msg[0], msg[1]
        if epoch != self._epoch:
            if self._epoch is not None:
                log.warning("a new engine core answers (pid %s)", msg[2].get("pid") if kind == HELLO else "?")
                self.core_lost("the engine core was restarted")
            self._epoch = epoch
        if kind == HELLO:
            self.info = msg[2]
            self._stats = msg[2]["stats"]
            self._alive = True
            self._hello.set()
        elif kind == OUTPUT:
            self._stats = msg[2]
            self._alive = True
            self._on_loop(self._dispatch, msg[3], now)

    def _check_silence(self) -> None:
        if self._alive and time.monotonic() - self._last_seen > self.core_timeout_s:
            log.error("the engine core sent nothing for %.1f s: failing the requests in flight", self.core_timeout_s)
            self.core_lost(f"no heartbeat for {self.core_timeout_s:g} s")

    def _read_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``loop`` (running, in this thread) the socket's reader. From the thread, once it
        has stopped reading (what it read before is queued on the loop ahead of the reader's
        start, so each request's blocks stay in order); from another loop that is not running,
        at once; from a running one, through that loop."""
        old = self._reader
        if old is None or old.is_closed():
            with self._handoff_lock:
                self._handoff = loop
        elif old is not loop:
            if old.is_running():
                old.call_soon_threadsafe(self._move_reader, old, loop)
            else:
                self._move_reader(old, loop)

    def _move_reader(self, old: asyncio.AbstractEventLoop, new: asyncio.AbstractEventLoop) -> None:
        if old.is_running():
            old.remove_reader(self._fd)  # on ``old``'s own thread
        self._reader = new
        new.call_soon_threadsafe(self._start_reading, new)

    def _start_reading(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._closed.is_set() or self._reader is not loop:
            return
        loop.add_reader(self._fd, self._on_readable, loop)
        self._on_readable(loop)  # what came before the reader: ZeroMQ signals its descriptor by edges

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop's reader: every message waiting (until ``EAGAIN``, which re-arms the descriptor)."""
        if self._closed.is_set() or self._reader is not loop:
            loop.remove_reader(self._fd)
            return
        while True:
            try:
                frame = self._pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                loop.remove_reader(self._fd)
                return
            try:
                self._handle(unpack(frame), time.perf_counter())
            except Exception:  # a bad message must not leave the rest unread: no new edge would come
                log.exception("the front-end failed to handle a message from the engine core")

    def _receive(self) -> None:
        """The thread: reads while no running loop does, hands the reading to the first loop
        that submits, and watches the heartbeat."""
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        while not self._closed.is_set():
            reader = self._reader
            if reader is not None and not reader.is_closed():
                self._closed.wait(0.1)
                if reader.is_running():  # a loop that is not running reads nothing: no verdict
                    self._check_silence()
                continue
            self._reader = None
            with self._handoff_lock:
                handoff, self._handoff = self._handoff, None
            if handoff is not None and not handoff.is_closed():
                self._reader = handoff
                try:
                    handoff.call_soon_threadsafe(self._start_reading, handoff)
                except RuntimeError:  # closed meanwhile: this thread goes on reading
                    self._reader = None
                continue
            try:
                if not poller.poll(100):
                    self._check_silence()
                    continue
                msg = unpack(self._pull.recv())
            except zmq.ZMQError:
                if self._closed.is_set():
                    return
                raise
            self._handle(msg, time.perf_counter())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
