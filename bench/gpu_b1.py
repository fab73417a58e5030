"""Batch-1 greedy decode on the lent GPU: this tree's engine against another tree's runtime (an
older commit, ``git archive``'d into a folder and carried), on one machine and one shape, and
where the engine's loop thread spends a step (issue #11: "batch-1 greedy no slower than today").

Each tree converts and optimizes ``random:<shape>`` with its own exporters and passes (fp16,
shared-buffer KV, CUDA graph), then times whole-batch decode the way the pre-engine harness
(``bench/gpu_shared.py``, git history) did: ``generate_results`` with ``min_new_tokens`` equal to
the new tokens, tokens after the first over the time after the first token, median of
``--reps`` after one warm-up. ``--variants`` (this tree only) adds the engine's switches
(admission at block boundaries, no step launched ahead, ids read every 16 steps). ``--breakdown``
wraps the loop thread's calls with timers and reports ms a token in each (the session run, the
id read, the host bookkeeping, the rest). ``--spin S`` only decodes batch-1 requests for S
seconds (for ``py-spy record``)::

    export PYTHONPATH=/tmp/gpu-site:/tmp/site
    python3 bench/gpu_b1.py --src . --tag new --variants --breakdown --out $OUT
    python3 bench/gpu_b1.py --src .oldrt --tag old --out $OUT
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def build(shape: str, work: Path, device: str) -> Path:
    from exporters.convert import convert
    from passes.pipeline import optimize_artifact

    src, out = work / "fp32", work / "fp16"
    if not (out / "manifest.json").is_file():
        if not (src / "manifest.json").is_file():
            convert(shape if ":" in shape else f"random:{shape}", src, force=True, progress=False)
        optimize_artifact(src, out, device=device, precision="fp16" if device == "cuda" else "fp32",
                          kv_mode="shared-buffer", force=True, progress=False)
    return out


def rate(engine: Any, batch: int, prompt_len: int, new: int, reps: int) -> dict[str, Any]:
    from runtime import SamplingParams

    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, engine.vocab - 1, prompt_len).tolist() for _ in range(batch)]
    params = SamplingParams(min_new_tokens=new)
    runs = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        results = engine.generate_results(prompts, new, params)
        wall = time.perf_counter() - t0
        first = max(r.ttft_s for r in results)
        if i:
            runs.append(sum(r.new_tokens - 1 for r in results) / (wall - first))
    return {"tok_s": round(statistics.median(runs), 1), "ms_per_step": round(1e3 * batch / statistics.median(runs), 4),
            "runs": [round(r, 1) for r in runs]}


class Breakdown:
    """Timers around the loop thread's calls (only on that thread): total seconds and calls each."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def wrap(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            if threading.current_thread().name != "lmforge-engine":
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        setattr(owner, name, timed)


def breakdown(engine: Any, prompt_len: int, new: int, reps: int) -> dict[str, Any]:
    """ms a generated token in each part of the loop thread, batch 1 (nested timers: ``decode``
    holds ``run`` and ``read``; ``iterate`` holds everything)."""
    import onnxruntime as ort

    from runtime import SamplingParams, kv_slots
    from runtime import engine as engine_mod

    b = Breakdown()
    b.wrap(engine_mod.Engine, "_iterate", "iterate")
    b.wrap(engine_mod.Engine, "_admit", "admit")
    b.wrap(engine_mod.Engine, "_decode", "engine._decode")
    b.wrap(engine_mod.Engine, "_retire", "retire")
    b.wrap(engine_mod.Engine, "_accept", "accept")
    b.wrap(engine_mod.Engine, "_plan", "plan")
    b.wrap(engine_mod.Engine, "_admissible", "admissible")
    b.wrap(kv_slots.SlotsBackend, "decode", "backend.decode")
    b.wrap(kv_slots.SlotsBackend, "launch_ahead", "launch_ahead")
    b.wrap(type(engine._device), "run", "session run")
    b.wrap(ort.OrtValue, "numpy", "OrtValue.numpy")
    out: dict[str, Any] = {}
    rate(engine, 1, prompt_len, new, 1)  # warm
    b.seconds.clear()
    b.calls.clear()
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(reps):
        tokens += engine.generate_results([list(range(3, 3 + prompt_len))], new,
                                          SamplingParams(min_new_tokens=new))[0].new_tokens
    wall = time.perf_counter() - t0
    out["wall_ms_per_token"] = round(1e3 * wall / tokens, 4)
    out["ms_per_token"] = {k: round(1e3 * v / tokens, 4) for k, v in b.seconds.most_common()}
    out["calls_per_token"] = {k: round(v / tokens, 3) for k, v in b.calls.items()}
    return out


