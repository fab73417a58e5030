"""``lmforge serve ARTIFACT [--api-workers N] [--instances N] [--in-process] [--replicas N] [--ray ADDRESS]``:
the OpenAI-compatible HTTP server (``runtime.serve``).

A decoder artifact gets an ``Engine`` (completions, chat), an encoder artifact an ``Encoder``
(``/v1/embeddings``), as the manifest says. A decoder is served by default as separate processes
(``runtime.serve.split``): one engine core that owns the engine and its loop, and ``--api-workers N``
HTTP front-ends on one port; ``--in-process`` runs the app and the engine in this one process (as
encoders always are). ``--instances N`` runs N whole servers (each its own engine) on one port,
each pinned to its own slice of the usable cores (``runtime.serve.instances``). ``--replicas N`` (or
``--ray ADDRESS``) runs N replicas on Ray Serve, on a local Ray cluster or an existing one, behind
the same app (``runtime.serve.ray_serve``, the ray extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import os
import sys
from typing import Any

from runtime.errors import LmforgeError
from runtime.options import DEFAULTS

__all__ = ["register", "require_serve_extra", "run"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an artifact over the OpenAI HTTP API (completions, chat, streaming, embeddings, metrics)",
        description="Serve an lmforge artifact on FastAPI + uvicorn: a decoder on /v1/completions and "
                    "/v1/chat/completions (server-sent events when stream=true), an encoder on /v1/embeddings; "
                    "/v1/models, /health, /ready, /metrics for both. A decoder runs as an engine core process and "
                    "--api-workers HTTP front-end processes (--in-process: one process). SIGTERM or Ctrl-C "
                    "drains: requests in flight finish, new ones get 503.",
    )
    parser.add_argument("artifact", metavar="ARTIFACT", help="decoder or encoder artifact folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000 (0 = any free port)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch, metavar="N",
                        help=f"running batch limit (default {DEFAULTS.max_batch})")
    parser.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue, metavar="N",
                        help=f"waiting requests before 429 (default {DEFAULTS.max_queue})")
    parser.add_argument("--prefill-tokens", type=int, default=None, metavar="N",
                        help="admit at most N prompt tokens per step boundary (running streams then wait for one "
                             "budget of prefill, not for every new request; a longer prompt is admitted alone); 0: no "
                             "budget (default: 1024 on CUDA, none on the CPU)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="onnxruntime intra-op threads (per instance; default: one per physical core, or per "
                             "core of the instance's slice; the engine core of a CPU server leaves each HTTP "
                             "front-end a core when its model's tokens are cheap enough that they would need one, "
                             "docs/serving.md)")
    parser.add_argument("--instances", type=int, default=1, metavar="N",
                        help="worker processes behind the one port, each pinned to its own equal slice of the "
                             "usable cores ($LMFORGE_CPUS, else the process's affinity); CPU only (default 1)")
    parser.add_argument("--api-workers", type=int, default=1, metavar="N",
                        help="HTTP front-end processes (tokenization, detokenization, SSE) on the one port, in front "
                             "of one engine core process (default 1)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the HTTP app and the engine in this one process (no engine core process; "
                             "encoders and --instances always do; with --replicas: the engine in each replica's "
                             "process)")
    ray = parser.add_argument_group("replicas on Ray Serve (the ray extra; docs/ray.md)")
    ray.add_argument("--replicas", type=int, default=None, metavar="N",
                     help="serve N replicas on Ray Serve behind the one port: one per GPU with --device cuda, one "
                          "per --cpus-per-replica cores (pinned) on the CPU; each loads the artifact; a local Ray "
                          "cluster is started unless --ray names one")
    ray.add_argument("--ray", default=None, metavar="ADDRESS",
                     help="run the replicas on the Ray cluster at ADDRESS ('auto', or HEAD_IP:6379 from "
                          "`ray start --head`) instead of a local one (default replicas: 1)")
    ray.add_argument("--max-replicas", type=int, default=None, metavar="M",
                     help="autoscale between --replicas and M replicas, keeping --target-ongoing-requests per "
                          "replica")
    ray.add_argument("--target-ongoing-requests", type=float, default=None, metavar="T",
                     help="the autoscaler's requests in flight per replica (default: --max-batch)")
    ray.add_argument("--ray-haproxy", action="store_true",
                     help="Ray Serve's HAProxy ingress (its RAY_SERVE_ENABLE_HA_PROXY feature flag) in place of its "
                          "Python proxy, for the cluster this command starts (docs/ray.md: faster; a lost replica's "
                          "requests then get HAProxy's error, not an OpenAI body)")
    ray.add_argument("--cpus-per-replica", type=int, default=None, metavar="K",
                     help="CPU replicas: cores reserved for and pinned by each (default: this machine's usable "
                          "cores / --replicas, at least 1)")
    parser.add_argument("--max-core-restarts", type=int, default=3, metavar="N",
                        help="times a dead engine core is restarted before the server exits 1 (default 3)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default $LMFORGE_API_KEY; none if unset)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model id clients send (default: the artifact folder's name)")
    parser.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                        help="seconds a client has to send a request's headers, from connecting or from the previous "
                             "response; slower connections are closed (default 10)")
    parser.add_argument("--chat-default-max-tokens", type=int, default=1024, metavar="N",
                        help="max_tokens of a chat request that sets none: the rest of the context, capped by the "
                             "artifact's max_new_tokens and by N (default 1024; 0: no cap, as vLLM)")
    parser.add_argument("--stream-interval", type=int, default=1, metavar="N",
                        help="tokens per streamed chunk: hold a request's text until N new tokens (its first "
                             "and last go out at once); fewer, larger chunks cost the server and its clients "
                             "less CPU (default 1: every token as it comes)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                        help="seconds requests in flight get to finish after SIGTERM (default 30)")
    parser.add_argument("--no-verify-hashes", action="store_true", help="skip hashing the artifact's files at load")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="CUDA: do not capture every batch bucket's decode step before listening (the "
                             "first requests of each bucket then pay for its capture)")
    parser.set_defaults(func=run)


def require_serve_extra(command: str) -> None:
    """One clear error when a package of the serve extra is missing."""
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "httpx", "zmq", "msgpack")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise LmforgeError(f"`lmforge {command}` needs the serve extra", got=f"missing {', '.join(missing)}",
                           fix="pip install 'lmforge[serve]'")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    require_serve_extra("serve")
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value is not None and value < 1:
            raise LmforgeError(f"invalid {flag}", expected="an integer >= 1", got=str(value))
    if args.prefill_tokens is not None and args.prefill_tokens < 0:
        raise LmforgeError("invalid --prefill-tokens", expected="an integer >= 1, or 0 for no budget",
                           got=str(args.prefill_tokens))
    if not 0 <= args.port < 65536:
        raise LmforgeError("invalid --port", expected="0..65535", got=str(args.port))
    if not 0 < args.header_timeout < float("inf"):
        raise LmforgeError("invalid --header-timeout", expected="seconds > 0", got=str(args.header_timeout))
    if args.stream_interval < 1:
        raise LmforgeError("invalid --stream-interval", expected="an integer >= 1 (tokens per streamed chunk)",
                           got=str(args.stream_interval))
    if args.chat_default_max_tokens < 0:
        raise LmforgeError("invalid --chat-default-max-tokens", expected="an integer >= 0 (0: no cap)",
                           got=str(args.chat_default_max_tokens))
    if args.replicas is not None or args.ray is not None:
        return _run_on_ray(args)
    for flag in ("max_replicas", "target_ongoing_requests", "cpus_per_replica", "ray_haproxy"):
        if getattr(args, flag) not in (None, False):
            raise LmforgeError(f"--{flag.replace('_', '-')} without --replicas or --ray",
                               expected="--replicas N (or --ray ADDRESS) with it", fix="add --replicas N, or drop it")
    slices = _slices(args.instances, args.device, args.threads)
    if args.api_workers < 1:
        raise LmforgeError("invalid --api-workers", expected="an integer >= 1", got=str(args.api_workers))
    if args.max_core_restarts < 0:
        raise LmforgeError("invalid --max-core-restarts", expected="an integer >= 0", got=str(args.max_core_restarts))
    if args.api_workers > 1 and (slices is not None or args.in_process):
        other = "--in-process" if args.in_process else "--instances"
        raise LmforgeError(f"--api-workers {args.api_workers} with {other}",
                           expected="--api-workers with the engine core (the default)",
                           fix="drop --in-process / --instances, or --api-workers")
    if args.device == "cuda":
        _preload_cuda_dlls()

    from runtime.serve import serve
    from runtime.serve.instances import ModelOptions, load_model, serve_instances

    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if not _is_loopback(args.host) and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can generate "
                    "(pass --api-key or set LMFORGE_API_KEY)", args.host)
    log_level = "info" if args.verbose or args.debug else "warning"
    options = ModelOptions(artifact=args.artifact, device=args.device, verify_hashes=not args.no_verify_hashes,
                           max_batch=args.max_batch, max_queue=args.max_queue, prefill_tokens=args.prefill_tokens,
                           served_model_name=args.served_model_name, api_key=api_key,
                           drain_timeout_s=args.drain_timeout, log_level=log_level, warm_up=not args.no_warm_up,
                           header_timeout_s=args.header_timeout,
                           chat_default_max_tokens=args.chat_default_max_tokens or None,
                           stream_interval=args.stream_interval)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.artifact))
    auth = ", API key required" if api_key else ""

    if slices is None and not args.in_process and _is_decoder(args.artifact):
        from runtime.serve.split import SplitOptions, serve_split

        def listening_split(url: str, pids: list[int], core: int, threads: int | None) -> None:
            workers = f"{len(pids)} front-ends, pids {', '.join(map(str, pids))}" if len(pids) > 1 else f"pid {pids[0]}"
            compute = "" if threads is None else f", {threads} onnxruntime thread{'s' * (threads > 1)}"
            print(f"lmforge serve: {name} on {url} (OpenAI API at {url}/v1{auth}; engine core pid {core}{compute}, "
                  f"HTTP {workers}; Ctrl-C or SIGTERM drains and stops)", flush=True)

        split = SplitOptions(api_workers=args.api_workers, threads=args.threads,
                             max_core_restarts=args.max_core_restarts)
        code = serve_split(options, split, host=args.host, port=args.port, on_listen=listening_split)
        print("lmforge serve: stopped" if code == 0 else "lmforge serve: the server could not go on (see the log); "
              "stopped", file=sys.stderr)
        return code

    if slices is None:
        def listening(url: str) -> None:
            print(f"lmforge serve: {name} on {url} (OpenAI API at {url}/v1{auth}; Ctrl-C or SIGTERM drains and "
                  "stops)", flush=True)

        serve(load_model(options, args.threads), host=args.host, port=args.port,
              served_model_name=args.served_model_name, api_key=api_key, drain_timeout_s=args.drain_timeout,
              log_level=log_level, on_listen=listening, limits=options.limits())
        print("lmforge serve: stopped", file=sys.stderr)
        return 0

    from runtime.cpu import format_cpus

    def listening_n(url: str, pids: list[int]) -> None:
        cores = ", ".join(f"{i}: CPUs {format_cpus(c)} pid {pid}" for i, (c, pid) in enumerate(zip(slices, pids)))
        print(f"lmforge serve: {name} on {url} ({len(slices)} instances × {args.threads or len(slices[0])} "
              f"thread(s) [{cores}]; OpenAI API at {url}/v1{auth}; Ctrl-C or SIGTERM drains and stops)", flush=True)

    code = serve_instances(options, slices, host=args.host, port=args.port, threads=args.threads,
                           on_listen=listening_n)
    print("lmforge serve: stopped" if code == 0 else "lmforge serve: a worker died; stopped the others",
          file=sys.stderr)
    return code


def _run_on_ray(args: argparse.Namespace) -> int:
    """``--replicas N`` / ``--ray ADDRESS``: the replicas on Ray Serve (runtime.serve.ray_serve)."""
    if importlib.util.find_spec("ray") is None:
        raise LmforgeError("`lmforge serve --replicas` / `--ray` needs the ray extra", got="missing ray",
                           fix="pip install 'lmforge[ray]'")
    replicas = 1 if args.replicas is None else args.replicas
    if replicas < 1:
        raise LmforgeError("invalid --replicas", expected="an integer >= 1", got=str(replicas))
    if args.max_replicas is not None and args.max_replicas < replicas:
        raise LmforgeError("invalid --max-replicas", expected=f"an integer >= --replicas ({replicas})",
                           got=str(args.max_replicas))
    if args.ray_haproxy and args.ray is not None:
        raise LmforgeError("--ray-haproxy with --ray", expected="--ray-haproxy for the local cluster this command "
                           "starts", fix="start the cluster's nodes with RAY_SERVE_ENABLE_HA_PROXY=1 in `ray start`'s "
                           "environment instead (docs/ray.md)")
    if args.target_ongoing_requests is not None and not args.target_ongoing_requests > 0:
        raise LmforgeError("invalid --target-ongoing-requests", expected="a number > 0",
                           got=str(args.target_ongoing_requests))
    clash = [flag for flag, on in (("--instances", args.instances != 1), ("--api-workers", args.api_workers != 1),
                                   ("--threads", args.threads is not None))
             if on]
    if clash:
        raise LmforgeError(f"--replicas / --ray with {clash[0]}",
                           expected="Ray Serve replicas alone (each with its own engine, pinned to its "
                                    "--cpus-per-replica cores, one thread per core)",
                           fix=f"drop {clash[0]}, or drop --replicas / --ray")
    from runtime.cpu import available_cores

    cpus = args.cpus_per_replica or max(1, len(available_cores()) // replicas)
    if cpus < 1:
        raise LmforgeError("invalid --cpus-per-replica", expected="an integer >= 1", got=str(cpus))
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if not _is_loopback(args.host) and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can generate "
                    "(pass --api-key or set LMFORGE_API_KEY)", args.host)
    from runtime.serve.instances import ModelOptions
    from runtime.serve.ray_serve import RayOptions, serve_on_ray

    options = ModelOptions(artifact=os.path.abspath(args.artifact), device=args.device,
                           verify_hashes=not args.no_verify_hashes, max_batch=args.max_batch,
                           max_queue=args.max_queue, prefill_tokens=args.prefill_tokens,
                           served_model_name=args.served_model_name,
                           api_key=api_key, drain_timeout_s=args.drain_timeout,
                           log_level="info" if args.verbose or args.debug else "warning",
                           warm_up=not args.no_warm_up, header_timeout_s=args.header_timeout,
                           chat_default_max_tokens=args.chat_default_max_tokens or None,
                           stream_interval=args.stream_interval)
    ray_options = RayOptions(replicas=replicas, max_replicas=args.max_replicas,
                             target_ongoing_requests=args.target_ongoing_requests, cpus_per_replica=cpus,
                             engine_process=not args.in_process)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.artifact))
    auth = ", API key required" if api_key else ""

    def listening(url: str, cluster: dict[str, Any]) -> None:
        scale = (f"{replicas} to {args.max_replicas} replicas (autoscaling)" if args.max_replicas
                 and args.max_replicas > replicas else f"{replicas} replica{'s' if replicas > 1 else ''}")
        each = "1 GPU" if args.device == "cuda" else f"{cpus} CPU core{'s' if cpus > 1 else ''}"
        print(f"lmforge serve: {name} on {url} ({scale} on Ray Serve, {each} each; Ray cluster "
              f"{cluster['cluster']}, {cluster['nodes']} node(s); OpenAI API at {url}/v1{auth}; Ctrl-C or SIGTERM "
              "drains and stops)", flush=True)

    if args.ray_haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"  # read by Serve's controller and proxies, which inherit it
    code = serve_on_ray(options, ray_options, address=args.ray, host=args.host, port=args.port,
                        on_listen=listening)
    print("lmforge serve: stopped", file=sys.stderr)
    return code


def _is_decoder(artifact: str) -> bool:
    from runtime.artifact import load_artifact

    return bool(load_artifact(artifact, verify_hashes=False).is_decoder)


def _preload_cuda_dlls() -> None:
    """Load the CUDA and cuDNN libraries that pip wheels ship (nvidia-*-cu12), when this onnxruntime
    can (``onnxruntime.preload_dlls``, 1.21+): without it the CUDA provider finds them only on
    ``LD_LIBRARY_PATH``. Harmless where they are found anyway; a failure is a warning, and the
    engine's own load then says what is missing."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 — the session's creation reports the real problem
        log.warning("onnxruntime.preload_dlls() failed: %s", exc)


