"""``lmforge serve`` as separate processes: one engine core, N HTTP front-ends on one port, and
the parent that supervises them (vLLM V1's ``EngineCore`` + ``--api-server-count N``).

* The **core** (:mod:`runtime.serve.core`) owns the engine and its loop; it never waits on HTTP.
* Each **front-end** runs the FastAPI app over a :class:`runtime.serve.client.CoreClient`: HTTP,
  tokenization, detokenization, stop strings, SSE. With N > 1 they share the port as
  :mod:`runtime.serve.instances` does (``SO_REUSEPORT``, else one inherited listening socket),
  every response carries ``x-lmforge-worker: i``, and ``/metrics`` sums the counters and
  histograms of every front-end (prometheus-client's multiprocess mode) beside the core's gauges.
* The **parent** starts the core, then the front-ends once the core is loaded, and waits. SIGTERM
  (or Ctrl-C) drains: the front-ends refuse new requests and finish those in flight, then the core
  drains and stops; exit 0. If the core dies while serving, the parent tells the front-ends at
  once (SIGUSR1: their requests in flight fail with a 503 / an SSE error event that says so, and
  ``/ready`` answers 503), and starts a new core, up to ``max_core_restarts`` times; past that it
  stops the front-ends and exits 1. A front-end that dies stops everything (exit 1): restarting
  the whole server is left to the supervisor (systemd, Kubernetes).

:class:`CoreProcess` starts a core alone, for library users who want the engine in its own
process and for tests: ``create_app(CoreClient(core.addresses, artifact))``.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_sentinels
from types import FrameType
from typing import Any

from runtime.errors import LmforgeError
from runtime.serve.transport import Addresses

__all__ = ["CoreProcess", "SplitOptions", "serve_split"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class SplitOptions:
    """How the processes are laid out (the model's options are :class:`runtime.serve.instances.ModelOptions`)."""

    api_workers: int = 1
    threads: int | None = None  # the core's onnxruntime intra-op threads
    max_core_restarts: int = 3
    core_timeout_s: float = 5.0  # a front-end declares a silent core lost after this


class CoreProcess:
    """An engine core in a spawned child process, serving ``frontends`` clients; a context manager.

    ``start()`` returns once the engine is loaded (raises :class:`LmforgeError` with the core's
    one-line error if it fails); ``stop()`` drains it (SIGTERM) and removes its socket folder.
    """

    def __init__(self, options: Any, *, frontends: int = 1, threads: int | None = None,
                 folder: str | None = None) -> None:
        self.options = options
        self.threads = threads
        self._own_folder = folder is None
        self.addresses = Addresses(folder or tempfile.mkdtemp(prefix="lmforge-core-"), frontends)
        self._ctx = mp.get_context("spawn")
        self.events = self._ctx.Queue()
        self.proc: Any = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def spawn(self) -> None:
        """Start the process (and return at once)."""
        from runtime.serve.core import run_core

        self.proc = self._ctx.Process(target=run_core, name="lmforge-core",
                                      args=(self.options, self.addresses, self.threads, self.events, os.getpid()))
        self.proc.start()

    def start(self, timeout: float = _START_TIMEOUT_S) -> CoreProcess:
        self.spawn()
        end = time.monotonic() + timeout
        while True:
            try:
                kind, _, info = self.events.get(timeout=0.2)
            except queue_mod.Empty:
                if self.proc.exitcode is not None:
                    raise LmforgeError(f"the engine core exited at startup with code {self.proc.exitcode}",
                                       fix="rerun with --debug to see its log") from None
                if time.monotonic() > end:
                    self.stop(0)
                    raise LmforgeError(f"the engine core did not load within {timeout:g} s") from None
                continue
            if kind == "failed":
                self.proc.join(10)
                raise LmforgeError(f"the engine core failed to start: {info}")
            if self.threads is None and isinstance(info, tuple):
                self.threads = info[1]  # what the core chose: a restarted core takes it without measuring again
            return self

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is not None and self.proc.exitcode is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.proc.join(timeout)
            if self.proc.exitcode is None:
                self.proc.kill()
                self.proc.join(5)
        if self._own_folder:
            shutil.rmtree(self.addresses.folder, ignore_errors=True)
        return None if self.proc is None else self.proc.exitcode

    def __enter__(self) -> CoreProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _frontend(index: int, listen: socket.socket | tuple[str, int], addresses: Addresses, options: Any,
              split: SplitOptions, events: Any, parent: int) -> None:
    """One HTTP front-end (runs in a spawned process)."""
    os.setpgrp()
    logging.basicConfig(level=options.log_level.upper(),
                        format=f"%(levelname)s front-end {index} %(name)s: %(message)s")
    from runtime.serve.app import create_app
    from runtime.serve.client import CoreClient
    from runtime.serve.instances import WorkerHeader
    from runtime.serve.server import DrainingServer, bind, uvicorn_config

    client = None
    try:
        sock = bind(*listen, reuse_port=True) if isinstance(listen, tuple) else listen
        client = CoreClient(addresses, options.artifact, frontend=index, core_timeout_s=split.core_timeout_s)
        app = create_app(client, served_model_name=options.served_model_name, api_key=options.api_key,
                         limits=options.limits())
    except Exception as exc:  # reported to the parent as one line
        log.debug("front-end %d failed to start", index, exc_info=True)
        first = (str(exc).splitlines() or [""])[0]
        events.put(("failed", index, str(exc) if isinstance(exc, LmforgeError) else f"{type(exc).__name__}: {first}"))
        if client is not None:
            client.close(drain=False)
        raise SystemExit(2) from None
    state = app.state.lmforge
    state.metrics.set_worker(index)
    asgi = WorkerHeader(app, index) if split.api_workers > 1 else app
    config = uvicorn_config(asgi, options.drain_timeout_s, options.log_level, options.header_timeout_s)
    server = DrainingServer(config, state, options.drain_timeout_s,
                            on_listen=lambda: events.put(("ready", index, os.getpid())))
    signal.signal(signal.SIGUSR1, lambda *_: client.core_lost())

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("the parent process %d is gone: draining", parent)
        server.drain()

    threading.Thread(target=watch_parent, name="lmforge-parent-watch", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        client.close(drain=False)


class _Supervisor:
    def __init__(self) -> None:
        self.signals = 0
        self.frontends: list[Any] = []
        self.core: CoreProcess | None = None

    def forward(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        log.info("signal %d: %s the front-ends", sig, "draining" if self.signals == 1 else "stopping")
        self.term(self.frontends)

    @staticmethod
    def term(procs: list[Any], sig: int = signal.SIGTERM) -> None:
        for p in procs:
            if p.exitcode is None and p.pid is not None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    @staticmethod
    def reap(procs: list[Any], timeout: float) -> None:
        end = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                log.warning("pid %d did not exit in time: killing it", p.pid)
                p.kill()
                p.join(5)


def serve_split(options: Any, split: SplitOptions, *, host: str = "127.0.0.1", port: int = 8000,
                on_listen: Callable[[str, list[int], int, int | None], None] | None = None) -> int:
    """Serve ``options.artifact`` from one core and ``split.api_workers`` front-ends; block until they stop.

    ``on_listen(url, frontend_pids, core_pid, core_threads)`` runs once every front-end listens
    (``core_threads``: the core's onnxruntime threads where it chose or was given a count, None for
    one per physical core or on a GPU). Returns 0 after a
    signal-initiated stop, 1 when a process died past recovery; raises :class:`LmforgeError` when
    one fails to start.
    """
    from runtime.artifact import load_artifact
    from runtime.serve.server import bind, url_of

    load_artifact(options.artifact, verify_hashes=options.verify_hashes)  # once here, not in each process
    child = dataclasses.replace(options, verify_hashes=False)
    folder = tempfile.mkdtemp(prefix="lmforge-serve-")
    metrics_dir = os.path.join(folder, "metrics")
    os.mkdir(metrics_dir)
    previous_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if split.api_workers > 1:  # spawned front-ends import prometheus_client with it set: shared counters
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    sup = _Supervisor()
    core = sup.core = CoreProcess(child, frontends=split.api_workers, threads=split.threads, folder=folder)
    reuse = hasattr(socket, "SO_REUSEPORT") and split.api_workers > 1
    sock = bind(host, port, reuse_port=reuse)
    listen: socket.socket | tuple[str, int] = (host, int(sock.getsockname()[1])) if reuse else sock
    if not reuse:
        sock.listen(2048)
    url = url_of(sock)
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    previous = {s: signal.signal(s, sup.forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        core.start()
        if sup.signals:
            return 0
        sup.frontends = [ctx.Process(target=_frontend, name=f"lmforge-frontend-{i}",
                                     args=(i, listen, core.addresses, child, split, events, os.getpid()))
                         for i in range(split.api_workers)]
        for p in sup.frontends:
            p.start()
        pids = _wait_ready(sup, events)
        if pids is None:
            return _shutdown(sup, options, 0)
        if on_listen is not None:
            on_listen(url, pids, core.pid or 0, core.threads)
        return _supervise(sup, options, split)
    except BaseException:
        sup.term(sup.frontends)
        sup.reap(sup.frontends, 10)
        core.stop(10)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
        if split.api_workers > 1:
            if previous_env is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous_env
        shutil.rmtree(folder, ignore_errors=True)


def _supervise(sup: _Supervisor, options: Any, split: SplitOptions) -> int:
    core = sup.core
    assert core is not None
    code, restarts = 0, 0
    while any(p.exitcode is None for p in sup.frontends):
        wait_sentinels([p.sentinel for p in sup.frontends if p.exitcode is None] +
                       ([core.proc.sentinel] if core.proc.exitcode is None else []), timeout=1.0)
        if sup.signals:
            continue  # the front-ends drain; the core stops after them
        if code == 0 and any(p.exitcode is not None for p in sup.frontends):
            dead = next(i for i, p in enumerate(sup.frontends) if p.exitcode is not None)
            log.error("front-end %d exited with code %s while serving: stopping the server", dead,
                      sup.frontends[dead].exitcode)
            code = 1
            sup.term(sup.frontends)
        elif code == 0 and core.proc.exitcode is not None:
            log.error("the engine core (pid %d) exited with code %s while serving", core.proc.pid, core.proc.exitcode)
            sup.term(sup.frontends, signal.SIGUSR1)  # their requests in flight fail now, /ready says 503
            if restarts < split.max_core_restarts:
                restarts += 1
                log.warning("starting a new engine core (restart %d of %d)", restarts, split.max_core_restarts)
                core.spawn()
            else:
                log.error("the engine core died %d time(s): stopping the server", restarts + 1)
                code = 1
                sup.term(sup.frontends)
    return _shutdown(sup, options, code)


def _shutdown(sup: _Supervisor, options: Any, code: int) -> int:
    sup.reap(sup.frontends, options.drain_timeout_s + 10)
    if sup.core is not None:
        sup.core.stop(options.drain_timeout_s + 10)
    return code


def _wait_ready(sup: _Supervisor, events: Any) -> list[int] | None:
    pids: dict[int, int] = {}
    end = time.monotonic() + _START_TIMEOUT_S
    while len(pids) < len(sup.frontends):
        if sup.signals:
            return None
        try:
            kind, index, info = events.get(timeout=0.2)
        except queue_mod.Empty:
            dead = [(i, p.exitcode) for i, p in enumerate(sup.frontends) if p.exitcode is not None]
            core = sup.core
            if core is not None and core.proc.exitcode is not None:
                raise LmforgeError(f"the engine core exited with code {core.proc.exitcode} at startup",
                                   fix="rerun with --debug to see its log") from None
            if dead or time.monotonic() > end:
                what = (f"front-end {dead[0][0]} exited at startup with code {dead[0][1]}" if dead
                        else f"the front-ends did not listen within {_START_TIMEOUT_S:.0f} s")
                raise LmforgeError(what, fix="rerun with --debug to see its log") from None
            continue
        if kind == "failed":
            raise LmforgeError(f"front-end {index} failed to start: {info}")
        pids[index] = int(info)
    return [pids[i] for i in range(len(sup.frontends))]
