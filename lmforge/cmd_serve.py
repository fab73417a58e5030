"""``lmforge serve ARTIFACT``: the OpenAI-compatible HTTP server (``runtime.serve``) over one Engine."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import os
import sys
from typing import Any

from runtime.errors import LmforgeError

__all__ = ["register", "require_serve_extra", "run"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an artifact over the OpenAI HTTP API (completions, chat, streaming, metrics)",
        description="Serve an lmforge artifact on FastAPI + uvicorn: /v1/completions, /v1/chat/completions "
                    "(server-sent events when stream=true), /v1/models, /health, /ready, /metrics. "
                    "SIGTERM or Ctrl-C drains: requests in flight finish, new ones get 503.",
    )
    parser.add_argument("artifact", metavar="ARTIFACT", help="decoder artifact folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000 (0 = any free port)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N", help="running batch limit (default 16)")
    parser.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="waiting requests before 429 (default 256)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default $LMFORGE_API_KEY; none if unset)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model id clients send (default: the artifact folder's name)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                        help="seconds requests in flight get to finish after SIGTERM (default 30)")
    parser.add_argument("--no-verify-hashes", action="store_true", help="skip hashing the artifact's files at load")
    parser.set_defaults(func=run)


def require_serve_extra(command: str) -> None:
    """One clear error when FastAPI, uvicorn or prometheus-client is missing."""
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "httpx") if importlib.util.find_spec(m) is None]
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
        if value < 1:
            raise LmforgeError(f"invalid {flag}", expected="an integer >= 1", got=str(value))
    if not 0 <= args.port < 65536:
        raise LmforgeError("invalid --port", expected="0..65535", got=str(args.port))

    from runtime import Engine
    from runtime.serve import serve

    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if not _is_loopback(args.host) and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can generate "
                    "(pass --api-key or set LMFORGE_API_KEY)", args.host)
    engine = Engine.load(args.artifact, device=args.device, verify_hashes=not args.no_verify_hashes,
                         max_batch=args.max_batch, max_queue=args.max_queue, threads=args.threads)

    def listening(url: str) -> None:
        name = args.served_model_name or os.path.basename(os.path.normpath(args.artifact))
        auth = ", API key required" if api_key else ""
        print(f"lmforge serve: {name} on {url} (OpenAI API at {url}/v1{auth}; Ctrl-C or SIGTERM drains and stops)",
              flush=True)

    serve(engine, host=args.host, port=args.port, served_model_name=args.served_model_name, api_key=api_key,
          drain_timeout_s=args.drain_timeout, log_level="info" if args.verbose or args.debug else "warning",
          on_listen=listening)
    print("lmforge serve: stopped", file=sys.stderr)
    return 0
