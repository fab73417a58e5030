"""``lmforge serve --instances N``: N pinned worker processes behind one listening socket.

The parent binds the port (so ``--port 0`` gets its real port before any worker starts) and
starts N processes with ``multiprocessing``'s *spawn* context. Worker ``i`` moves to its own
process group, pins itself to slice ``i`` of the usable cores (:func:`runtime.cpu.split_cores`,
the slicing ``lmforge tune`` measures with) *before* loading anything — so onnxruntime's threads
and the weights' first touch land on its cores — loads its own ``Engine`` or ``Encoder`` with one
intra-op thread per core of its slice, and runs the same uvicorn server as one instance
(:class:`runtime.serve.server.DrainingServer`, with its drain). Where the OS has ``SO_REUSEPORT``
(Linux), the parent's socket only reserves the port (bound, not listening) and each worker listens
on its own socket bound to the same port: the kernel spreads new connections over the workers by
hash. Without it the workers share the parent's listening socket, and whichever worker's event
loop is free accepts — which favours one worker, since a worker's loop stays free while its
thread pool computes embeddings.

The parent reports the URL once every worker listens; a worker that fails to start fails the
whole command (its one-line error, exit 2). Afterwards the parent only waits: SIGTERM or SIGINT
(Ctrl-C reaches the parent alone, the workers being in their own groups) is forwarded once as
SIGTERM, and each worker drains as the single-process server does; a second signal is forwarded
again (the workers then exit at once). A worker that dies while serving stops the others and the
parent exits 1 — restarting is left to the supervisor (systemd, Kubernetes). A worker whose parent
disappears drains and exits.

Every response carries ``x-lmforge-worker: i``; ``/metrics`` reports the worker that answers (see
:mod:`runtime.serve.metrics`).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_sentinels
from types import FrameType
from typing import Any

from runtime.errors import LmforgeError
from runtime.options import DEFAULTS
from runtime.serve.server import DrainingServer, bind, url_of, uvicorn_config

__all__ = ["WORKER_HEADER", "ModelOptions", "ResponseHeader", "WorkerHeader", "load_model", "serve_instances"]

log = logging.getLogger(__name__)

WORKER_HEADER = "x-lmforge-worker"
_START_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What a worker needs to load the artifact and serve it (picklable: it crosses to spawned workers)."""

    artifact: str
    device: str = "cpu"
    verify_hashes: bool = True
    max_batch: int = DEFAULTS.max_batch  # decoders only
    max_queue: int = DEFAULTS.max_queue  # decoders only
    prefill_tokens: int | None = None  # decoders only: prompt tokens admitted per step boundary
    served_model_name: str | None = None
    api_key: str | None = None
    drain_timeout_s: float = 30.0
    log_level: str = "warning"
    warm_up: bool = True  # decoders with CUDA graphs: capture every bucket before listening
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (runtime.serve.server)
    chat_default_max_tokens: int | None = 1024  # runtime.serve.app.ServeLimits
    stream_interval: int = 1  # runtime.serve.app.ServeLimits: tokens per SSE chunk

    def limits(self) -> Any:
        """The :class:`runtime.serve.app.ServeLimits` these options set."""
        from runtime.serve.app import ServeLimits

        return ServeLimits(header_timeout_s=self.header_timeout_s, chat_default_max_tokens=self.chat_default_max_tokens,
                           stream_interval=self.stream_interval)


def load_model(options: ModelOptions, threads: int | None) -> Any:
    """The artifact's ``Engine`` (decoder) or ``Encoder`` (encoder), as its manifest says."""
    from runtime.artifact import load_artifact

    artifact = load_artifact(options.artifact, verify_hashes=options.verify_hashes)
    if artifact.is_decoder:
        from runtime.engine import Engine

        engine = Engine.load(options.artifact, device=options.device, verify_hashes=False, threads=threads,
                             max_batch=options.max_batch, max_queue=options.max_queue,
                             prefill_tokens=options.prefill_tokens)
        if options.warm_up:
            engine.warm_up()  # no-op without CUDA graphs
        return engine
    from runtime.encoder import Encoder

    return Encoder(artifact, device=options.device, threads=threads)