SAMPLED = {"temperature 0.7": {"temperature": 0.7}, "temperature 0.7 + top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
           "top-k 50 + top-p 0.9": {"temperature": 1.0, "top_k": 50, "top_p": 0.9}}


def sampled_rate(engine: Any, batch: int, prompt_len: int, new: int, reps: int, kw: dict[str, Any]) -> float:
    from runtime import SamplingParams

    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, engine.vocab - 1, prompt_len).tolist() for _ in range(batch)]
    params = [SamplingParams(min_new_tokens=new, seed=i, **kw) for i in range(batch)]
    runs = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        results = engine.generate_results(prompts, new, params)
        wall = time.perf_counter() - t0
        if i:
            runs.append(sum(r.new_tokens - 1 for r in results) / (wall - max(r.ttft_s for r in results)))
    return round(statistics.median(runs), 1)


def same_draws(a: Any, b: Any, prompt_len: int, new: int) -> dict[str, Any]:
    """Ids of 8 requests (one batch, greedy and seeded sampled) from one engine twice and from
    another engine: rows equal, per kind."""
    from runtime import SamplingParams

    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, a.vocab - 1, prompt_len).tolist() for _ in range(8)]
    out = {}
    for label, kw in {"greedy": {}, **SAMPLED}.items():
        params = [SamplingParams(seed=i, **kw) for i in range(8)]
        x, x2, y = (e.generate_ids(prompts, new, params) for e in (a, a, b))
        first = [next((i for i, (p, q) in enumerate(zip(u, v)) if p != q), None) for u, v in zip(x, y)]
        out[label] = {"same_engine_equal_rows": sum(p == q for p, q in zip(x, x2)),
                      "other_engine_equal_rows": sum(p == q for p, q in zip(x, y)), "of": 8,
                      "first_difference": first}
    return out


