"""GPU: the ``shared-buffer`` KV contract and CUDA-graph decode, against the concat fp32 artifacts.

Run on the lent GPU from the repo root, after ``bench/gpu_suite.py convert`` made the fp32 concat
artifacts ``WORK/smollm2`` and ``WORK/llama1b`` (onnxruntime-gpu on ``PYTHONPATH``)::

    PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD python3 bench/gpu_shared.py --work /tmp/lmf --out $OUT

For each model it (1) builds ``WORK/NAME-sb-fp16`` with ``optimize_artifact(..., device="cuda",
precision="fp16")`` (shared-buffer KV; reused when present unless ``--rebuild``); (2) checks
greedy tokens against the concat fp32 artifact on CUDA (token-id prompts, batch 1 each and one
batch of all, ``--parity-tokens`` new tokens) with the CUDA graph off and on; (3) times decode at
batch 1 and 8 (``--prompt-len`` 128 random ids, ``--new-tokens`` 256, EOS masked with
``min_new_tokens``; one warm-up then the median of ``--reps``) for concat fp32, shared fp16 and
shared fp16 + CUDA graph (the fused greedy step, ids read every 16 steps), the same with the
three-session step (decoder, sampler, advance; ``fuse_greedy = False``) and with the fused step
reading ids every step (``read_every=1``). Every variant fails soft: its exception is recorded and the rest runs.
Prints a table last and writes ``OUT/gpu_shared.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("smollm2", "llama1b")


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}"


def build(work: Path, name: str, rebuild: bool) -> dict[str, Any]:
    from passes.pipeline import optimize_artifact

    out = work / f"{name}-sb-fp16"
    if out.exists() and not rebuild:
        return {"path": str(out), "reused": True}
    made = work / f"{name}-fp16"  # bench/gpu_optimize.py's fp16 CUDA artifact is the same thing
    if not rebuild and (made / "manifest.json").is_file() and '"shared-buffer"' in (made / "manifest.json").read_text():
        out.symlink_to(made)
        return {"path": str(out), "reused": str(made)}
    t0 = time.perf_counter()
    report = optimize_artifact(work / name, out, device="cuda", precision="fp16", force=True, progress=False)
    return {"path": str(out), "seconds": round(time.perf_counter() - t0, 1), "ops": report.ops,
            "passes": report.passes[-3:]}


def parity(ref: Any, eng: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    want = [ref.generate_ids([p], new_tokens)[0] for p in prompts]
    got = [eng.generate_ids([p], new_tokens)[0] for p in prompts]
    batched = eng.generate_ids(prompts, new_tokens)
    rows = []
    for w, g, b in zip(want, got, batched):
        first = next((i for i, (x, y) in enumerate(zip(w, g)) if x != y), None)
        rows.append({"match": w == g, "batched_match": b == g, "first_divergence": first})
    return {"matched": sum(r["match"] for r in rows), "batched_matched": sum(r["batched_match"] for r in rows),
            "of": len(rows), "rows": rows}


def timing(eng: Any, vocab: int, batch: int, prompt_len: int, new_tokens: int, reps: int) -> dict[str, Any]:
    from runtime import SamplingParams

    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, vocab - 1, prompt_len).tolist() for _ in range(batch)]
    params = SamplingParams(min_new_tokens=new_tokens)
    runs = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        results = eng.generate_results(prompts, new_tokens, params)
        wall = time.perf_counter() - t0
        ttft = max(r.ttft_s for r in results)
        decode_s = wall - ttft
        n = sum(r.new_tokens - 1 for r in results)
        if i:  # the first run is the warm-up (and the CUDA-graph capture)
            runs.append({"wall_s": wall, "ttft_s": ttft, "batch_tok_s": n / decode_s,
                         "row_tok_s": statistics.median(r.decode_tokens_per_s for r in results),
                         "new_tokens": [r.new_tokens for r in results]})
    return {"batch_tok_s": statistics.median(r["batch_tok_s"] for r in runs),
            "row_tok_s": statistics.median(r["row_tok_s"] for r in runs),
            "ttft_ms": 1e3 * statistics.median(r["ttft_s"] for r in runs), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmf"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--parity-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - reported, the providers list says the rest
            print("preload_dlls:", _err(exc), flush=True)
    from runtime import Engine

    results: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                               "settings": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    batches = [int(b) for b in args.batches.split(",")]
    t_start = time.perf_counter()

    def save() -> None:
        (args.out / "gpu_shared.json").write_text(json.dumps(results, indent=2, default=str))

    for name in args.models.split(","):
        model: dict[str, Any] = {"build": None, "parity": {}, "timing": {}}
        results["models"][name] = model
        try:
            model["build"] = build(args.work, name, args.rebuild)
            print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: built {model['build']}", flush=True)
        except Exception as exc:  # noqa: BLE001 - fail soft, per variant
            model["build"] = {"error": _err(exc), "traceback": traceback.format_exc()[-3000:]}
            print(f"{name}: build failed: {_err(exc)}", flush=True)
        engines: dict[str, Any] = {}
        specs = {"concat-fp32": (args.work / name, False),
                 "shared-fp16": (args.work / f"{name}-sb-fp16", False),
                 "shared-fp16+graph": (args.work / f"{name}-sb-fp16", True)}
        for precision in ("int8", "int4"):  # written by bench/gpu_optimize.py, when it ran first
            if (args.work / f"{name}-{precision}" / "manifest.json").is_file():
                specs[f"shared-{precision}+graph"] = (args.work / f"{name}-{precision}", True)
        # the fused greedy step (default) against the three-session step and a host read per token
        specs["shared-fp16+graph-3session"] = (args.work / f"{name}-sb-fp16", True)
        specs["shared-fp16+graph-read1"] = (args.work / f"{name}-sb-fp16", True)
        for label, (path, graph) in specs.items():
            try:
                if label.endswith("-read1"):
                    from runtime.artifact import load_artifact
                    from runtime.shared_kv import SharedBufferEngine

                    engines[label] = SharedBufferEngine(load_artifact(path, verify_hashes=False), device=args.device,
                                                        cuda_graph=graph, read_every=1)
                else:
                    engines[label] = Engine.load(path, device=args.device, verify_hashes=False, cuda_graph=graph)
                if label.endswith("-3session"):
                    engines[label].fuse_greedy = False
            except Exception as exc:  # noqa: BLE001
                model["timing"][label] = {"error": f"load: {_err(exc)}"}
                print(f"{name} {label}: load failed: {_err(exc)}", flush=True)
        ref = engines.get("concat-fp32")
        if ref is not None:
            rng = np.random.default_rng(0)
            prompts = [rng.integers(3, ref.vocab - 1, n).tolist() for n in (5, 17, 40, 128)]
            if ref.tokenizer is not None:
                prompts += [ref.encode(t) for t in ("The capital of France is", "def fibonacci(n):\n    ")]
            for label in [k for k in specs if k != "concat-fp32"]:
                if label not in engines:
                    continue
                try:
                    model["parity"][label] = parity(ref, engines[label], prompts, args.parity_tokens)
                    p = model["parity"][label]
                    print(f"[{time.perf_counter() - t_start:6.1f}s] {name} {label}: greedy parity "
                          f"{p['matched']}/{p['of']} (batched {p['batched_matched']}/{p['of']})", flush=True)
                except Exception as exc:  # noqa: BLE001
                    model["parity"][label] = {"error": _err(exc), "traceback": traceback.format_exc()[-3000:]}
                    print(f"{name} {label}: parity failed: {_err(exc)}", flush=True)
        for label, eng in engines.items():
            for batch in batches:
                key = f"{label}@b{batch}"
                try:
                    reps = args.reps if label != "concat-fp32" else max(1, args.reps - 1)
                    model["timing"][key] = timing(eng, eng.vocab, batch, args.prompt_len, args.new_tokens, reps)
                    if hasattr(eng, "graph_replays"):
                        model["timing"][key]["graph_replays"] = eng.graph_replays()
                    t = model["timing"][key]
                    print(f"[{time.perf_counter() - t_start:6.1f}s] {name} {key}: {t['batch_tok_s']:.0f} tok/s "
                          f"(row {t['row_tok_s']:.0f}), ttft {t['ttft_ms']:.1f} ms", flush=True)
                except Exception as exc:  # noqa: BLE001
                    model["timing"][key] = {"error": _err(exc), "traceback": traceback.format_exc()[-3000:]}
                    print(f"{name} {key}: timing failed: {_err(exc)}", flush=True)
                save()
        del engines, ref
        save()

    print("\nmodel     variant               batch  decode tok/s (batch)  per row  ttft ms  parity")
    for name, model in results["models"].items():
        for key, t in model["timing"].items():
            label, _, b = key.partition("@b")
            par = model["parity"].get(label, {})
            ptxt = f"{par['matched']}/{par['of']}" if "matched" in par else ("-" if not par else "ERR")
            if "error" in t:
                print(f"{name:<9} {label:<21} {b or '-':>5}  ERROR {t['error'][:90]}")
            else:
                print(f"{name:<9} {label:<21} {b:>5}  {t['batch_tok_s']:>20.0f}  {t['row_tok_s']:>7.0f}  "
                      f"{t['ttft_ms']:>7.1f}  {ptxt}")
    save()
    print(f"\nwrote {args.out / 'gpu_shared.json'} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
