"""``lmforge bench-serve URL|ARTIFACT...``: load-test OpenAI-compatible servers like the field does.

For each target (a running server's URL, or an artifact this command serves with ``lmforge serve``
as its own process on a port the OS picks, and stops after), runs open-loop sweeps (``--rates``:
Poisson arrivals; ``inf`` = all at once) and closed-loop sweeps (``--concurrency``: N clients
back to back), streaming every request, and reports per point request throughput, output
tokens/s, TTFT / ITL / end-to-end latency at p50/p90/p99, errors by kind and goodput at
``--slo``. ``--compare-engine`` (artifacts only) runs the same schedule, the same prompts and
parameters, against the same engine in-process at its best — each request submitted and read by
a thread of its own, no HTTP and no asyncio relay (:class:`lmforge.benchmark.serve_load.EngineTarget`)
— and reports HTTP/engine per point (output tok/s, TTFT and ITL p50/p99): what the server costs,
and the way to compare with runtimes that have no HTTP server (onnxruntime-genai has none). It
loads the engine only after the server process has stopped, so the two never hold the device
together.

The server is a process of its own, not a thread of this one: in one process the load generator,
uvicorn and the engine's loop would share one GIL and the load would slow the server it measures
(docs/benchmarks.md, "GPU: the server under load").
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

from runtime.errors import GenerationError
from runtime.options import DEFAULTS

__all__ = ["register", "run"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-serve",
        help="load-test an OpenAI-compatible server (open-loop rates, closed-loop concurrency)",
        description="Stream requests at Poisson rates and at fixed concurrency against each target (a URL, "
                    "or an ARTIFACT served by `lmforge serve` in its own process for the run); report throughput, "
                    "TTFT/ITL/e2e p50/p90/p99, errors by kind and goodput at --slo.",
    )
    parser.add_argument("targets", nargs="+", metavar="URL|ARTIFACT",
                        help="http(s)://host:port of a running server, or an artifact folder to serve")
    parser.add_argument("--rates", default=None, metavar="R[,R…]",
                        help="open-loop arrival rates in requests/s, inf = all at once (e.g. 1,2,4,inf)")
    parser.add_argument("--concurrency", default=None, metavar="C[,C…]",
                        help="closed-loop client counts (default 1,4,16 when --rates is not given)")
    parser.add_argument("--requests", type=int, default=32, metavar="N", help="requests per point (default 32)")
    parser.add_argument("--prompts", default="random", metavar="random|parity|FILE",
                        help="random token ids (default), the parity prompt set, or a JSON-lines file "
                             "with {\"prompt\", \"chat\"} per line")
    parser.add_argument("--prompt-len", type=int, default=128, metavar="N",
                        help="random prompts: mean length in tokens, uniform ±50%% (default 128)")
    parser.add_argument("--new-tokens", type=int, default=128, metavar="N",
                        help="tokens per request, exactly (sent as max_tokens and min_tokens; default 128)")
    parser.add_argument("--mix", default="greedy:0.5,sampled:0.5", metavar="greedy:W,sampled:W",
                        help="share of greedy and sampled (T=0.8, top-p 0.95) requests (default half each)")
    parser.add_argument("--slo", default=None, metavar="ttft=200ms,itl=50ms,e2e=10s",
                        help="goodput counts requests within all of these (itl: the request's mean)")
    parser.add_argument("--max-seconds", type=float, default=None, metavar="S",
                        help="per point: send no new request after S seconds")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S", help="per request (default 300)")
    parser.add_argument("--warmup", type=int, default=2, metavar="N", help="requests before each target (default 2)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="prompts, arrivals and mix (default 0)")
    parser.add_argument("--api-key", default=None, metavar="KEY", help="bearer key for the URL targets")
    parser.add_argument("--model", default=None, metavar="NAME", help="model id to send (default: the server's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="for ARTIFACT targets")
    parser.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch, metavar="N",
                        help=f"for ARTIFACT targets (default {DEFAULTS.max_batch})")
    parser.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue, metavar="N",
                        help=f"for ARTIFACT targets (default {DEFAULTS.max_queue})")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="for ARTIFACT targets: onnxruntime's intra-op threads, the server and the engine alike")
    parser.add_argument("--server-threads", type=int, default=None, metavar="N",
                        help="the started server's own (lmforge serve --threads; default: --threads), so that the "
                             "server and the in-process engine can each run at their best")
    parser.add_argument("--prefill-tokens", type=int, default=None, metavar="N",
                        help="for ARTIFACT targets, the server and the engine alike: prompt tokens admitted per "
                             "step boundary (lmforge serve --prefill-tokens; 0: no budget; default: the device's)")
    parser.add_argument("--api-workers", type=int, default=1, metavar="N",
                        help="HTTP front-end processes of the server started for an ARTIFACT target (default 1)")
    parser.add_argument("--stream-interval", type=int, default=1, metavar="N",
                        help="the started server's tokens per streamed chunk (lmforge serve --stream-interval)")
    parser.add_argument("--in-process", action="store_true",
                        help="serve an ARTIFACT target with `lmforge serve --in-process` (one process)")
    parser.add_argument("--start-timeout", type=float, default=120.0, metavar="S",
                        help="ARTIFACT targets: seconds the server process gets to answer /ready (default 120)")
    parser.add_argument("--compare-engine", action="store_true",
                        help="ARTIFACT targets: also run the schedule against the engine in-process (no HTTP)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the report here")
    parser.add_argument("--plot", default=None, metavar="PNG", help="latency against throughput per runtime")
    parser.set_defaults(func=run)


def _ints(flag: str, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise GenerationError(f"invalid {flag}", expected="positive integers, comma-separated, e.g. 1,4,16",
                              got=repr(text))
    return tuple(int(p) for p in parts)


@dataclasses.dataclass(frozen=True)
class _Plan:
    rates: tuple[float, ...]
    concurrency: tuple[int, ...]
    requests: int
    new_tokens: int
    max_seconds: float | None
    warmup: int
    seed: int


def _prompts(spec: str, vocab: int | None, args: argparse.Namespace) -> list[Any]:
    from lmforge.benchmark import serve_load

    if spec == "random":
        if vocab is None:
            log.warning("the server does not report its vocabulary size: random prompt ids stay below 1000")
        return serve_load.random_prompts(max(args.requests, 64), args.prompt_len, vocab or 1000, seed=args.seed)
    if spec == "parity":
        import parity

        return serve_load.load_prompts(Path(parity.__file__).parent / "prompts" / "default.jsonl")
    return serve_load.load_prompts(spec)


async def _sweep(target: Any, prompts: list[Any], plan: _Plan, mix: Any, slo: Any,
                 server_pid: int | None = None) -> list[dict[str, Any]]:
    """Warm up, then run each point of ``plan`` against ``target``; with the CPU time per token of
    this process and (``server_pid``) of the server's processes during each point."""
    from lmforge.benchmark import serve_load
    from lmforge.benchmark.cpu_time import CpuSampler, per_token

    def send_for(point: int) -> Any:
        async def send(i: int) -> serve_load.RequestRecord:
            k = point * 100_003 + i
            params = mix.params(random.Random(plan.seed * 1_000_003 + k), k)
            return await target.send(prompts[(k + plan.seed) % len(prompts)], plan.new_tokens, params)
        return send

    if plan.warmup:
        warm = await asyncio.gather(*(send_for(-1)(i) for i in range(plan.warmup)))
        bad = [r.error for r in warm if not r.ok]
        if bad:
            log.warning("%s: %d of %d warm-up requests failed (%s)", target.name, len(bad), len(warm), bad[0])
    results = []
    points = [("rate", r) for r in plan.rates] + [("concurrency", c) for c in plan.concurrency]
    cpu = CpuSampler(server_pid)
    for n, (mode, value) in enumerate(points):
        send = send_for(n)
        cpu_before = cpu.sample()
        if mode == "rate":
            records, duration = await serve_load.run_open_loop(send, plan.requests, value, seed=plan.seed + n,
                                                               max_seconds=plan.max_seconds)
        else:
            records, duration = await serve_load.run_closed_loop(send, plan.requests, int(value),
                                                                 max_seconds=plan.max_seconds)
        summary = serve_load.summarize(records, duration, slo)
        summary["cpu_us_per_token"] = per_token(cpu_before, cpu.sample(), summary["output_tokens"])
        shown = "inf" if mode == "rate" and math.isinf(value) else value
        results.append({"target": target.name, "kind": target.kind, "mode": mode, "value": shown, **summary})
        _print_point(results[-1])
    return results


