"""What a prompt length the engine has not seen before costs on CUDA, and decode speed, under the
CUDA provider options in ``LMFORGE_CUDA_PROVIDER_OPTIONS`` (e.g. ``sdpa_kernel=1``).

A warm engine (``warm_up()`` done) prefills one prompt of each length 100–131 (each length new to
the session), then the same lengths again, timing a one-token generation per prompt; then whole
batch decode tok/s at batch 1 and 16 (128-token prompts, 128 new tokens, median of 3).

    PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD python3 bench/gpu_prefill_shapes.py ARTIFACT
    LMFORGE_CUDA_PROVIDER_OPTIONS=sdpa_kernel=1 python3 bench/gpu_prefill_shapes.py ARTIFACT
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def main(path: str) -> None:
    import onnxruntime as ort

    ort.preload_dlls()
    from runtime import Engine, SamplingParams

    engine = Engine.load(path, device="cuda", max_batch=16, verify_hashes=False)
    engine.warm_up()
    rng = np.random.default_rng(0)

    def prefill_ms(lengths: range) -> list[float]:
        out = []
        for n in lengths:
            prompt = rng.integers(10, engine.vocab - 10, n).tolist()
            t0 = time.perf_counter()
            engine.generate_ids([prompt], 1)
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    first, again = prefill_ms(range(100, 132)), prefill_ms(range(100, 132))
    prompts = [rng.integers(10, engine.vocab - 10, 128).tolist() for _ in range(16)]
    rates = {}
    for batch in (1, 16):
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            results = engine.generate_results(prompts[:batch], 128, SamplingParams(min_new_tokens=128))
            wall = time.perf_counter() - t0
            runs.append(sum(r.new_tokens - 1 for r in results) / (wall - max(r.ttft_s for r in results)))
        rates[batch] = float(np.median(runs))
    engine.close()
    options = os.environ.get("LMFORGE_CUDA_PROVIDER_OPTIONS", "default")
    print(f"{options}: prefill of a first-seen length {np.median(first):.1f} ms (max {max(first):.1f}), "
          f"the same lengths again {np.median(again):.1f} ms; decode b1 {rates[1]:.0f} tok/s, b16 {rates[16]:.0f}")


if __name__ == "__main__":
    main(sys.argv[1])