class ResponseHeader:
    """ASGI middleware: one header (``name: value``) on every HTTP response."""

    def __init__(self, app: Any, name: str, value: str) -> None:
        self.app = app
        self.header = (name.encode(), value.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class WorkerHeader(ResponseHeader):
    """ASGI middleware: ``x-lmforge-worker: i`` on every response."""

    def __init__(self, app: Any, index: int) -> None:
        super().__init__(app, WORKER_HEADER, str(index))


def _watch_parent(parent: int, server: DrainingServer) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    log.warning("the parent process %d is gone: draining", parent)
    server.drain()


def _worker(index: int, listen: socket.socket | tuple[str, int], cpus: list[int], threads: int,
            options: ModelOptions, events: Any, parent: int) -> None:
    """One instance (runs in a spawned process): pin, load, serve on its own ``SO_REUSEPORT`` socket
    bound to ``listen = (host, port)``, or on the inherited listening socket ``listen``."""
    os.setpgrp()  # a terminal's Ctrl-C goes to the parent, which forwards one SIGTERM
    logging.basicConfig(level=options.log_level.upper(),
                        format=f"%(levelname)s worker {index} %(name)s: %(message)s")
    from runtime.cpu import pin_cpus
    from runtime.serve.app import create_app

    model = None
    try:
        sock = bind(*listen, reuse_port=True) if isinstance(listen, tuple) else listen
        pin_cpus(cpus)
        model = load_model(options, threads)
        app = create_app(model, served_model_name=options.served_model_name, api_key=options.api_key,
                         limits=options.limits())
    except Exception as exc:  # any startup failure is reported to the parent as one line
        log.debug("worker %d failed to start", index, exc_info=True)
        first = (str(exc).splitlines() or [""])[0]
        text = str(exc) if isinstance(exc, LmforgeError) else f"{type(exc).__name__}: {first}"
        events.put(("failed", index, text))
        if model is not None:
            model.close()
        raise SystemExit(2) from None
    state = app.state.lmforge
    state.metrics.set_worker(index)
    server = DrainingServer(uvicorn_config(WorkerHeader(app, index), options.drain_timeout_s, options.log_level,
                             options.header_timeout_s), state,
                     options.drain_timeout_s, on_listen=lambda: events.put(("ready", index, os.getpid())))
    threading.Thread(target=_watch_parent, args=(parent, server), name="lmforge-parent-watch", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        state.engine.close(drain=False)


class _Supervisor:
    """The parent's side: start the workers, wait for them, forward signals."""

    def __init__(self, procs: list[Any]) -> None:
        self.procs = procs
        self.signals = 0

    def forward(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        log.info("signal %d: %s the workers", sig, "draining" if self.signals == 1 else "stopping")
        self.terminate()

    def terminate(self) -> None:
        for p in self.procs:
            if p.exitcode is None and p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                log.warning("worker pid %d did not exit in time: killing it", p.pid)
                p.kill()
                p.join(5)


def serve_instances(options: ModelOptions, slices: list[list[int]], *, host: str = "127.0.0.1", port: int = 8000,
                    threads: int | None = None,
                    on_listen: Callable[[str, list[int]], None] | None = None) -> int:
    """Serve ``options.artifact`` from one worker per CPU slice on ``host:port``; block until they stop.

    ``threads`` per worker defaults to the size of its slice. ``on_listen(url, pids)`` runs once
    every worker listens. Returns 0 after a signal-initiated stop, 1 when a worker died while
    serving; raises :class:`LmforgeError` when a worker fails to start.
    """
    from runtime.artifact import load_artifact

    load_artifact(options.artifact, verify_hashes=options.verify_hashes)  # once here, not in every worker
    child = dataclasses.replace(options, verify_hashes=False)
    reuse = hasattr(socket, "SO_REUSEPORT")
    sock = bind(host, port, reuse_port=reuse)  # with SO_REUSEPORT: reserves the port, never listens
    listen: socket.socket | tuple[str, int] = (host, int(sock.getsockname()[1])) if reuse else sock
    if not reuse:
        sock.listen(2048)  # shared: connections wait in the backlog until a worker accepts
    url = url_of(sock)
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    procs = [ctx.Process(target=_worker, name=f"lmforge-serve-{i}",
                         args=(i, listen, cpus, threads or len(cpus), child, events, os.getpid()))
             for i, cpus in enumerate(slices)]
    sup = _Supervisor(procs)
    previous = {s: signal.signal(s, sup.forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        pids = _wait_ready(sup, events)
        if pids is None:  # a signal arrived during startup
            sup.reap(options.drain_timeout_s + 10)
            return 0
        if on_listen is not None:
            on_listen(url, pids)
        code = 0
        while any(p.exitcode is None for p in procs):
            wait_sentinels([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
            for i, p in enumerate(procs):
                if p.exitcode is not None and not sup.signals and code == 0:
                    log.error("worker %d (pid %d) exited with code %s while serving: stopping the others",
                              i, p.pid, p.exitcode)
                    code = 1
                    sup.terminate()
        sup.reap(options.drain_timeout_s + 10)
        return code
    except BaseException:
        sup.terminate()
        sup.reap(10)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()


def _wait_ready(sup: _Supervisor, events: Any) -> list[int] | None:
    """Every worker's pid once all listen; None if a signal came first; raises if one failed."""
    pids: dict[int, int] = {}
    deadline = time.monotonic() + _START_TIMEOUT_S
    while len(pids) < len(sup.procs):
        if sup.signals:
            return None
        try:
            kind, index, info = events.get(timeout=0.2)
        except queue_mod.Empty:
            dead = [(i, p.exitcode) for i, p in enumerate(sup.procs) if p.exitcode is not None]
            if dead or time.monotonic() > deadline:
                what = (f"worker {dead[0][0]} exited at startup with code {dead[0][1]}" if dead
                        else f"the workers did not listen within {_START_TIMEOUT_S:.0f} s")
                raise LmforgeError(what, fix="rerun with --debug to see the worker's log") from None
            continue
        if kind == "failed":
            raise LmforgeError(f"worker {index} failed to start: {info}")
        pids[index] = int(info)
    return [pids[i] for i in range(len(sup.procs))]
