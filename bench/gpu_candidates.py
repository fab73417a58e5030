"""Decode tok/s of one artifact for several ``candidates`` bounds (the TopK size of the sampling
nodes), greedy and sampled, batch 1 and 16: where the sampling step's time goes.

    python3 bench/gpu_candidates.py ARTIFACT --candidates 1024,256,64,1 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from runtime import Engine, SamplingParams

    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--candidates", default="1024,256,64,1")
    parser.add_argument("--read-every", default="8")
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 40000, 128).tolist() for _ in range(16)]
    new = args.new_tokens
    rows = []
    for read_every in [int(x) for x in args.read_every.split(",")]:
        for cand in [int(c) for c in args.candidates.split(",")]:
            engine = Engine.load(args.artifact, device="cuda", max_batch=16, max_context=512, candidates=cand,
                                 read_every=read_every, verify_hashes=False)
            for label, kw in (("greedy", {}), ("t0.7+p0.9", {"temperature": 0.7, "top_p": 0.9})):
                for b in (1, 16):
                    params = [SamplingParams(min_new_tokens=new, seed=i, **kw) for i in range(b)]
                    engine.generate_results(prompts[:b], 16, params)  # capture
                    t0 = time.perf_counter()
                    res = engine.generate_results(prompts[:b], new, params)
                    wall = time.perf_counter() - t0
                    first = max(r.ttft_s for r in res)
                    rate = sum(r.new_tokens - 1 for r in res) / (wall - first)
                    rows.append({"candidates": cand, "read_every": read_every, "mode": label, "batch": b,
                                 "decode_tok_s": rate})
                    print(
                        f"read_every {read_every:3d} candidates {cand:5d} {label:10s} batch {b:2d}: {rate:8.0f} tok/s",
                        flush=True,
                    )
            engine.close()
    (Path(args.out) / "gpu_candidates.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
