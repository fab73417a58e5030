"""Replicas of the server on Ray Serve: many engines behind one OpenAI endpoint, on one machine or many.

lmforge builds no cluster machinery: Ray Serve places the replicas (one per GPU, or one per slice
of CPU cores), routes requests to them (power of two choices by queue length), health-checks
them, restarts the dead, autoscales and drains on scale-down. Each replica is an ordinary Serve
deployment whose FastAPI ingress is :func:`runtime.serve.create_app` over an in-process
:class:`runtime.Engine` (or :class:`runtime.Encoder`): the same routes, error bodies and metrics
as ``lmforge serve``, not a second implementation.

* :class:`LmforgeReplica` (``@serve.ingress`` with the app built in the replica, after the engine
  has loaded): on the CPU it pins itself to slice ``local_rank`` of its node's usable cores before
  loading (:func:`runtime.cpu.pin_cpus`, as ``--instances`` workers do) and gives onnxruntime one
  thread per core of that slice; on a GPU it asks Ray for the card (``num_gpus``) and Ray sets
  ``CUDA_VISIBLE_DEVICES``. A decoder's engine runs in an **engine core child process** of the
  replica (:class:`runtime.serve.split.CoreProcess`, reached through
  :class:`runtime.serve.client.CoreClient`), as ``lmforge serve`` runs it: the replica's event loop
  (HTTP, tokenization, detokenization, SSE, and Serve's own replica machinery) and the engine's
  scheduling loop then do not share one interpreter lock (docs/ray.md measures both ways).
  ``RayOptions.engine_process=False`` keeps the engine in the replica's process (encoders always
  are). ``check_health`` is the
  engine's readiness (a core that died fails it, and its requests in flight fail with a clear
  error); Serve's graceful shutdown lets the requests in flight end, then the replica drains and
  closes its engine (and stops its core).
* Every response carries ``x-lmforge-replica: <replica id>``. ``/metrics`` answers with **every
  live replica's metrics**, each sample labelled ``replica`` (and ``lmforge_replica_info{replica,
  node, pid, core_pid, rank}``): each replica publishes its registry every :data:`PUBLISH_S` to a small named
  actor of the application (:class:`MetricsBoard`) and reads the others' from there, so a scrape
  through the one port sees the whole deployment, at most :data:`PUBLISH_S` stale for the
  replicas other than the one answering.
* :func:`build_app` binds the deployment for ``serve.run``; :func:`app_builder` is the import path
  for ``serve run`` / ``serve deploy`` config files (``runtime.serve.ray_serve:app_builder``);
  :func:`serve_on_ray` is what ``lmforge serve --replicas N`` / ``--ray ADDRESS`` runs.

The set-up across machines, the config file and the numbers: docs/ray.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

import ray
from ray import serve

from runtime.errors import LmforgeError
from runtime.serve.instances import ModelOptions, ResponseHeader, load_model

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "PROXY_CALLBACK", "PUBLISH_S", "REPLICA_HEADER", "LmforgeReplica",
           "MetricsBoard", "RayOptions", "ReplicaLost", "app_builder", "build_app", "proxy_middlewares", "serve_on_ray"]

log = logging.getLogger(__name__)

APP_NAME = "lmforge"
DEPLOYMENT_NAME = "lmforge"
REPLICA_HEADER = "x-lmforge-replica"
PUBLISH_S = 1.0
"""How often a replica publishes its metrics to the application's :class:`MetricsBoard`."""
_STALE_S = 15.0  # a replica that has not published for this long is left out of /metrics


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """How the deployment runs on Ray Serve (the model's options are :class:`ModelOptions`).

    ``replicas`` is the fixed count, or with ``max_replicas`` the autoscaler's floor: Serve then
    keeps ``target_ongoing_requests`` requests per replica (default: the engine's ``max_batch``)
    between ``replicas`` and ``max_replicas``. ``max_ongoing_requests`` is what Serve sends one
    replica at once (default 2 × ``max_batch``: a full running batch and as many waiting in the
    engine's queue; the rest waits in Serve's router, which picks the shorter of two replicas'
    queues). The three delays are Serve's autoscaling knobs (its defaults when None).
    ``cpus_per_replica`` cores are reserved for (and pinned by) each CPU replica;
    ``gpus_per_replica`` cards for each ``cuda`` replica. ``engine_process``: a decoder's engine
    runs in a child process of its replica (the engine core ``lmforge serve`` runs), else in the
    replica's own process.
    """

    replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int | None = None
    cpus_per_replica: int = 1
    gpus_per_replica: float = 1.0
    engine_process: bool = True
    upscale_delay_s: float | None = None  # autoscaling: Serve's defaults unless set
    downscale_delay_s: float | None = None
    look_back_period_s: float | None = None
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    app_name: str = APP_NAME
    route_prefix: str = "/"

    def deployment_options(self, model: ModelOptions) -> dict[str, Any]:
        """The ``Deployment.options`` these options set for ``model``."""
        if self.replicas < 1 or (self.max_replicas is not None and self.max_replicas < self.replicas):
            raise LmforgeError("invalid replica count", expected="replicas >= 1 and max_replicas >= replicas",
                               got=f"replicas {self.replicas}, max_replicas {self.max_replicas}")
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica}
        if model.device == "cuda":
            actor = {"num_cpus": 1, "num_gpus": self.gpus_per_replica}
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests or 2 * model.max_batch,
            "graceful_shutdown_timeout_s": model.drain_timeout_s,
            "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "max_constructor_retry_count": 3,  # a replica that cannot load fails the deployment soon
        }
        if self.max_replicas is not None and self.max_replicas > self.replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas, "initial_replicas": self.replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or float(model.max_batch),
            }
            for knob in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
                if getattr(self, knob) is not None:
                    options["autoscaling_config"][knob] = getattr(self, knob)
        else:
            options["num_replicas"] = self.replicas
        return options


