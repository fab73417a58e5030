"""Where time to first token goes on the GPU, and what the fused prefill changed.

For each artifact (opened with CUDA graphs, as ``lmforge bench`` opens it) and batch, after a
warm-up: TTFT (``GenerationResult.ttft_s`` of a one-token request, median of ``--reps``) with the
prefill fused into the step model (``fuse_prefill``: one eager run picks the first token and
writes the first decode step's inputs) and without it (prefill, last-position gather, sampler
and advance sessions); the time inside the prefill's eager ``run_with_iobinding`` calls alone;
and, from CUPTI through ``torch.profiler``, the GPU-busy time and kernel count of one fused
prefill, so the rest (host work between kernels, launches, syncs) shows.

    PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD python3 bench/gpu_ttft.py \\
        --artifacts /tmp/lmf/llama-3.2-1b/fp16,/tmp/lmf/smollm2-135m/fp16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 3)


def measure(path: Path, batch: int, prompt_len: int, reps: int, device: str) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity

    from runtime import Engine, SamplingParams

    eng: Any = Engine.load(path, device=device, verify_hashes=False, cuda_graph=device == "cuda")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, eng.vocab - 1, prompt_len).tolist() for _ in range(batch)]
    params = SamplingParams(min_new_tokens=1)
    eng.generate_results(prompts, 32, SamplingParams(min_new_tokens=32))  # warm-up, graph capture

    runs: list[float] = []
    invoke = eng._invoke

    def timed(session: Any, binding: Any, options: Any = None) -> None:
        t0 = time.perf_counter()
        invoke(session, binding, options)
        if session is eng._session and options is eng._eager:
            runs.append(time.perf_counter() - t0)

    eng._invoke = timed
    out: dict[str, Any] = {"artifact": str(path), "batch": batch, "prompt_len": prompt_len}
    for fused in (True, False, True):  # fused twice: first and last, to see drift
        eng.fuse_prefill = fused
        ttft, eager = [], []
        for _ in range(reps):
            runs.clear()
            ttft.append(max(r.ttft_s for r in eng.generate_results(prompts, 1, params)))
            eager.append(sum(runs))
        key = "fused" if fused else "unfused"
        out.setdefault(key, []).append({"ttft_ms": _ms(ttft), "eager_run_ms": _ms(eager)})
    eng.fuse_prefill = True
    eng._invoke = invoke

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        t0 = time.perf_counter()
        eng.generate_results(prompts, 1, params)
        wall = time.perf_counter() - t0
    kernels = [(ev.name, ev.time_range.elapsed_us()) for ev in prof.events()
               if ev.device_type.name == "CUDA" and ev.time_range.elapsed_us() > 0]
    by_name: dict[str, float] = {}
    for name, us in kernels:
        by_name[name] = by_name.get(name, 0.0) + us
    out["profile"] = {
        "wall_ms": round(1e3 * wall, 3), "gpu_busy_ms": round(sum(us for _, us in kernels) / 1e3, 3),
        "kernels": len(kernels),
        "top": [{"kernel": n[:120], "us": round(u, 1)} for n, u in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]],
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, help="comma-separated artifact folders")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no kernels)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    import onnxruntime as ort

    if args.device == "cuda":
        ort.preload_dlls()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.artifacts.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                r = measure(Path(path), batch, args.prompt_len, args.reps, args.device)
            except Exception as exc:  # noqa: BLE001 - reported, the next one runs
                r = {"artifact": path, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:500]}
            rows.append(r)
            (args.out / "gpu_ttft.json").write_text(json.dumps(rows, indent=2))
            if "error" in r:
                print(f"{path} b{batch}: ERROR {r['error']}", flush=True)
                continue
            p = r["profile"]
            print(f"{path} b{batch}: TTFT fused {[x['ttft_ms'] for x in r['fused']]} ms "
                  f"(eager run {[x['eager_run_ms'] for x in r['fused']]}), unfused {r['unfused'][0]['ttft_ms']} ms "
                  f"(eager runs {r['unfused'][0]['eager_run_ms']}); profiled: wall {p['wall_ms']} ms, "
                  f"GPU busy {p['gpu_busy_ms']} ms, {p['kernels']} kernels", flush=True)
            for k in p["top"][:8]:
                print(f"    {k['us']:9.1f} µs  {k['kernel'][:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