def _fmt(d: dict[str, Any]) -> str:
    return "/".join("-" if d[k] is None else f"{d[k]:.0f}" for k in ("p50", "p90", "p99"))


def _print_point(p: dict[str, Any]) -> None:
    errors = ",".join(f"{k}:{v}" for k, v in sorted(p["errors"].items())) or "none"
    print(f"  {p['mode']:>11} {p['value']!s:>5}  {p['completed']:>4}/{p['requests']:<4} {p['request_throughput']:7.2f} "
          f"req/s {p['output_tok_s']:9.1f} tok/s  ttft {_fmt(p['ttft_ms']):>17} ms  itl {_fmt(p['itl_ms']):>14} ms  "
          f"e2e {_fmt(p['e2e_ms']):>17} ms  goodput {p['goodput_req_s']:.2f} req/s  errors {errors}{_cpu_text(p)}",
          flush=True)


def _cpu_text(p: dict[str, Any]) -> str:
    cpu = p.get("cpu_us_per_token")
    if not cpu:
        return ""
    server = f"server {cpu['server']:.0f} + " if "server" in cpu else ""
    return f"  cpu/token {server}bench-serve {cpu['bench_serve']:.0f} µs"


async def _run_url(spec: str, args: argparse.Namespace, plan: _Plan, mix: Any, slo: Any,
                   prompts: list[Any] | None = None,
                   server_pid: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], list[Any]]:
    """Sweep an HTTP target; its description, the points, and the prompts it was sent (``prompts``,
    or made for the vocabulary the server reports)."""
    from lmforge.benchmark.serve_load import HttpTarget

    target = HttpTarget(spec, model=args.model, api_key=args.api_key, timeout_s=args.timeout)
    try:
        await target.prepare()
        print(f"{target.name}:", flush=True)
        if prompts is None:
            prompts = _prompts(args.prompts, target.vocab, args)
        points = await _sweep(target, prompts, plan, mix, slo, server_pid)
        return {"target": target.name, "model": target.model}, points, prompts
    finally:
        await target.close()


