"""The engine core: one process that owns the :class:`runtime.Engine` and its scheduling loop and
talks to the HTTP front-end(s) over :mod:`runtime.serve.transport` (vLLM V1's ``EngineCore``).

It does no HTTP work, no tokenization and no detokenization: the front-ends send token ids and
get token ids back (the engine's tokenizer is dropped here, so its loop does not detokenize;
stop strings are the front-end's). Three threads share the process, and none waits on another's
work: the engine's loop (onnxruntime, which releases the GIL while it computes), the **input**
thread (this process's main thread: submits and cancels from the ``PULL`` socket, straight into
``Engine.submit`` / ``Request.cancel``), and the **output** thread, which wakes when requests
got tokens and sends each front-end **one message with every request's new ids since its last
message** — a whole block per request, not one message per token — plus a heartbeat with the
engine's stats while idle.

The output thread learns that a request has events the way an ``async for`` over it does: it
registers a waiter with the request, and the loop thread's wake-up puts the request on a queue
(:class:`_Wakeup` stands in for the asyncio loop that :class:`runtime.request.Request` calls).

SIGTERM drains: the engine finishes what is in flight (``drain_timeout_s``), the last outputs go
out, and the process exits 0. A core whose parent is gone drains and exits too.

On the CPU, with no thread count asked, the core leaves its front-ends a core each when they
would need one (:func:`reserve_for_frontends`), as vLLM's CPU backend reserves cores for its API
server: the front-ends and the engine's onnxruntime threads otherwise compete for the same cores.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from runtime.request import Request
from runtime.serve.transport import (
    CANCEL,
    HEARTBEAT_S,
    HELLO,
    OUTPUT,
    SUBMIT,
    Addresses,
    error_to_wire,
    pack,
    sampling_from_wire,
    unpack,
)

__all__ = ["EngineCore", "FRONTEND_CPU_S_PER_TOKEN", "RESERVE_AT", "decode_rate", "reserve_for_frontends", "run_core"]

log = logging.getLogger(__name__)

# CPU time an HTTP front-end spends per streamed token (detokenizing, stop strings, the SSE
# chunk, its metrics), measured with yappi on the 2-core box: 32-41 µs (docs/serving.md).
FRONTEND_CPU_S_PER_TOKEN = 40e-6
# The share of a core the front-ends would need at the engine's full decode rate from which a core
# is left to each of them: below it (a model whose tokens cost the engine much more than the
# front-end's 40 µs) every core computes.
RESERVE_AT = 0.1
_PROBE_ROWS, _PROBE_PROMPT, _PROBE_TOKENS = 16, 16, 4


def decode_rate(engine: Any, rows: int = _PROBE_ROWS, enough: float | None = None) -> float:
    """Generated tokens per second of ``engine`` over ``rows`` requests at once (short prompts,
    :data:`_PROBE_TOKENS` tokens each, prefill included): one call, then a second one unless the
    first fell below ``enough`` / 2 (the first call includes one-time work, so it undercounts)."""
    from runtime.sampling import SamplingParams

    rows = max(1, min(rows, engine.max_batch))
    vocab = max(2, int(engine.vocab) - 1)
    length = max(1, min(_PROBE_PROMPT, int(getattr(engine, "max_context", 1 << 30)) - _PROBE_TOKENS))
    prompts = [[1 + (7 * r + j) % vocab for j in range(length)] for r in range(rows)]
    params = [SamplingParams(min_new_tokens=_PROBE_TOKENS)] * rows
    rate = 0.0
    for attempt in range(2):
        started = time.perf_counter()
        engine.generate_results(prompts, _PROBE_TOKENS, params)
        rate = max(rate, rows * _PROBE_TOKENS / max(time.perf_counter() - started, 1e-9))
        if attempt == 0 and enough is not None and rate < enough / 2:
            break
    return rate


def reserve_for_frontends(engine: Any, frontends: int) -> int | None:
    """The onnxruntime threads for an engine core on the CPU with ``frontends`` front-ends beside it,
    or None to keep one per physical core: ``cores − frontends`` when the front-ends, at the engine's
    decode rate with every core, would need :data:`RESERVE_AT` of a core or more
    (:data:`FRONTEND_CPU_S_PER_TOKEN` each token). A model whose step is cheap (a tiny one, or a
    small one on many cores) then keeps a core free for HTTP work; one whose tokens cost the engine
    much more than the front-end keeps every core, where the thread would cost it more."""
    from runtime.cpu import intra_op_threads

    cores = intra_op_threads(None)
    if cores - frontends < 1:
        return None
    need = RESERVE_AT / FRONTEND_CPU_S_PER_TOKEN  # tokens per second from which a core is reserved
    try:
        rate = decode_rate(engine, enough=need)
    except Exception as exc:  # noqa: BLE001 - a probe that fails must not stop the server: keep every core
        log.warning("engine core: measuring the decode rate failed (%s): keeping %d onnxruntime threads",
                    exc, cores)
        return None
    share = rate * FRONTEND_CPU_S_PER_TOKEN
    keep = share < RESERVE_AT
    log.info("engine core: %d onnxruntime threads (decode at %.0f tok/s with %d: the front-ends would need %.2f "
             "of a core; a core is left to them from %.2f; --threads N sets the count)",
             cores if keep else cores - frontends, rate, cores, share, RESERVE_AT)
    return None if keep else cores - frontends


@dataclasses.dataclass(eq=False)
class _Tracked:
    frontend: int
    rid: int
    request: Request | None
    error: BaseException | None = None  # refused at submit
    done: bool = False
    wake: Callable[[], None] | None = None  # puts this on the output thread's queue (the loop thread calls it)


class EngineCore:
    """Serve ``engine`` to the front-ends at ``addresses`` until :meth:`stop` (call :meth:`run`)."""

    def __init__(self, engine: Any, addresses: Addresses, drain_timeout_s: float = 30.0) -> None:
        self.engine = engine
        engine.tokenizer = None  # the front-ends detokenize; the loop then only moves ids
        self.addresses = addresses
        self.drain_timeout_s = drain_timeout_s
        self.epoch = int.from_bytes(os.urandom(6), "little")
        self.info = {"vocab": int(engine.vocab), "max_context": int(engine.max_context),
                     "max_batch": int(engine.max_batch), "max_queue": int(engine.max_queue),
                     "eos_token_ids": sorted(int(i) for i in engine.eos_token_ids),
                     "sampling_defaults": dict(engine.sampling_defaults or {}),
                     "backend": str(engine.stats().backend), "pid": os.getpid()}
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(addresses.inbound)
        self._push = []
        for i in range(addresses.frontends):
            s = self._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.bind(addresses.outbound(i))
            self._push.append(s)
        self._ready: queue.SimpleQueue[_Tracked] = queue.SimpleQueue()
        self._live: dict[tuple[int, int], _Tracked] = {}
        self._stopping = threading.Event()
        self._outputs_done = threading.Event()

    # -- input (the main thread) ------------------------------------------------------------------

    def stop(self) -> None:
        """Drain and stop (from a signal handler or another thread)."""
        self._stopping.set()

    def run(self) -> None:
        out = threading.Thread(target=self._output_loop, name="lmforge-core-out", daemon=True)
        out.start()
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                if not poller.poll(int(HEARTBEAT_S * 1000)):
                    continue
                while True:
                    try:
                        frame = self._pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(unpack(frame))
        finally:
            log.info("engine core: draining")
            try:
                self.engine.close(drain=True, timeout=self.drain_timeout_s)
            finally:
                self._outputs_done.set()
                out.join(5)
                self._ctx.destroy(linger=0)

    def _handle(self, msg: list[Any]) -> None:
        kind, epoch = msg[0], msg[1]
        if epoch != self.epoch:
            return  # queued for a core that is gone
        if kind == SUBMIT:
            _, _, frontend, rid, ids, max_new, sampling, deadline_s = msg
            try:
                request = self.engine.submit(ids, max_new_tokens=max_new, sampling=sampling_from_wire(sampling),
                                             deadline_s=deadline_s)
            except Exception as exc:  # noqa: BLE001 - refused: the front-end gets the error
                self._ready.put(_Tracked(frontend, rid, None, exc))
                return
            tracked = _Tracked(frontend, rid, request)
            tracked.wake = functools.partial(self._ready.put, tracked)  # a C call: no Python frame on the loop
            self._live[(frontend, rid)] = tracked
            self._arm(tracked)
        elif kind == CANCEL:
            _, _, frontend, rids = msg
            for rid in rids:
                live = self._live.get((frontend, rid))
                if live is not None and live.request is not None:
                    live.request.cancel()

    def _arm(self, tracked: _Tracked) -> None:
        request, wake = tracked.request, tracked.wake
        assert request is not None and wake is not None
        if not request.notify(wake):  # events already waiting
            self._ready.put(tracked)

    # -- output (its own thread) ------------------------------------------------------------------

    def _take(self, tracked: _Tracked) -> list[Any] | None:
        """[rid, ids, finish, queue_s, error] of what ``tracked`` got since it was last taken."""
        if tracked.done:
            return None
        if tracked.request is None:
            tracked.done = True
            return [tracked.rid, [], None, 0.0, error_to_wire(tracked.error or RuntimeError("refused"))]
        events, error = tracked.request.take()
        ids: list[int] = []
        finish, queue_s = None, 0.0
        for event in events:
            ids.extend(event.token_ids)
            if event.result is not None:
                finish, queue_s = event.result.finish_reason.value, event.result.queue_s
        finished = error is not None or finish is not None
        if not finished:
            self._arm(tracked)  # the next event wakes the output thread (or it is queued now)
        else:
            tracked.done = True
            self._live.pop((tracked.frontend, tracked.rid), None)
        if not ids and not finished:
            return None
        return [tracked.rid, ids, finish, queue_s, None if error is None else error_to_wire(error)]

    def _stats(self) -> list[int]:
        s = self.engine.stats()
        return [s.queued, s.running, s.max_batch, s.max_queue, s.steps]

    def _send(self, frontend: int, message: list[Any]) -> None:
        if not 0 <= frontend < len(self._push):
            return
        try:
            self._push[frontend].send(pack(message), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("front-end %d is not reading: dropped a message", frontend)

    def _output_loop(self) -> None:
        last_hello = 0.0
        while True:
            final = self._outputs_done.is_set()
            batch: list[_Tracked] = []
            try:
                batch.append(self._ready.get(timeout=HEARTBEAT_S if not final else 0.01))
                while True:
                    batch.append(self._ready.get_nowait())
            except queue.Empty:
                pass
            try:
                per: dict[int, list[Any]] = {}
                for tracked in batch:
                    item = self._take(tracked)
                    if item is not None:
                        per.setdefault(tracked.frontend, []).append(item)
                if per:
                    stats = self._stats()
                    for frontend, items in per.items():
                        self._send(frontend, [OUTPUT, self.epoch, stats, items])
                now = time.monotonic()
                if now - last_hello >= HEARTBEAT_S:
                    last_hello = now
                    hello = [HELLO, self.epoch, {**self.info, "stats": self._stats()}]
                    for i in range(len(self._push)):
                        self._send(i, hello)
            except Exception:  # the output thread must keep running
                log.exception("engine core: the output thread failed a pass")
            if final and not batch:
                return


def _watch_parent(parent: int, core: EngineCore) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    log.warning("engine core: the parent process %d is gone: draining", parent)
    core.stop()


def run_core(options: Any, addresses: Addresses, threads: int | None, events: Any, parent: int) -> None:
    """The core process's entry (spawned): load the model (on the CPU without ``threads``, then
    maybe again with a core left to each front-end: :func:`reserve_for_frontends`), say ready on
    ``events`` with its pid and thread count, serve until SIGTERM."""
    os.setpgrp()  # a terminal's Ctrl-C goes to the parent, which stops the front-ends first
    logging.basicConfig(level=options.log_level.upper(), format="%(levelname)s core %(name)s: %(message)s")
    from runtime.errors import LmforgeError
    from runtime.serve.instances import load_model

    engine = None
    try:
        engine = load_model(options, threads)
        if not hasattr(engine, "submit"):
            raise LmforgeError("the engine core serves decoder artifacts", got="an encoder artifact",
                               fix="serve an encoder with --in-process")
        if threads is None and options.device == "cpu":
            threads = reserve_for_frontends(engine, addresses.frontends)
            if threads is not None:  # onnxruntime's threads are fixed per session: load it again
                engine.close(drain=False)
                engine = None
                engine = load_model(options, threads)
        core = EngineCore(engine, addresses, options.drain_timeout_s)
    except Exception as exc:  # reported to the parent as one line
        log.debug("the engine core failed to start", exc_info=True)
        first = (str(exc).splitlines() or [""])[0]
        events.put(("failed", "core", str(exc) if isinstance(exc, LmforgeError) else f"{type(exc).__name__}: {first}"))
        if engine is not None:
            engine.close(drain=False)
        raise SystemExit(2) from None
    signal.signal(signal.SIGTERM, lambda *_: core.stop())
    signal.signal(signal.SIGINT, lambda *_: core.stop())
    threading.Thread(target=_watch_parent, args=(parent, core), name="lmforge-parent-watch", daemon=True).start()
    events.put(("ready", "core", (os.getpid(), threads)))  # threads: kept for a restarted core
    core.run()
