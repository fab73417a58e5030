"""The engine under concurrent load on the lent GPU: lmforge's one-loop Engine under many independent callers.

Per shape (``random:<shape>`` weights, converted and optimized for CUDA fp16 on the machine) it
measures, on one warm engine (CUDA graphs per bucket, ``max_batch`` 64), output tokens/s of:

* the same N prompts in one ``generate_results`` call, from N threads at once (one request
  each), and one after another (N = 16 and 64);
* greedy against sampled decode (temperature 0.7; + top-p 0.9; top-k 50 + top-p 0.9) at batch 1
  and 16, in one call, and half greedy / half sampled from N threads;
* a request arriving while 15 others decode: its time to first token, and the others'
  inter-token latency before and during its prefill (p50/p99), with the engine's admission
  inside a block on (the default) and off (admission at block boundaries);
* top-p rows with 256 candidates against the default 1,024;
* with ``--burst`` only: N requests from N threads at once (:func:`burst`; the peer is
  ``bench/genai_engine.py``);
* with ``--buckets`` only: greedy decode per batch-size bucket for each precision (:func:`buckets`);
* memory over ``--memory-requests`` requests of mixed lengths and kinds (some cancelled) from
  64 threads: process RSS and device memory before and after.

Every request generates exactly ``--new-tokens`` tokens (``min_new_tokens``), prompts are
``--prompt-len`` random ids, and every number is the median of ``--repeats`` runs after a
warm-up that captures every bucket. Results: ``OUT/gpu_serving-<shape>.json`` and a table
(docs/benchmarks.md, "GPU: the engine under concurrent load").

    export PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD HF_HUB_OFFLINE=1
    python3 bench/gpu_serving.py --shapes smollm2-135m --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

GREEDY = {}
SAMPLED = {"temperature 0.7": {"temperature": 0.7}, "temperature 0.7 + top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
           "top-k 50 + top-p 0.9": {"temperature": 1.0, "top_k": 50, "top_p": 0.9}}


def build(shape: str, work: Path, device: str, precision: str | None = None) -> Path:
    """``random:<shape>`` (or a ``tiny:<arch>`` source) → shared-buffer for CUDA (fp16 unless
    ``precision`` says otherwise; fp32 for a CPU dry run)."""
    from exporters.convert import convert
    from passes.pipeline import optimize_artifact

    name = shape.replace(":", "-")
    precision = precision or ("fp16" if device == "cuda" else "fp32")
    src = work / name / "fp32"
    out = work / name / (f"serve-{device}" if precision in ("fp16", "fp32") else f"serve-{device}-{precision}")
    if not (out / "manifest.json").is_file():
        if not (src / "manifest.json").is_file():
            convert(shape if ":" in shape else f"random:{shape}", src, force=True, progress=False)
        optimize_artifact(src, out, device=device, precision=precision, kv_mode="shared-buffer", force=True,
                          progress=False)
    return out


def buckets(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """Greedy whole-batch decode tok/s per batch-size bucket, per precision (``--buckets``)."""
    from runtime import Engine

    out: dict[str, Any] = {"shape": shape, "fpa_intb_gemm": os.environ.get("ORT_FPA_INTB_GEMM", "0")}
    rng = np.random.default_rng(0)
    for precision in args.buckets.split(","):
        art = build(shape, Path(args.work), args.device, precision)
        vocab = json.loads((art / "manifest.json").read_text())["architecture"]["vocab"]
        prompts = [rng.integers(10, vocab - 10, args.prompt_len).tolist() for _ in range(64)]
        engine = Engine.load(art, device=args.device, max_batch=64, verify_hashes=False,
                             max_context=args.prompt_len + args.new_tokens + 16)
        try:
            sizes = (1, 2, 4, 8, 16, 32, 64)
            for n in sizes:
                one_call(engine, prompts[:n], 8, GREEDY)
            out[precision] = {f"batch {n}": decode_rate(engine, prompts[:n], args.new_tokens, GREEDY, args.repeats)
                              for n in sizes}
        finally:
            engine.close(drain=False)
        print(precision, {k: round(v) for k, v in out[precision].items()}, flush=True)
    return out


def _params(new_tokens: int, seed: int, **kw: Any) -> Any:
    from runtime import SamplingParams

    return SamplingParams(min_new_tokens=new_tokens, seed=seed, **kw)


def _median(runs: list[float]) -> float:
    return statistics.median(runs) if runs else float("nan")


def timed(fn: Callable[[], int], repeats: int) -> dict[str, float]:
    """Median tokens/s of ``fn`` (which returns the tokens it generated)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - t0))
    return {"tok_s": _median(rates), "runs": rates}