class MetricsBoard:
    """The latest metrics of every replica of one application (a named Ray actor, no CPU reserved)."""

    def __init__(self) -> None:
        self._board: dict[str, tuple[float, list[Any]]] = {}

    def publish(self, replica: str, families: list[Any]) -> dict[str, list[Any]]:
        """Store ``replica``'s families; return the other live replicas' ones."""
        now = time.monotonic()
        self._board[replica] = (now, families)
        return {r: f for r, (t, f) in self._board.items() if r != replica and now - t < _STALE_S}

    def remove(self, replica: str) -> int:
        """Forget ``replica``; return how many replicas are left."""
        self._board.pop(replica, None)
        return len(self._board)


def _board(app: str) -> Any:
    """The application's :class:`MetricsBoard` actor (started by the first caller; detached, so that it
    outlives any one replica; the last replica to stop kills it)."""
    return MetricsActor.options(name=f"lmforge-metrics-{app}", namespace="serve", lifetime="detached",
                                get_if_exists=True, num_cpus=0).remote()


def _labelled(families: Iterable[Any], labels: dict[str, str]) -> list[Any]:
    """Copies of prometheus-client metric families with ``labels`` added to every sample."""
    from prometheus_client.core import Metric

    out = []
    for family in families:
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [s._replace(labels={**s.labels, **labels}) for s in family.samples]
        out.append(copy)
    return out


