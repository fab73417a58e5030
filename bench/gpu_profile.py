"""Where a decode step's time goes on the GPU: every CUDA kernel of a few decode steps, from CUPTI.

``torch.profiler`` records the kernels of every library in the process (CUPTI is process-wide),
so it sees onnxruntime's kernels, graph-replayed ones included. For each artifact this runs one
warm-up generation (CUDA-graph capture), then profiles a 128-token prompt + ``--steps`` new
tokens at ``--batch`` and prints, per kernel name, calls per decode step and µs per step, and the
step's GPU-busy time against its wall time (the rest is launch gaps, host work and syncs).

    PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD python3 bench/gpu_profile.py \\
        --artifacts /tmp/lmf/smollm2-fp16,/tmp/lmf/llama1b-fp16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("LMFORGE_SRC", str(REPO)))  # another tree's runtime, for an A/B


KINDS = {"greedy": {}, "temperature": {"temperature": 0.7, "seed": 1},
         "top-p": {"temperature": 0.7, "top_p": 0.9, "seed": 1}}


def profile(path: Path, batch: int, steps: int, graph: bool, kind: str = "greedy") -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity

    from runtime import Engine, SamplingParams

    eng = Engine.load(path, device="cuda", verify_hashes=False, cuda_graph=graph)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, eng.vocab - 1, 128).tolist() for _ in range(batch)]
    params = SamplingParams(min_new_tokens=steps, **KINDS[kind])  # type: ignore[arg-type]
    eng.generate_results(prompts, steps, params)  # warm-up + capture
    t0 = time.perf_counter()
    eng.generate_results(prompts, steps, params)
    plain_wall = time.perf_counter() - t0
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        results = eng.generate_results(prompts, steps, params)
    ttft = max(r.ttft_s for r in results)
    kernels: dict[str, list[float]] = defaultdict(list)
    spans = []
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.time_range.elapsed_us() > 0:
            kernels[ev.name].append(ev.time_range.elapsed_us())
            spans.append((ev.time_range.start, ev.time_range.end, ev.name))
    # idle GPU time between consecutive activities, by the pair around it (where a step waits)
    spans.sort()
    gaps: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (_, end, before), (start, _, after) in zip(spans, spans[1:]):
        if start > end:
            gaps[(before[:60], after[:60])].append(start - end)
    decode_steps = steps - 1
    busy_us = sum(sum(v) for v in kernels.values())
    table = sorted(((name, len(v) / decode_steps, sum(v) / decode_steps) for name, v in kernels.items()),
                   key=lambda r: -r[2])
    return {
        "artifact": str(path),
        "graph": graph,
        "kind": kind,
        "batch": batch,
        "steps": steps,
        "wall_ms_per_step_unprofiled": 1e3 * (plain_wall - ttft) / decode_steps,
        "gpu_busy_ms_per_step": busy_us / 1e3 / decode_steps,
        "kernels_per_step": sum(len(v) for v in kernels.values()) / decode_steps,
        "top": [
            {"kernel": n[:120], "calls_per_step": round(c, 2), "us_per_step": round(u, 1)} for n, c, u in table[:80]
        ],
        "idle_us_per_step": round(sum(sum(v) for v in gaps.values()) / decode_steps, 1),
        "gaps": [
            {"before": b, "after": a, "per_step": round(len(v) / decode_steps, 2),
             "us_per_step": round(sum(v) / decode_steps, 1), "largest_us": round(max(v), 1)}
            for (b, a), v in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:30]
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, help="comma-separated artifact folders")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--no-graph", action="store_true", help="also profile without CUDA graphs")
    parser.add_argument("--kinds", default="greedy", help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    import onnxruntime as ort

    ort.preload_dlls()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.artifacts.split(","):
        for graph, kind in [(g, k) for g in ([True, False] if args.no_graph else [True])
                            for k in args.kinds.split(",")]:
            try:
                r = profile(Path(path), args.batch, args.steps, graph, kind)
            except Exception as exc:  # noqa: BLE001 - reported, the next artifact runs
                r = {"artifact": path, "graph": graph, "error": f"{type(exc).__name__}: {exc}"[:500]}
            rows.append(r)
            if "error" in r:
                print(f"{path} graph={graph}: ERROR {r['error']}", flush=True)
                continue
            print(
                f"\n{path} graph={graph} {kind} batch {r['batch']}: "
                f"wall {r['wall_ms_per_step_unprofiled']:.3f} ms/step, "
                f"GPU busy {r['gpu_busy_ms_per_step']:.3f} ms/step, {r['kernels_per_step']:.0f} kernels/step",
                flush=True,
            )
            for k in r["top"][:18]:
                print(f"  {k['us_per_step']:8.1f} µs  {k['calls_per_step']:6.2f}×  {k['kernel'][:100]}")
            print(f"  idle between activities: {r['idle_us_per_step']:.1f} µs/step; largest, by the pair around it:")
            for gap in r["gaps"][:10]:
                print(f"  {gap['us_per_step']:8.1f} µs  {gap['per_step']:6.2f}×  (max {gap['largest_us']:.0f})  "
                      f"{gap['before'][:45]} → {gap['after'][:45]}")
    (args.out / "gpu_profile.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