def one_call(engine: Any, prompts: list[list[int]], new: int, kw: dict[str, Any]) -> int:
    params = [_params(new, i, **kw) for i in range(len(prompts))]
    return sum(r.new_tokens for r in engine.generate_results(prompts, new, params))


def thread_results(engine: Any, prompts: list[list[int]], new: int, kws: list[dict[str, Any]]) -> list[Any]:
    """One request per thread, all released at once; each request's result."""
    done: list[Any] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        done[i] = engine.generate_results([prompts[i]], new, _params(new, i, **kws[i % len(kws)]))[0]

    pool = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return done


def threads(engine: Any, prompts: list[list[int]], new: int, kws: list[dict[str, Any]]) -> int:
    return sum(r.new_tokens for r in thread_results(engine, prompts, new, kws))


def burst(engine: Any, prompts: list[list[int]], new: int, repeats: int) -> dict[str, Any]:
    """N requests from N threads at once (N = 16, 64; greedy, half greedy / half sampled, sampled):
    output tok/s over the wall time, prefill included (``bench/genai_engine.py``'s measure), and
    time to first token p50/p99."""
    out: dict[str, Any] = {}
    top_p = SAMPLED["temperature 0.7 + top-p 0.9"]
    for n in (16, 64):
        for label, kws in (("greedy", [GREEDY]), ("half sampled", [GREEDY, top_p]), ("sampled", [top_p])):
            rates, ttft = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                results = thread_results(engine, prompts[:n], new, kws)
                rates.append(sum(r.new_tokens for r in results) / (time.perf_counter() - t0))
                ttft += [r.ttft_s * 1e3 for r in results]
            out[f"{n} threads, {label}"] = {
                "tok_s": _median(rates), "runs": rates, "ttft_ms_p50": float(np.percentile(ttft, 50)),
                "ttft_ms_p99": float(np.percentile(ttft, 99))}
    return out


def sequential(engine: Any, prompts: list[list[int]], new: int) -> int:
    return sum(engine.generate_results([p], new, _params(new, 0))[0].new_tokens for p in prompts)


def decode_rate(engine: Any, prompts: list[list[int]], new: int, kw: dict[str, Any], repeats: int) -> float:
    """Whole-batch decode tok/s (tokens after the first over the time after the first token)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = engine.generate_results(prompts, new, [_params(new, i, **kw) for i in range(len(prompts))])
        wall = time.perf_counter() - t0
        first = max(r.ttft_s for r in results)
        rates.append(sum(r.new_tokens - 1 for r in results) / max(wall - first, 1e-9))
    return _median(rates)


def arrival(engine: Any, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """15 requests decode; one more arrives; its TTFT and the others' inter-token latency."""
    running = [engine.submit(p, 8 * new, _params(8 * new, i)) for i, p in enumerate(prompts[:15])]
    stamps: list[list[tuple[float, int]]] = [[] for _ in running]

    def read(i: int) -> None:
        for event in running[i]:
            stamps[i].append((event.time, len(event.token_ids)))

    readers = [threading.Thread(target=read, args=(i,)) for i in range(15)]
    for t in readers:
        t.start()
    time.sleep(0.3)
    t_submit = time.perf_counter()
    late = engine.submit(prompts[15], new, _params(new, 99))
    first = next(iter(late))
    ttft = first.time - t_submit
    late_result = late.result()
    for r in running:
        r.cancel()
    for t in readers:
        t.join()

    def gaps(lo: float, hi: float) -> list[float]:
        out = []
        for rows in stamps:
            for (a, _), (b, n) in zip(rows, rows[1:]):
                if n and lo <= b < hi:
                    out.extend([(b - a) / n] * n)
        return out

    before = gaps(t_submit - 0.3, t_submit)
    during = gaps(t_submit, first.time + 0.05)
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")  # noqa: E731
    return {"late_ttft_ms": ttft * 1e3, "late_result_ttft_ms": late_result.ttft_s * 1e3,
            "itl_before_p50_ms": pct(before, 50), "itl_before_p99_ms": pct(before, 99),
            "itl_during_p50_ms": pct(during, 50), "itl_during_p99_ms": pct(during, 99),
            "itl_during_max_ms": max(during) * 1e3 if during else float("nan")}