class _DeploymentMetrics:
    """What a replica's ``/metrics`` renders: its own families (live) and the other replicas' (from
    the board), merged by family name (prometheus-client's ``generate_latest`` takes any object
    with ``collect()``)."""

    def __init__(self, own: Any, labels: dict[str, str]) -> None:
        self.own = own
        self.labels = labels
        self.others: dict[str, list[Any]] = {}

    def families(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily("lmforge_replica_info", "The Ray Serve replicas (this family and every sample "
                                 "carries the replica's id).", labels=list(self.labels))
        info.add_metric(list(self.labels.values()), 1.0)
        return _labelled([*self.own.collect(), info], {"replica": self.labels["replica"]})

    def collect(self) -> Iterator[Any]:
        merged: dict[str, Any] = {}
        for families in [self.families(), *self.others.values()]:
            for family in families:
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()


class ReplicaLost:
    """ASGI middleware for Serve's HTTP proxy: a request whose replica died answers with OpenAI's error
    body instead of Serve's bare ``500 Internal Server Error`` or a connection cut mid-body.

    Before the response started: ``503 replica_lost`` with ``Retry-After: 1`` (OpenAI clients retry
    a 503; Serve routes the retry to a live replica). A server-sent-events stream that started: an
    error event and ``data: [DONE]``, as the server sends when its engine core dies mid-stream.
    Installed by :func:`proxy_middlewares` through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
    (:data:`PROXY_CALLBACK`), which ``lmforge serve --replicas`` sets; a cluster started with
    ``ray start`` needs it in that command's environment (docs/ray.md).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = sse = False

        async def tracking_send(message: Any) -> None:
            nonlocal started, finished, sse
            if message["type"] == "http.response.start":
                started = True
                sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                          for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        await self.app(scope, receive, tracking_send)
        if finished or (started and not sse):
            return
        from runtime.serve.errors import APIError

        error = APIError(503, "the replica serving this request stopped before it finished (its process died) "
                              "| expected a complete response | retry the request: Ray Serve routes it to a live "
                              "replica and replaces the dead one", type="server_error", code="replica_lost",
                         headers={"Retry-After": "1"})
        body = json.dumps(error.body()).encode()
        try:
            if not started:
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            else:
                await send({"type": "http.response.body", "body": b"data: " + body + b"\n\ndata: [DONE]\n\n"})
        except Exception as exc:  # noqa: BLE001 — the client went away too: nothing left to tell it
            log.debug("could not report a lost replica to the client: %s", exc)


PROXY_CALLBACK = "runtime.serve.ray_serve:proxy_middlewares"
"""The value of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` that installs :class:`ReplicaLost`."""


def proxy_middlewares() -> list[Any]:
    """Serve's HTTP proxy callback: the middlewares its proxies run (:class:`ReplicaLost`)."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLost)]


def _replica_cpus(cpus_per_replica: int, local_rank: int) -> list[int]:
    """The cores of the replica ranked ``local_rank`` on its node: slice ``local_rank`` (modulo the
    number of slices) of the node's usable cores cut in slices of ``cpus_per_replica``."""
    from runtime.cpu import available_cores, split_cores

    cores = available_cores()
    slices = split_cores(cores, max(1, min(len(cores), len(cores) // max(1, cpus_per_replica))))
    return slices[local_rank % len(slices)]


class _Replica:
    """One replica: the engine, its app, its metrics publisher (the deployment class without Serve's
    decorators, which :data:`LmforgeReplica` adds)."""

    def __init__(self, options: ModelOptions, cpus_per_replica: int, app_name: str = APP_NAME,
                 engine_process: bool = True) -> None:
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        rank = context.rank
        logging.basicConfig(level=options.log_level.upper(),
                            format=f"%(levelname)s replica {self.replica} %(name)s: %(message)s")
        threads = None
        where = "the GPU Ray gave it"
        if options.device == "cuda":
            _preload_cuda_dlls()
        else:
            from runtime.cpu import format_cpus, pin_cpus

            cpus = pin_cpus(_replica_cpus(cpus_per_replica, rank.local_rank if rank is not None else 0))
            threads = len(cpus)
            where = f"CPUs {format_cpus(cpus)}"
        self.options = options
        self.core: Any = None  # the engine core child process, when the engine runs in one
        self._stopping = False
        self.model = self._load(options, threads, engine_process)
        from runtime.serve.app import create_app

        self.http_app = create_app(self.model, served_model_name=options.served_model_name,
                                   api_key=options.api_key, limits=options.limits())
        self.state = self.http_app.state.lmforge
        self.http_app.add_middleware(ResponseHeader, name=REPLICA_HEADER, value=self.replica)
        labels = {"replica": self.replica, "node": ray.util.get_node_ip_address(), "pid": str(os.getpid()),
                  "core_pid": str(self.core.pid if self.core is not None else ""),
                  "rank": str(rank.rank if rank is not None else "")}
        self.metrics = _DeploymentMetrics(self.state.metrics.render_registry, labels)
        self.state.metrics.render_registry = self.metrics
        self._app_name = app_name
        self._board: Any = None
        self._stop = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, name="lmforge-metrics-publish", daemon=True)
        self._publisher.start()
        log.info("replica %s (rank %s) serves %s on %s", self.replica, labels["rank"], options.artifact, where)

    def _load(self, options: ModelOptions, threads: int | None, engine_process: bool) -> Any:
        """A decoder's engine in a core child process (a :class:`CoreClient` to it), or the
        model in this process (``engine_process`` off, or an encoder)."""
        from runtime.artifact import load_artifact

        if not (engine_process and load_artifact(options.artifact, verify_hashes=False).is_decoder):
            return load_model(options, threads)
        from runtime.serve.client import CoreClient
        from runtime.serve.split import CoreProcess

        core = CoreProcess(options, threads=threads)
        core.start()  # raises LmforgeError with the core's one-line reason
        try:
            client = CoreClient(core.addresses, options.artifact)
        except BaseException:
            core.stop(10)
            raise
        self.core = core
        threading.Thread(target=self._watch_core, args=(client,), name="lmforge-core-watch", daemon=True).start()
        return client

    def _watch_core(self, client: Any) -> None:
        """The core process exited: unless this replica is stopping, its requests in flight fail
        now, with an error that says so, and the health check fails, so Serve replaces the
        replica (a new one starts its own core)."""
        from multiprocessing.connection import wait as wait_sentinels

        wait_sentinels([self.core.proc.sentinel])
        if not self._stopping:
            code = self.core.proc.exitcode
            log.error("replica %s: its engine core (pid %s) exited with code %s", self.replica, self.core.pid, code)
            client.core_lost(f"the engine core process exited with code {code}")

    def __serve_build_asgi_app__(self) -> Any:
        return self.http_app

    def check_health(self) -> None:
        """Serve's health check: the engine's loop runs and takes requests (a replica that fails it is
        replaced)."""
        if not self.state.draining and not self.state.engine.ready:
            raise RuntimeError(f"replica {self.replica}: the engine is not running (its loop stopped)")

    def _publish_loop(self) -> None:
        while not self._stop.wait(PUBLISH_S):
            try:
                if self._board is None:
                    self._board = _board(self._app_name)
                others = ray.get(self._board.publish.remote(self.replica, self.metrics.families()), timeout=10)
                self.metrics.others = others
            except Exception as exc:  # noqa: BLE001 — metrics must never take a replica down
                log.debug("publishing metrics failed: %s", exc)
                self._board = None

    async def __del__(self) -> None:
        """Serve's graceful shutdown (scale-down, update, delete): the requests routed here have ended
        or ``graceful_shutdown_timeout_s`` passed; refuse new ones, drain the engine, leave the board."""
        self._stopping = True
        if not hasattr(self, "_stop"):  # the constructor failed: nothing to drain
            model = getattr(self, "model", None)
            if model is not None:
                model.close()
            if getattr(self, "core", None) is not None:
                self.core.stop(10)
            return
        self._stop.set()
        self.state.start_drain()
        t0 = time.perf_counter()
        # the Engine or its core's client, or an Encoder's EmbeddingService (which closes its Encoder)
        await asyncio.to_thread(self.state.engine.close, True, self.options.drain_timeout_s)
        if self.core is not None:  # the requests have ended: the core drains at once and exits
            await asyncio.to_thread(self.core.stop, 30.0)
        log.info("replica %s drained in %.1f s", self.replica, time.perf_counter() - t0)
        if self._board is not None:
            try:
                left = await self._board.remove.remote(self.replica)
                if left == 0:
                    ray.kill(self._board)
            except Exception as exc:  # noqa: BLE001 — the board may be gone with the cluster
                log.debug("leaving the metrics board failed: %s", exc)


MetricsActor = ray.remote(MetricsBoard)
LmforgeReplica = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress()(_Replica))
"""The Serve deployment (``@serve.deployment`` + ``@serve.ingress``, the app built in the replica)."""


def _preload_cuda_dlls() -> None:
    """Load the CUDA and cuDNN libraries that pip wheels ship, where this onnxruntime can (1.21+)."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 — the session's creation reports the real problem
            log.warning("onnxruntime.preload_dlls() failed: %s", exc)


def build_app(model: ModelOptions, options: RayOptions | None = None) -> Any:
    """The bound application (``serve.run(build_app(...))``)."""
    options = options or RayOptions()
    deployment = LmforgeReplica.options(**options.deployment_options(model))
    if ray.is_initialized():  # start the metrics board while the replicas load (else the first replica does)
        _board(options.app_name)
    return deployment.bind(model, options.cpus_per_replica, options.app_name, options.engine_process)


_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelOptions)}
_RAY_FIELDS = {f.name for f in dataclasses.fields(RayOptions)}


def app_builder(args: dict[str, Any]) -> Any:
    """The application for ``serve run runtime.serve.ray_serve:app_builder artifact=PATH replicas=2`` and
    for a ``serve deploy`` config's ``import_path``; ``args`` are :class:`ModelOptions` and
    :class:`RayOptions` fields (strings from the command line are converted to the field's type)."""
    unknown = sorted(set(args) - _MODEL_FIELDS - _RAY_FIELDS)
    if unknown or "artifact" not in args:
        raise LmforgeError(f"invalid application args {unknown or ''}".rstrip(),
                           expected="artifact=PATH, and fields of ModelOptions or RayOptions: "
                                    + ", ".join(sorted((_MODEL_FIELDS | _RAY_FIELDS) - {"artifact"})),
                           got=", ".join(sorted(args)))
    model = ModelOptions(**{k: _typed(ModelOptions, k, v) for k, v in args.items() if k in _MODEL_FIELDS})
    ray_options = RayOptions(**{k: _typed(RayOptions, k, v) for k, v in args.items() if k in _RAY_FIELDS})
    return build_app(model, ray_options)


def _typed(cls: type, name: str, value: Any) -> Any:
    """``value`` as field ``name`` of ``cls`` wants it (``serve run`` passes every arg as a string)."""
    if not isinstance(value, str):
        return value
    default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
    annotation = str({f.name: f.type for f in dataclasses.fields(cls)}[name])
    if value.lower() in ("none", "null") and "None" in annotation:
        return None
    if isinstance(default, bool) or annotation.startswith("bool"):
        return value.lower() in ("1", "true", "yes", "on")
    if "int" in annotation and "float" not in annotation:
        return int(value)
    if "float" in annotation:
        return float(value)
    return value


def _local_gpus() -> int | None:
    """The GPUs this machine shows (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``), for a local
    cluster (Ray detects them itself too; this makes a container where it does not still work)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi -L failed: %s", exc)
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU ")) or None


def _check_resources(model: ModelOptions, options: RayOptions) -> None:
    """Refuse at once a deployment the cluster cannot place (Serve would wait for it forever)."""
    kind, each = ("GPU", options.gpus_per_replica) if model.device == "cuda" else ("CPU", options.cpus_per_replica)
    need = options.replicas * each
    have = float(ray.cluster_resources().get(kind, 0.0))
    if have < need:
        raise LmforgeError(f"the Ray cluster cannot place {options.replicas} replica(s)",
                           expected=f"{need:g} {kind}(s) ({each:g} per replica)", got=f"{have:g} in the cluster",
                           fix="lower --replicas" + (" or --cpus-per-replica" if kind == "CPU" else "")
                               + ", or add nodes (`ray start --address=HEAD:6379` on each, then --ray HEAD:6379)"
                               + ("; a GPU Ray did not detect: `ray start --head --num-gpus N`, then --ray auto"
                                  if kind == "GPU" else ""))


def serve_on_ray(model: ModelOptions, options: RayOptions, *, address: str | None = None, host: str = "127.0.0.1",
                 port: int = 8000, on_listen: Callable[[str, dict[str, Any]], None] | None = None) -> int:
    """Run the deployment on a local Ray cluster (``address`` None: started here, stopped at the end)
    or on the one at ``address``; serve on ``host:port`` (Serve's proxy on every node) until SIGTERM
    or SIGINT, then delete the application, which drains every replica. Returns 0."""
    from runtime.artifact import load_artifact

    load_artifact(model.artifact, verify_hashes=model.verify_hashes)  # a bad artifact fails here, once
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)  # the proxies inherit it
        gpus = _local_gpus() if address is None and model.device == "cuda" else None
        ray.init(address=address, include_dashboard=False, log_to_driver=model.log_level != "warning",
                 logging_level=logging.WARNING if model.log_level == "warning" else logging.INFO, num_gpus=gpus)
    stop = threading.Event()
    signals = 0

    def on_signal(sig: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting without waiting for requests in flight")
            os._exit(1)
        log.info("signal %d: draining the replicas", sig)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _check_resources(model, options)
        serve.start(http_options={"host": host, "port": port})
        app = build_app(model, options)
        try:
            serve.run(app, name=options.app_name, route_prefix=options.route_prefix)
        except Exception as exc:  # noqa: BLE001 — Serve's failure (a replica that could not start) in one line
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise LmforgeError("the Ray Serve application did not start", got=first[:400],
                               fix="see the replicas' log (rerun with --verbose, or `ray logs` on the cluster)"
                               ) from None
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        if on_listen is not None:
            on_listen(url, {"cluster": ray.get_runtime_context().gcs_address,
                            "nodes": len([n for n in ray.nodes() if n.get("Alive")])})
        while not stop.wait(1.0):
            pass
        serve.delete(options.app_name)  # Serve drains each replica (graceful_shutdown_timeout_s)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if started:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