def probe(engine: Any, prompt_len: int, blocks: int = 16) -> dict[str, Any]:
    """The slots backend driven directly over one prefilled row (real KV lengths, the engine's loop
    idle): ms a step with steps launched back to back (one sync a block of 8) and synchronized
    one by one, and the host time of each asynchronous ``run`` call (launch overhead, or a wait
    inside onnxruntime when it is as long as a step)."""
    from runtime import SamplingParams
    from runtime.sampling import host_values, row_arrays

    backend = engine.backend
    params = SamplingParams(min_new_tokens=4 * blocks * 8 + 8)
    plan = host_values([params], engine.candidates)
    device_type = type(engine._device)
    calls: list[float] = []
    original = device_type.run

    def timed_run(self: Any, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            calls.append(time.perf_counter() - t0)

    out: dict[str, Any] = {}
    for mode in ("async", "synced", "async", "synced"):
        slot = backend.allocate()
        prompt = list(range(3, 3 + prompt_len))
        arrays = row_arrays(params, prompt, sorted(engine.eos_token_ids), engine.vocab, engine.max_context)
        backend.prefill_many([(slot, prompt, arrays)], False, plan, lambda firsts: None)
        backend.decode(slot + 1, 8, {slot: 0}, False, plan)  # warm
        device_type.run = timed_run
        calls.clear()
        t0 = time.perf_counter()
        for _ in range(blocks):
            backend.decode(slot + 1, 8, {slot: 0}, False, plan, interrupt=(lambda: False) if mode == "synced" else None)
        wall = time.perf_counter() - t0
        device_type.run = original
        backend.release(slot)
        per_call = sorted(calls)
        out[mode] = {"ms_per_step": round(1e3 * wall / (8 * blocks), 4),
                     "run_call_ms_p10_p50_p90": [round(1e3 * per_call[int(q * (len(per_call) - 1))], 4)
                                                 for q in (0.1, 0.5, 0.9)],
                     "run_calls": len(calls)}
        print("probe", mode, out[mode], flush=True)
    return out


def logits_repeat(engine: Any, prompt_len: int, new: int = 12) -> dict[str, Any]:
    """The same greedy requests twice, at batch 1 and 8: the largest difference between the two
    runs' step logits (0 when every kernel on the path is run-to-run deterministic)."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, engine.vocab - 1, prompt_len).tolist() for _ in range(8)]
    out = {}
    for batch in (1, 8):
        runs = [engine.generate_results(prompts[:batch], new, return_logits=True) for _ in range(2)]
        diff = max(float(np.max(np.abs(np.asarray(a.step_logits) - np.asarray(b.step_logits))))
                   for a, b in zip(*runs))
        out[f"b{batch}"] = {"max_abs_logit_diff": diff,
                            "same_ids": all(a.token_ids == b.token_ids for a, b in zip(*runs))}
    print("logits twice:", out, flush=True)
    return out


def spin(engine: Any, prompt_len: int, new: int, seconds: float) -> int:
    from runtime import SamplingParams

    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += engine.generate_results([list(range(3, 3 + prompt_len))], new,
                                     SamplingParams(min_new_tokens=new))[0].new_tokens
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=".", help="the tree whose runtime, exporters and passes run")
    parser.add_argument("--tag", default="new")
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--artifact", type=Path, default=None, help="skip the build")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", default="128,256")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--max-batch", type=int, default=None, help="the engine's (this tree only)")
    parser.add_argument("--max-context", type=int, default=None, help="the engine's (this tree only)")
    parser.add_argument("--probe", action="store_true", help="the backend alone over a prefilled row")
    parser.add_argument("--logits-repeat", action="store_true", help="greedy step logits of two identical runs")
    parser.add_argument("--deterministic", action="store_true",
                        help="every onnxruntime session with use_deterministic_compute")
    parser.add_argument("--sampled", action="store_true", help="sampled decode tok/s too (128 new tokens)")
    parser.add_argument("--compare", type=Path, default=None, help="another artifact: same seeded draws?")
    parser.add_argument("--spin", type=float, default=0.0)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (tiny shapes)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.src).resolve()))
    import onnxruntime as ort

    if args.device == "cuda":
        ort.preload_dlls()
    if args.deterministic:
        plain = ort.SessionOptions

        class Deterministic(plain):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.use_deterministic_compute = True

        ort.SessionOptions = Deterministic
    from runtime import Engine

    art = args.artifact or build(args.shape, args.work or Path(f"/tmp/b1-{args.tag}"), args.device)
    sizes = {k: v for k, v in (("max_batch", args.max_batch), ("max_context", args.max_context)) if v}
    load = functools.partial(Engine.load, art, device=args.device, verify_hashes=False,
                             cuda_graph=args.device == "cuda", **sizes)
    if args.spin:
        eng = load()
        spin(eng, args.prompt_len, 128, 3.0)
        print("spun", spin(eng, args.prompt_len, 128, args.spin), "tokens", flush=True)
        return 0
    import runtime

    result: dict[str, Any] = {"tag": args.tag, "src": args.src, "runtime": runtime.__file__, "artifact": str(art),
                              "rates": {}}
    print("runtime:", runtime.__file__, flush=True)
    variants: dict[str, dict[str, Any]] = {"default": {}}
    if args.variants:
        variants |= {"admission at block boundaries": {"admit_within_block": False},
                     "no launch ahead": {"launch_ahead": False},
                     "read every 16, admission at boundaries": {"read_every": 16, "admit_within_block": False}}
    for label, opts in variants.items():
        kw = {"read_every": opts["read_every"]} if "read_every" in opts else {}
        eng = load(**kw)
        for attr in ("admit_within_block", "launch_ahead"):
            if attr in opts:
                setattr(eng, attr, opts[attr])
        for batch in (int(b) for b in args.batches.split(",")):
            for new in (int(n) for n in args.new_tokens.split(",")):
                r = rate(eng, batch, args.prompt_len, new, args.reps)
                result["rates"][f"{label} | b{batch} | {new} new"] = r
                print(f"{args.tag:4s} {label:40s} b{batch:<3d} {new:4d} new  {r['tok_s']:9.1f} tok/s  "
                      f"{r['ms_per_step']:.4f} ms/step", flush=True)
        if label == "default" and args.sampled:
            for batch in (int(b) for b in args.batches.split(",")):
                greedy = rate(eng, batch, args.prompt_len, 128, args.reps)["tok_s"]
                for kind, kw in SAMPLED.items():
                    tok_s = sampled_rate(eng, batch, args.prompt_len, 128, args.reps, kw)
                    result["rates"][f"{kind} | b{batch} | 128 new"] = {"tok_s": tok_s,
                                                                       "x_greedy": round(tok_s / greedy, 3)}
                    print(f"{args.tag:4s} {kind:40s} b{batch:<3d}  128 new  {tok_s:9.1f} tok/s  "
                          f"{tok_s / greedy:.3f}x greedy ({greedy:.1f})", flush=True)
        if label == "default" and args.logits_repeat:
            result["logits_repeat"] = logits_repeat(eng, args.prompt_len)
        if label == "default" and args.probe:
            result["probe"] = probe(eng, args.prompt_len)
        if label == "default" and args.compare:
            other = load.func(args.compare, device=args.device, verify_hashes=False, cuda_graph=args.device == "cuda")
            result["same_draws"] = same_draws(eng, other, args.prompt_len, 64)
            print("same draws:", result["same_draws"], flush=True)
            other.close()
        if label == "default" and args.breakdown:
            result["breakdown"] = breakdown(eng, args.prompt_len, 128, args.reps)
            print(json.dumps(result["breakdown"], indent=1), flush=True)
        if hasattr(eng, "close"):
            eng.close()
        del eng
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_b1-{args.tag}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