def _device_mib() -> float:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except Exception:  # noqa: BLE001 - no GPU (a CPU dry run)
        return float("nan")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(engine: Any, vocab: int, total: int) -> dict[str, Any]:
    """``total`` requests of mixed prompt / output lengths and kinds from 64 threads, one in ten
    cancelled after its first token; RSS and device memory after a warm-up batch and at the end."""
    import random

    from runtime import SamplingParams

    def batch(n: int, seed: int) -> dict[str, int]:
        counts = {"finished": 0, "cancelled": 0, "failed": 0}
        lock = threading.Lock()
        jobs = list(range(n))

        def worker() -> None:
            rng = random.Random(seed + threading.get_ident())
            while True:
                with lock:
                    if not jobs:
                        return
                    i = jobs.pop()
                prompt = [rng.randrange(10, vocab - 10) for _ in range(rng.choice((4, 16, 64, 200)))]
                kind = i % 3
                params = SamplingParams(seed=i) if kind == 0 else SamplingParams(temperature=0.8, top_p=0.9, seed=i) \
                    if kind == 1 else SamplingParams(temperature=0.7, repetition_penalty=1.1, seed=i)
                try:
                    request = engine.submit(prompt, rng.choice((1, 8, 32, 64)), params)
                    if i % 10 == 0:
                        next(iter(request))
                        request.cancel()
                        key = "cancelled"
                    else:
                        request.result()
                        key = "finished"
                except Exception as exc:  # noqa: BLE001 - counted, the first one kept
                    key = "failed"
                    errors.setdefault(type(exc).__name__, str(exc)[:200])
                with lock:
                    counts[key] += 1

        pool = [threading.Thread(target=worker) for _ in range(64)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return counts

    errors: dict[str, str] = {}
    batch(500, 1)
    before = {"rss_mib": _rss_mib(), "device_mib": _device_mib()}
    t0 = time.perf_counter()
    counts = batch(total, 2)
    after = {"rss_mib": _rss_mib(), "device_mib": _device_mib()}
    return {"requests": total, "seconds": time.perf_counter() - t0, **counts, "errors": errors, "before": before,
            "after": after}


def sampling_table(engine: Any, prompts: list[list[int]], new: int, rep: int) -> dict[str, Any]:
    """Whole-batch decode tok/s at batch 1 and 16: greedy, each sampled kind, and the top-p kinds
    with 256 candidates."""
    samp: dict[str, Any] = {}
    for label, kw in [("greedy", GREEDY), *SAMPLED.items()]:
        samp[label] = {f"batch {b}": decode_rate(engine, prompts[:b], new, kw, rep) for b in (1, 16)}
    bound = engine.candidates
    engine.candidates = 256
    for label in ("temperature 0.7 + top-p 0.9", "top-k 50 + top-p 0.9"):
        samp[label + ", 256 candidates"] = {
            f"batch {b}": decode_rate(engine, prompts[:b], new, SAMPLED[label], rep) for b in (1, 16)}
    engine.candidates = bound
    return samp


def bench_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    from runtime import Engine

    out: dict[str, Any] = {"shape": shape}
    art = Path(args.artifact) if args.artifact else build(shape, Path(args.work), args.device)
    out["artifact"] = str(art)
    rng = np.random.default_rng(0)
    vocab = json.loads((art / "manifest.json").read_text())["architecture"]["vocab"]
    prompts = [rng.integers(10, vocab - 10, args.prompt_len).tolist() for _ in range(64)]
    new, rep = args.new_tokens, args.repeats
    engine = Engine.load(art, device=args.device, max_batch=64, max_queue=4096, verify_hashes=False,
                         max_context=args.prompt_len + 8 * args.new_tokens + 16)
    try:
        t0 = time.perf_counter()
        for n in (1, 2, 4, 8, 16, 32, 64):  # capture every bucket once
            one_call(engine, prompts[:n], 8, GREEDY)
            one_call(engine, prompts[:n], 8, SAMPLED["temperature 0.7 + top-p 0.9"])
        out["warmup_s"] = time.perf_counter() - t0
        engine.prefill_tokens = args.prefill_tokens  # None: every waiting request at one boundary
        engine.launch_ahead = not args.no_launch_ahead
        if args.burst:
            out["engine_warm_up_s"] = engine.warm_up()
            out["burst"] = burst(engine, prompts, new, rep)
            return out
        if args.quick:
            out["sampling_decode_tok_s"] = sampling_table(engine, prompts, new, rep)
            engine.admit_within_block = False
            out["sampling_decode_tok_s"]["greedy, admission at block boundaries"] = {
                f"batch {b}": decode_rate(engine, prompts[:b], new, GREEDY, rep) for b in (1, 16)}
            return out
        conc: dict[str, Any] = {}
        for n in (16, 64):
            conc[f"one call x{n}"] = timed(lambda n=n: one_call(engine, prompts[:n], new, GREEDY), rep)
            conc[f"{n} threads"] = timed(lambda n=n: threads(engine, prompts[:n], new, [GREEDY]), rep)
            conc[f"{n} threads, half sampled"] = timed(
                lambda n=n: threads(engine, prompts[:n], new, [GREEDY, SAMPLED["temperature 0.7 + top-p 0.9"]]), rep)
        conc["16 one after another"] = timed(lambda: sequential(engine, prompts[:16], new), 1)
        out["concurrency"] = conc
        out["sampling_decode_tok_s"] = sampling_table(engine, prompts, new, rep)
        out["arrival"] = arrival(engine, prompts, new)
        engine.admit_within_block = False
        out["arrival, admission at block boundaries"] = arrival(engine, prompts, new)
        out["concurrency"]["16 threads, admission at block boundaries"] = timed(
            lambda: threads(engine, prompts[:16], new, [GREEDY]), rep)
        engine.admit_within_block = True
        if args.memory_requests:
            out["memory"] = memory(engine, vocab, args.memory_requests)
        out["replays"] = engine.backend.replays
    finally:
        engine.close(drain=False)
    return out


def table(r: dict[str, Any]) -> str:
    lines = [f"## {r['shape']}"]
    for k, v in r.get("concurrency", {}).items():
        lines.append(f"{k:32s} {v['tok_s']:10.0f} tok/s")
    for k, v in r.get("sampling_decode_tok_s", {}).items():
        lines.append(f"{k:32s} " + "  ".join(f"{b}: {x:8.0f}" for b, x in v.items()))
    for k, v in r.get("burst", {}).items():
        lines.append(f"{k:48s} {v['tok_s']:10.0f} tok/s  TTFT p50 {v['ttft_ms_p50']:7.1f} ms"
                     f"  p99 {v['ttft_ms_p99']:7.1f} ms")
    for key in ("arrival", "arrival, admission at block boundaries"):
        if key in r:
            lines.append(key + " " + json.dumps({k: round(v, 2) for k, v in r[key].items()}))
    if "memory" in r:
        lines.append("memory " + json.dumps(r["memory"]))
    if "error" in r:
        lines.append("ERROR " + r["error"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2-135m")
    parser.add_argument("--work", default="/tmp/lmf-serve")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run (e.g. --shapes tiny:llama)")
    parser.add_argument("--memory-requests", type=int, default=10000, help="0 skips the memory run")
    parser.add_argument("--quick", action="store_true", help="only the sampling table (and greedy without "
                        "admission inside a block)")
    parser.add_argument("--burst", action="store_true", help="only N requests at once from N threads "
                        "(after Engine.warm_up)")
    parser.add_argument("--prefill-tokens", type=int, default=None, metavar="N",
                        help="Engine(prefill_tokens=N): a prompt-token budget per step boundary (default none)")
    parser.add_argument("--artifact", default="", metavar="DIR",
                        help="serve this artifact instead of building one (e.g. a baseline build); one shape")
    parser.add_argument("--tag", default="", help="appended to the JSON file name")
    parser.add_argument("--no-launch-ahead", action="store_true",
                        help="Engine.launch_ahead = False: the host handles a block with the GPU idle (the A/B)")
    parser.add_argument("--buckets", default="", metavar="P[,P…]",
                        help="instead: greedy decode per batch bucket for these precisions (e.g. fp16,int4,int8)")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import onnxruntime

    if hasattr(onnxruntime, "preload_dlls"):  # the CUDA libraries of a pip-staged onnxruntime-gpu
        onnxruntime.preload_dlls()
    if args.buckets:
        for shape in args.shapes.split(","):
            tag = "-fpa" if os.environ.get("ORT_FPA_INTB_GEMM") == "1" else ""
            (Path(args.out) / f"gpu_buckets-{shape.replace(':', '-')}{tag}.json").write_text(
                json.dumps(buckets(shape, args), indent=1))
        return
    for shape in args.shapes.split(","):
        try:
            result = bench_shape(shape, args)
        except Exception as exc:  # noqa: BLE001 - recorded, the next shape still runs
            result = {"shape": shape, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        tag = "-burst" if args.burst else ""
        tag += f"-budget{args.prefill_tokens}" if args.prefill_tokens else ""
        tag += f"-{args.tag}" if args.tag else ""
        (Path(args.out) / f"gpu_serving-{shape.replace(':', '-')}{tag}.json").write_text(json.dumps(result, indent=1))
        print(table(result), flush=True)


if __name__ == "__main__":
    main()
