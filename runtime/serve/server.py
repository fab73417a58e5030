"""Running the app with uvicorn: in the foreground with a graceful SIGTERM drain, or in a thread.

:func:`serve` is what ``lmforge serve`` runs. The first SIGTERM (or Ctrl-C) starts a drain: the
app answers new generation requests with 503 and ``/ready`` with 503 while
``engine.close(drain=True, timeout=drain_timeout_s)`` lets the requests in flight finish; then
uvicorn stops listening and waits for the open responses to end (bounded by the same timeout).
A second signal exits at once.

This runs the app and the engine in one process (``lmforge serve --in-process``, encoders, and
``create_app(engine)`` users). ``lmforge serve`` runs a decoder split instead — an engine core
process and HTTP front-end processes, each front-end this same server over a
:class:`runtime.serve.client.CoreClient` (:mod:`runtime.serve.split`).
:mod:`runtime.serve.instances` runs N whole servers in N pinned processes on one port
(``lmforge serve --instances N``). :class:`BackgroundServer` runs it in a thread on a port the OS
picks (``port=0``), for tests and for services that mount it beside their own code
(``lmforge bench-serve ARTIFACT`` starts ``lmforge serve`` as its own process instead).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Self

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # uvicorn's protocol over httptools (the llhttp C parser), if httptools is installed
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    HAVE_HTTPTOOLS = True
except ImportError:  # the pure-Python h11 protocol serves instead
    HAVE_HTTPTOOLS = False
    HttpToolsProtocol = H11Protocol  # type: ignore[assignment,misc]

from runtime.errors import LmforgeError
from runtime.serve.app import ServeLimits, ServeState, create_app

__all__ = ["HTTP_PARSER", "MAX_HEADER_BYTES", "BackgroundServer", "DrainingServer", "HeaderTimeoutH11Protocol",
           "HeaderTimeoutHttpToolsProtocol", "bind", "header_timeout_protocol", "serve", "url_of", "uvicorn_config"]

log = logging.getLogger(__name__)

HTTP_PARSER = "httptools" if HAVE_HTTPTOOLS else "h11"
"""The HTTP/1.1 protocol the server runs: ``"httptools"`` (uvicorn's protocol over the llhttp C
parser) when httptools is installed, else ``"h11"`` (pure Python, which costs the front-end more
CPU per streamed chunk). Both get the same header-read timeout and header-size bound."""

MAX_HEADER_BYTES = 16 * 1024
"""How many bytes a request line and its headers may take (h11's default bound, which the h11
protocol enforces itself; the httptools protocol checks the same here). Past it: 400, closed."""


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (``port=0``: one the OS picks).

    ``reuse_port`` sets ``SO_REUSEPORT``: several processes may then bind the same port and the
    kernel spreads new connections over the ones listening (``lmforge serve --instances``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when their
    # socket says TCP (base_events._set_nodelay); with 0, Nagle held a response's body behind its
    # headers until the client's delayed ACK — ~40 ms added to every small response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LmforgeError(f"cannot listen on {host}:{port}", got=str(exc),
                           fix="choose another --port (or stop what holds it), or check --host") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before it stops listening, and a callback once it listens."""

    def __init__(self, config: uvicorn.Config, state: ServeState, drain_timeout_s: float,
                 on_listen: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.on_listen = on_listen
        self._drain_started = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_listen is not None:
            self.on_listen()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # runs in the main thread
        if self._drain_started:
            log.warning("second signal: exiting without waiting for requests in flight")
            self.force_exit = True
            self.should_exit = True
            return
        self.drain()

    def drain(self) -> None:
        """Refuse new requests, let the engine finish the ones in flight, then stop (non-blocking)."""
        if self._drain_started:
            return
        self._drain_started = True
        self.state.start_drain()
        threading.Thread(target=self._drain, name="lmforge-drain", daemon=True).start()

    def _drain(self) -> None:
        t0 = time.perf_counter()
        try:
            self.state.engine.close(drain=True, timeout=self.drain_timeout_s)
        except Exception as exc:  # noqa: BLE001 — the server must still stop
            log.error("engine.close during drain failed: %s", exc)
        log.info("drained in %.1f s; stopping the server", time.perf_counter() - t0)
        self.should_exit = True


class _HeaderTimer:
    """The header-read timer both protocols share: armed when a connection opens and when a
    response ends with no next request in, disarmed when a request's headers are complete; when
    it fires while the protocol still awaits headers (:meth:`_awaiting_headers`), the connection
    is closed without a response."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def _awaiting_headers(self) -> bool:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]  # the protocol's, after this mixin in the MRO

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %.1f s", self.header_timeout_s)
            self.transport.close()


class HeaderTimeoutH11Protocol(_HeaderTimer, H11Protocol):
    """uvicorn's h11 protocol with a header-read timeout.

    uvicorn has none (0.30 to 0.55 at least): ``timeout_keep_alive`` closes a connection only
    while it sits idle between requests, and the first byte of the next request cancels it;
    ``h11_max_incomplete_event_size`` bounds how large the headers may be, not how long they may
    take. So a client that connects and sends nothing, or sends its headers one byte a second
    (slowloris), held its connection, and one of the server's file descriptors, for as long as
    it liked. Here a request's headers must be complete within ``header_timeout_s`` of the
    connection opening or of the previous response ending, else the connection is closed (no
    response: nothing was asked yet). The request's body and its response are not timed here.

    The server runs this class or :class:`HeaderTimeoutHttpToolsProtocol` (:data:`HTTP_PARSER`),
    never uvicorn's own protocols, which have no such timeout.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_timer()


    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request's headers are in
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request's headers

    def _awaiting_headers(self) -> bool:
        return bool(self.conn.their_state is h11.IDLE)


class HeaderTimeoutHttpToolsProtocol(_HeaderTimer, HttpToolsProtocol):  # without httptools: defined, never served
    """uvicorn's httptools protocol (the llhttp C parser) with the same header-read timeout as
    :class:`HeaderTimeoutH11Protocol`, and a bound on the headers' size.

    A request's headers must be complete within ``header_timeout_s`` of the connection opening or
    of the previous response ending (when no next request is already in), else the connection is
    closed without a response. h11 refuses a request whose headers pass 16 KiB; llhttp has no
    such bound (uvicorn's httptools protocol would buffer headers for as long as they came), so
    here a request whose line and headers are still incomplete after :data:`MAX_HEADER_BYTES`
    gets uvicorn's 400 for an invalid request and the connection is closed.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._reading_headers = True  # the next bytes are a request line and headers
        self._header_bytes = 0
        super().connection_made(transport)
        self._arm_header_timer()


    def data_received(self, data: bytes) -> None:
        if self._reading_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._reading_headers and self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            log.info("closing a connection whose request headers passed %d bytes", MAX_HEADER_BYTES)
            self.send_400_response("Invalid HTTP request received.")

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._disarm_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_headers = True  # the request is read: what comes next is the next one's
        self._header_bytes = 0
        if self.cycle is not None and self.cycle.response_complete and not self.pipeline:
            self._arm_header_timer()  # answered before its body was read: the next request's headers

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._reading_headers and not self.pipeline:
            self._arm_header_timer()  # the next request's headers

    def _awaiting_headers(self) -> bool:
        return self._reading_headers


def header_timeout_protocol(seconds: float, parser: str | None = None) -> type[asyncio.Protocol]:
    """The server's HTTP protocol class with its header timeout set to ``seconds``:
    :class:`HeaderTimeoutHttpToolsProtocol` or :class:`HeaderTimeoutH11Protocol`, as ``parser``
    (``"httptools"`` or ``"h11"``; None: :data:`HTTP_PARSER`) says."""
    if not seconds > 0:
        raise LmforgeError("invalid header timeout", expected="seconds > 0", got=repr(seconds))
    parser = parser or HTTP_PARSER
    if parser == "httptools":
        if not HAVE_HTTPTOOLS:
            raise LmforgeError("the httptools HTTP parser is not installed", fix="pip install httptools")
        return type("HeaderTimeoutHttpToolsProtocol", (HeaderTimeoutHttpToolsProtocol,),
                    {"header_timeout_s": float(seconds)})
    if parser != "h11":
        raise LmforgeError("invalid HTTP parser", expected="'httptools' or 'h11'", got=repr(parser))
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": float(seconds)})


def uvicorn_config(app: Any, drain_timeout_s: float, log_level: str, header_timeout_s: float = 10.0) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False,
                          timeout_graceful_shutdown=max(1, int(drain_timeout_s)), timeout_keep_alive=5,
                          http=header_timeout_protocol(header_timeout_s))


def serve(engine: Any, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          api_key: str | None = None, limits: ServeLimits | None = None, drain_timeout_s: float = 30.0,
          log_level: str = "warning", on_listen: Callable[[str], None] | None = None) -> None:
    """Serve ``engine`` (an ``Engine`` or an ``Encoder``) until SIGTERM/SIGINT, then drain and close
    it. Blocks (main thread). Several pinned processes: :func:`runtime.serve.instances.serve_instances`."""
    sock = bind(host, port)
    app = create_app(engine, served_model_name=served_model_name, api_key=api_key, limits=limits)
    url = url_of(sock)
    header_timeout_s = app.state.lmforge.limits.header_timeout_s
    server = DrainingServer(uvicorn_config(app, drain_timeout_s, log_level, header_timeout_s), app.state.lmforge,
                            drain_timeout_s, on_listen=(lambda: on_listen(url)) if on_listen else None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        app.state.lmforge.engine.close(drain=False)  # an Encoder is closed through its EmbeddingService


class BackgroundServer:
    """The server in a daemon thread on ``host``:``port`` (0 = any free port); a context manager.

    The engine stays the caller's to close. ``stop(drain=True)`` drains as SIGTERM does (and so
    closes the engine); ``stop()`` just stops serving.
    """

    def __init__(self, engine: Any, *, host: str = "127.0.0.1", port: int = 0, served_model_name: str | None = None,
                 api_key: str | None = None, limits: ServeLimits | None = None, drain_timeout_s: float = 30.0,
                 log_level: str = "warning") -> None:
        self._sock = bind(host, port)
        self.url = url_of(self._sock)
        self.port = int(self._sock.getsockname()[1])
        self.app = create_app(engine, served_model_name=served_model_name, api_key=api_key, limits=limits)
        self.state: ServeState = self.app.state.lmforge
        self._listening = threading.Event()
        config = uvicorn_config(self.app, drain_timeout_s, log_level, self.state.limits.header_timeout_s)
        self.server = DrainingServer(config, self.state, drain_timeout_s, on_listen=self._listening.set)
        self._thread = threading.Thread(target=self._run, name="lmforge-serve", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self._sock]))
        except BaseException as exc:  # noqa: BLE001 — reported by start()
            self._error = exc
            self._listening.set()

    def start(self, timeout: float = 30.0) -> Self:
        self._thread.start()
        if not self._listening.wait(timeout) or self._error is not None:
            raise LmforgeError("the background server did not start", got=repr(self._error),
                               fix="see the log above")
        return self

    def stop(self, drain: bool = False, timeout: float = 60.0) -> None:
        if drain:
            self.server.drain()
        else:
            self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_ = signal  # SIGTERM/SIGINT reach DrainingServer.handle_exit through uvicorn's capture_signals
