"""Replicas on Ray Serve under the same load as ``lmforge bench-serve`` (docs/ray.md).

Two comparisons, each a set of rows served one after the other as their own processes, alternated
round by round (other work on the machine then weighs on every row alike), under one closed-loop
streaming load from this process (``lmforge.benchmark.serve_load``: aiohttp, greedy,
``min_tokens`` = ``max_tokens``, random prompts of token ids):

* ``--mode replicas`` (the CPU): ``lmforge serve --replicas 1`` against ``--replicas 2``, one core
  per replica (``--cpus-per-replica 1``, pinned): what a second replica adds.
* ``--mode vs-serve`` (a GPU): ``lmforge serve`` (the engine core and its front-end) against
  ``lmforge serve --replicas 1`` (one Ray Serve replica, the whole GPU, its engine in a core child
  process) on the same device, behind Serve's Python proxy and behind its HAProxy ingress
  (``--ray-haproxy``), and with the engine in the replica's own process (``--in-process``): what
  Ray Serve costs.

The artifact is a folder, or with ``--shape`` a ``random:<shape>`` built as
``bench/gpu_serving.py`` builds it (fp16 shared-buffer on CUDA) under ``--work``.

    python bench/ray_replicas.py ARTIFACT --mode replicas --rounds 3 --json ray_cpu.json
    python bench/ray_replicas.py --shape llama-3.2-1b --device cuda --mode vs-serve --json ray_gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.benchmark.serve_load import (
    HttpTarget,
    ServerProcess,
    parse_slo,
    random_prompts,
    run_closed_loop,
    summarize,
)

log = logging.getLogger("bench.ray_replicas")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rows(mode: str) -> list[tuple[str, list[str]]]:
    """(name, extra `lmforge serve` flags) per row of ``mode``."""
    if mode == "replicas":
        return [("Ray Serve, 1 replica × 1 core", ["--replicas", "1", "--cpus-per-replica", "1"]),
                ("Ray Serve, 2 replicas × 1 core", ["--replicas", "2", "--cpus-per-replica", "1"])]
    return [("lmforge serve", []), ("Ray Serve, 1 replica", ["--replicas", "1"]),
            ("Ray Serve, 1 replica, HAProxy ingress", ["--replicas", "1", "--ray-haproxy"]),
            ("Ray Serve, 1 replica, engine in the replica's process", ["--replicas", "1", "--in-process"])]


class _RayServer(ServerProcess):
    """``lmforge serve --replicas …`` with extra environment (``--ray-env``: Ray Serve's flags)."""

    def __init__(self, artifact: Path, env: dict[str, str], **kwargs: Any) -> None:
        super().__init__(artifact, **kwargs)
        self.extra_env = env

    def _env(self) -> dict[str, str]:
        return {**super()._env(), **self.extra_env}


def server(artifact: Path, args: argparse.Namespace, extra: list[str]) -> ServerProcess:
    common: dict[str, Any] = dict(device=args.device, max_batch=args.max_batch, max_queue=args.max_queue,
                                  start_timeout_s=600.0, stop_timeout_s=120.0)
    if not extra:
        return ServerProcess(artifact, **common)
    env = dict(item.split("=", 1) for item in args.ray_env)
    sp = _RayServer(artifact, env, **common)
    sp.command[sp.command.index("--port") + 1] = str(_free_port())  # Serve's proxy takes a fixed port (not 0)
    sp.command += extra
    return sp


async def load(url: str, args: argparse.Namespace) -> dict[str, Any]:
    target = HttpTarget(url)
    await target.prepare()
    prompts = random_prompts(max(args.requests, args.warmup, 1), args.prompt_len, int(target.vocab or 1000), seed=0)
    params = {"temperature": 0.0}

    def send(i: int) -> Any:
        return target.send(prompts[i % len(prompts)], args.new_tokens, params)

    try:
        if args.warmup:
            await run_closed_loop(send, args.warmup, args.concurrency)
        records, seconds = await run_closed_loop(send, args.requests, args.concurrency)
    finally:
        await target.close()
    return summarize(records, seconds, parse_slo(None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", nargs="?", default=None, help="artifact folder (or --shape)")
    parser.add_argument("--shape", default=None, help="build random:<shape> (bench/gpu_serving.py's build)")
    parser.add_argument("--work", default="/tmp/lmf-serve", help="where --shape builds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mode", choices=("replicas", "vs-serve"), default=None,
                        help="default: replicas on the CPU, vs-serve on CUDA")
    parser.add_argument("--rows", default=None, metavar="I,J,…",
                        help="only these rows of the mode (0-based, the first is the baseline; default all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=1024)
    parser.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the Ray rows' servers only (e.g. RAY_SERVE_ENABLE_HA_PROXY=1)")
    parser.add_argument("--json", default=None, help="write every run and the medians here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mode = args.mode or ("vs-serve" if args.device == "cuda" else "replicas")
    if args.shape:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.gpu_serving import build

        artifact = build(args.shape, Path(args.work), args.device)
    elif args.artifact:
        artifact = Path(args.artifact).resolve()
    else:
        parser.error("pass an ARTIFACT folder or --shape")

    table = rows(mode)
    if args.rows:
        table = [table[int(i)] for i in args.rows.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in table}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for r in range(args.rounds):
        order = table if r % 2 == 0 else table[::-1]  # alternate which row goes first
        for name, extra in order:
            with server(artifact, args, extra) as sp:
                point = asyncio.run(load(sp.url, args))
            point["load_average"] = os.getloadavg()[0]
            runs[name].append(point)
            log.info("round %d  %-34s %8.1f output tok/s  TTFT p50 %s ms  errors %s  (load average %.2f)",
                     r + 1, name, point["output_tok_s"], point["ttft_ms"]["p50"], point["errors"] or 0,
                     point["load_average"])
    names = list(runs)
    base = statistics.median(p["output_tok_s"] for p in runs[names[0]])
    print(f"\n{mode}: {artifact} on {args.device}; {args.concurrency} streaming clients, {args.requests} requests, "
          f"{args.new_tokens} new tokens, prompts of ~{args.prompt_len} ids, greedy; {args.rounds} rounds, "
          "alternated\n")
    print("| row | output tok/s (runs) | median | × first row | TTFT p50 ms (median) | errors |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name in names:
        tps = [p["output_tok_s"] for p in runs[name]]
        med = statistics.median(tps)
        ttft = statistics.median(p["ttft_ms"]["p50"] or 0.0 for p in runs[name])
        errors = sum(sum(p["errors"].values()) for p in runs[name])
        summary[name] = {"median_output_tok_s": med, "ratio": med / base if base else None}
        print(f"| {name} | {', '.join(f'{t:,.0f}' for t in tps)} | {med:,.0f} | {med / base:.2f} | {ttft:,.0f} | "
              f"{errors} |")
    if mode == "vs-serve":  # the ratio of each round, the rows measured minutes apart
        for name in names[1:]:
            ratios = [b["output_tok_s"] / a["output_tok_s"] for a, b in zip(runs[names[0]], runs[name])]
            print(f"\n{name} / lmforge serve per round: {', '.join(f'{x:.2f}' for x in ratios)}")
            summary[name]["ratio_per_round"] = ratios
    if args.json:
        import importlib.metadata as md

        versions = {p: md.version(p) for p in ("ray", "onnxruntime", "fastapi", "uvicorn", "aiohttp")
                    if _installed(p)}
        Path(args.json).write_text(json.dumps({"mode": mode, "artifact": str(artifact), "device": args.device,
                                               "started": started, "args": vars(args), "runs": runs,
                                               "summary": summary, "versions": versions,
                                               "python": platform.python_version(), "cpu": platform.processor()},
                                              indent=1))


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
    except md.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