def _slices(instances: int, device: str, threads: int | None) -> list[list[int]] | None:
    """The CPU slice of each instance (None for one instance: it serves in this process, unpinned)."""
    from runtime.cpu import available_cores, format_cpus, pin_from_env, split_cores

    if instances < 1:
        raise LmforgeError("invalid --instances", expected="an integer >= 1", got=str(instances))
    if instances == 1:
        return None
    if device != "cpu":
        raise LmforgeError(f"--instances {instances} with --device {device}", expected="--device cpu",
                           fix="drop --instances: one process drives the GPU; --max-batch sets how much it batches")
    cores = pin_from_env() or available_cores()
    if instances > len(cores):
        raise LmforgeError("invalid --instances", expected=f"1 to {len(cores)} (one core per instance at least; "
                           f"usable CPUs {format_cpus(cores)})", got=str(instances),
                           fix="lower --instances, or give the process more CPUs ($LMFORGE_CPUS or taskset)")
    slices = split_cores(cores, instances)
    if threads is not None and not 1 <= threads <= len(slices[0]):
        raise LmforgeError("invalid --threads", expected=f"1 to {len(slices[0])} per instance "
                           f"({instances} instances over CPUs {format_cpus(cores)})", got=str(threads),
                           fix="leave --threads out: each instance gets one thread per core of its slice")
    return slices
