"""The decode step's replay time per sampling plan, without the engine's loop: where a sampled
step's time goes (graph replay or host work around it).

For each plan (the step's host inputs: greedy, temperature, top-p at each candidate bound, top-p's
1,024 candidates in parts and in one ``TopK``) this replays the captured step ``--steps`` times
over ``--rows`` rows through the slots backend: once launched back to back with one sync a block
(the graph's own time), and once synchronized after every step (as the engine runs when a request
may be waiting). The slots were never prefilled, so attention reads one position: compare plans
with each other, not with the engine's tok/s (``bench/gpu_b1.py --probe`` times the step over a
prefilled row; on the SmolLM2 shape 1.30 against 1.13 ms here).

    PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD python3 bench/gpu_replay.py ARTIFACT --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("LMFORGE_SRC", str(REPO)))  # another tree's runtime, for an A/B


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    import onnxruntime as ort

    ort.preload_dlls()
    from runtime import Engine
    from runtime.sampler_graph import ALL_ROWS

    eng = Engine.load(args.artifact, device="cuda", max_batch=16, verify_hashes=False)
    a = ALL_ROWS  # (candidates, sampled, penalized, filtered, parted rows): runtime.sampling.host_values
    plans = {"greedy": (1, 0, 0, 0, 0), "temperature": (1, a, 0, 0, 0), "min-p": (1, a, 0, a, 0),
             "top-k (64)": (64, a, 0, a, 0), "top-p (256)": (256, a, 0, a, 0), "top-p (1024)": (1024, a, 0, a, a),
             "top-p (1024), one selection": (1024, a, 0, a, 0), "penalties": (1, 0, a, 0, 0)}
    if os.environ.get("LMFORGE_SRC"):  # a tree from before the parted selection (step format 2)
        plans = {k: v[:4] for k, v in plans.items() if k != "top-p (1024), one selection"}
    rows_out = []
    backend = eng.backend
    for rows in [int(r) for r in args.rows.split(",")]:
        for label, plan in plans.items():
            for _ in range(4):  # capture
                backend.decode(rows, 8, {}, False, plan)
            t0 = time.perf_counter()
            for _ in range(args.steps // 8):
                backend.decode(rows, 8, {}, False, plan)
            async_ms = (time.perf_counter() - t0) / (args.steps // 8 * 8) * 1e3
            t0 = time.perf_counter()
            for _ in range(args.steps // 8):
                backend.decode(rows, 8, {}, False, plan, interrupt=lambda: False)
            sync_ms = (time.perf_counter() - t0) / (args.steps // 8 * 8) * 1e3
            row = {"rows": rows, "plan": label, "ms_per_step_async": round(async_ms, 4),
                   "ms_per_step_synced": round(sync_ms, 4)}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    eng.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_replay.json").write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
