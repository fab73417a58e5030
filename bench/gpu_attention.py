"""Which of onnxruntime's attention kernels GroupQueryAttention should decode with, measured.

onnxruntime 1.31 picks XQA for decode when the query-per-KV group divides 64 (the Llama-3.2-1B
shape: 32/8 = 4) and otherwise, on SM90, cuDNN's SDPA (SmolLM2-135M: 9/3 = 3), which the decode
profile shows as three kernels a layer (SDPA, a lean reduction, a fill). The CUDA provider option
``sdpa_kernel`` (a bit mask: 1 flash, 2 memory-efficient, 8 cuDNN) narrows the choice. For each
artifact and setting this loads the engine with CUDA graphs (``LMFORGE_CUDA_PROVIDER_OPTIONS``),
decodes ``--new-tokens`` after a 128-token prompt at each batch (one warm-up, median of
``--reps``), and compares the greedy ids with the default setting's (the first differing step;
fp16 kernels that add in another order may flip a near-tie, so a difference is reported, not
judged).

    PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD python3 bench/gpu_attention.py \\
        --artifacts /tmp/lmf/smollm2-135m/fp16,/tmp/lmf/llama-3.2-1b/fp16 --out $OUT
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


def run(path: Path, options: str, batches: list[int], new_tokens: int, reps: int) -> dict[str, Any]:
    from runtime import Engine, SamplingParams

    os.environ["LMFORGE_CUDA_PROVIDER_OPTIONS"] = options
    eng: Any = Engine.load(path, device="cuda", verify_hashes=False, cuda_graph=True)
    params = SamplingParams(min_new_tokens=new_tokens)
    rng = np.random.default_rng(3)
    out: dict[str, Any] = {"options": options or "default", "batches": {}}
    for batch in batches:
        prompts = [rng.integers(3, eng.vocab - 1, 128).tolist() for _ in range(batch)]
        eng.generate_results(prompts, new_tokens, params)  # warm-up + capture
        rates, ids = [], None
        for _ in range(reps):
            t0 = time.perf_counter()
            results = eng.generate_results(prompts, new_tokens, params)
            wall = time.perf_counter() - t0
            ttft = max(r.ttft_s for r in results)
            rates.append(batch * (new_tokens - 1) / (wall - ttft))
            ids = [list(r.token_ids) for r in results]
        out["batches"][batch] = {"decode_tok_s": round(statistics.median(rates), 1), "ids": ids}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--settings", default=",sdpa_kernel=1,sdpa_kernel=2",
                        help="comma-separated; the first is the baseline (empty: onnxruntime's default)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    import onnxruntime as ort

    ort.preload_dlls()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    report = []
    for path in args.artifacts.split(","):
        base = None
        for options in args.settings.split(","):
            options = options.replace(";", ",")
            try:
                r = run(Path(path), options, batches, args.new_tokens, args.reps)
            except Exception as exc:  # noqa: BLE001 - reported, the next setting runs
                r = {"options": options or "default", "error": f"{type(exc).__name__}: {exc}"[:400]}
            r["artifact"] = path
            if "error" not in r:
                base = base or r
                for b, cell in r["batches"].items():
                    ref = base["batches"][b]["ids"]
                    steps = [
                        next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), None)
                        for a, c in zip(ref, cell["ids"])
                    ]
                    diverged = [s for s in steps if s is not None]
                    cell["rows_equal_to_baseline"] = sum(s is None for s in steps)
                    cell["first_divergence"] = min(diverged) if diverged else None
                print(f"{path} [{r['options']}]: " + ", ".join(
                    f"b{b} {c['decode_tok_s']} tok/s (equal rows {c['rows_equal_to_baseline']}/{len(c['ids'])}"
                    f"{'' if c['first_divergence'] is None else ', first divergence at ' + str(c['first_divergence'])})"
                    for b, c in r["batches"].items()), flush=True)
            else:
                print(f"{path} [{r['options']}]: ERROR {r['error']}", flush=True)
            report.append(r)
    for r in report:
        for cell in r.get("batches", {}).values():
            cell.pop("ids", None)
    (args.out / "gpu_attention.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