ENGINE_BEFORE = "engine (in-process)"  # the engine's run before the server's (--compare-engine)
ENGINE_AFTER = "engine (in-process, after)"  # and after it


async def _engine_sweep(spec: str, args: argparse.Namespace, plan: _Plan, mix: Any, slo: Any,
                        prompts: list[Any] | None, name: str, kind: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """The schedule against the engine loaded in this process (no HTTP), its points marked ``kind``,
    and the prompts it sent (``prompts``, or made for the engine's vocabulary)."""
    from lmforge.benchmark.serve_load import EngineTarget
    from runtime import Engine

    engine = Engine.load(spec, device=args.device, max_batch=args.max_batch, max_queue=args.max_queue,
                         threads=args.threads, prefill_tokens=args.prefill_tokens)
    try:
        engine.warm_up()  # as `lmforge serve` does before it listens (CUDA graphs; a no-op otherwise)
        local = EngineTarget(engine, name=name)
        print(f"{local.name}:", flush=True)
        prompts = prompts if prompts is not None else _prompts(args.prompts, local.vocab, args)
        points = await _sweep(local, prompts, plan, mix, slo)
    finally:
        engine.close(drain=False)
    return [{**p, "kind": kind} for p in points], prompts


async def _run_target(spec: str, args: argparse.Namespace, plan: _Plan, mix: Any,
                      slo: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One target's descriptions (how each was served) and points: a URL as it is; an artifact served
    by ``lmforge serve`` in its own process and (``--compare-engine``) in this one without HTTP, once
    before the server and once after it, so that the machine's drift during a round weighs on both
    sides of the comparison (:func:`_http_over_engine` takes their mean)."""
    from lmforge.benchmark.serve_load import ServerProcess

    if spec.startswith(("http://", "https://")):
        info, results, _ = await _run_url(spec, args, plan, mix, slo)
        return [{**info, "served": "already running (not started by bench-serve)", "url": spec}], results

    before: list[dict[str, Any]] = []
    prompts: list[Any] | None = None
    if args.compare_engine:
        before, prompts = await _engine_sweep(spec, args, plan, mix, slo, None, spec, ENGINE_BEFORE)
    server = ServerProcess(spec, device=args.device, max_batch=args.max_batch, max_queue=args.max_queue,
                           threads=args.threads if args.server_threads is None else args.server_threads,
                           api_workers=args.api_workers, in_process=args.in_process,
                           stream_interval=args.stream_interval, prefill_tokens=args.prefill_tokens,
                           start_timeout_s=args.start_timeout)
    try:
        server.start()
        print(f"{spec}: `lmforge serve` as its own process (pid {server.pid}, max batch {args.max_batch}) "
              f"on {server.url}", flush=True)
        info, results, prompts = await _run_url(server.url, args, plan, mix, slo, prompts, server.pid)
        infos = [{**info, **server.describe()}]
    finally:
        server.stop()
    if not args.compare_engine:
        return infos, results
    after, _ = await _engine_sweep(spec, args, plan, mix, slo, prompts, info["model"] or spec, ENGINE_AFTER)
    name = after[0]["target"] if after else f"{spec} (in-process engine)"
    for p in before:
        p["target"] = name
    infos.append({"target": name, "served": "in-process engine in the bench-serve process (no HTTP), loaded "
                  "before the server process started and again after it stopped"})
    return infos, results + before + after


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def _http_over_engine(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each HTTP point over the in-process engine's points of the same schedule (``--compare-engine``):
    the mean of the engine's runs before and after the server's."""
    engine: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in results:
        if p["kind"] in (ENGINE_BEFORE, ENGINE_AFTER):
            engine.setdefault((p["mode"], str(p["value"])), []).append(p)

    def mean(points: list[dict[str, Any]], *keys: str) -> float | None:
        values = [_get(p, keys) for p in points]
        return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]

    out = []
    for p in results:
        e = engine.get((p["mode"], str(p["value"]))) if p["kind"] == "http" else None
        if not e:
            continue
        out.append({"mode": p["mode"], "value": p["value"],
                    "output_tok_s": _ratio(p["output_tok_s"], mean(e, "output_tok_s")),
                    "engine_output_tok_s": [q["output_tok_s"] for q in e],
                    "ttft_p50": _ratio(p["ttft_ms"]["p50"], mean(e, "ttft_ms", "p50")),
                    "ttft_p99": _ratio(p["ttft_ms"]["p99"], mean(e, "ttft_ms", "p99")),
                    "itl_p50": _ratio(p["itl_ms"]["p50"], mean(e, "itl_ms", "p50")),
                    "itl_p99": _ratio(p["itl_ms"]["p99"], mean(e, "itl_ms", "p99")),
                    # µs of CPU a token: the server's processes + the load generator, and the engine's process
                    "cpu_us_per_token": _http_cpu(p),
                    "engine_cpu_us_per_token": mean(e, "cpu_us_per_token", "bench_serve")})
    return out


def _http_cpu(point: dict[str, Any]) -> float | None:
    server, client = _get(point, ("cpu_us_per_token", "server")), _get(point, ("cpu_us_per_token", "bench_serve"))
    return None if server is None or client is None else round(server + client, 1)


def _get(point: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    value: Any = point
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None else float(value)


def run(args: argparse.Namespace) -> int:
    from lmforge.benchmark import serve_load
    from lmforge.cmd_serve import require_serve_extra

    require_serve_extra("bench-serve")
    rates = serve_load.parse_rates(args.rates) if args.rates else ()
    concurrency = _ints("--concurrency", args.concurrency) if args.concurrency else (() if rates else (1, 4, 16))
    for flag, value in (("--requests", args.requests), ("--new-tokens", args.new_tokens),
                        ("--prompt-len", args.prompt_len)):
        if value < 1:
            raise GenerationError(f"invalid {flag}", expected="an integer >= 1", got=str(value))
    for flag, maybe in (("--threads", args.threads), ("--server-threads", args.server_threads)):
        if maybe is not None and maybe < 1:
            raise GenerationError(f"invalid {flag}", expected="an integer >= 1", got=str(maybe))
    if args.compare_engine and all(t.startswith(("http://", "https://")) for t in args.targets):
        raise GenerationError("--compare-engine needs an ARTIFACT target", got="only URLs",
                              fix="pass the artifact folder instead of (or besides) the URL")
    plan = _Plan(rates, concurrency, args.requests, args.new_tokens, args.max_seconds, max(0, args.warmup), args.seed)
    mix, slo = serve_load.parse_mix(args.mix), serve_load.parse_slo(args.slo)

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        targets: list[dict[str, Any]] = []
        points: list[dict[str, Any]] = []
        for spec in args.targets:
            served, results = await _run_target(spec, args, plan, mix, slo)
            targets += served
            points += results
        return targets, points

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    targets, results = asyncio.run(main())
    comparison = _http_over_engine(results)
    for c in comparison:
        print(f"  HTTP/engine {c['mode']:>11} {c['value']!s:>5}  tok/s {c['output_tok_s']:.2f}×  "
              f"ttft p50 {c['ttft_p50']}×  p99 {c['ttft_p99']}×  itl p50 {c['itl_p50']}×  p99 {c['itl_p99']}×"
              + (f"  cpu/token {c['cpu_us_per_token']:.0f} / {c['engine_cpu_us_per_token']:.0f} µs"
                 if c["cpu_us_per_token"] is not None and c["engine_cpu_us_per_token"] is not None else ""),
              flush=True)
    report = {
        "command": " ".join(getattr(args, "argv", ["lmforge", "bench-serve"])),
        "started": started,
        "settings": {"prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "requests_per_point": args.requests, "mix": args.mix, "slo": slo.describe(),
                     "rates": [("inf" if math.isinf(r) else r) for r in rates], "concurrency": list(concurrency),
                     "max_seconds": args.max_seconds, "seed": args.seed},
        "notes": ["TTFT: send to first text chunk; ITL: gaps between text chunks; latencies in ms.",
                  "goodput counts requests within every --slo bound (itl: the request's mean gap).",
                  "tpot: per request, (e2e - ttft) / (tokens - 1); itl: per chunk.",
                  "onnxruntime-genai has no HTTP server: --compare-engine runs the same schedule in-process, a "
                  "thread per request (the engine at its best), before and after the server; http_over_engine: "
                  "HTTP point / the mean of those two engine points.",
                  "an ARTIFACT target is served by `lmforge serve` as its own process (targets: pid, command); "
                  "the load generator shares the machine's cores with it."],
        "targets": targets,
        "results": results,
        "http_over_engine": comparison,
    }
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    if args.plot:
        from lmforge.benchmark.serve_plot import plot_serve_report

        print(f"wrote {plot_serve_report(report, args.plot)}")
    total_errors = sum(sum(p["errors"].values()) for p in results)
    if total_errors:
        log.warning("%d request(s) failed; see errors per point", total_errors)
    return 0
