"""CPU: N concurrent callers against the same N prompts in one call, and one after another.

    PYTHONPATH=. python bench/cpu_serving.py ARTIFACT [--callers 8] [--prompt-len 32] [--new-tokens 32]

Alternates the three loads (one call, N threads at once, N one after another) for ``--repeats``
rounds after a warm-up and prints median output tok/s of each.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np


def main() -> None:
    from runtime import Engine, SamplingParams

    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, new = args.callers, args.new_tokens
    engine = Engine.load(args.artifact, max_batch=n)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, engine.vocab - 10, args.prompt_len).tolist() for _ in range(n)]
    params = SamplingParams(min_new_tokens=new)

    def one_call() -> None:
        engine.generate_results(prompts, new, params)

    def threads() -> None:
        barrier = threading.Barrier(n)

        def run(p: list[int]) -> None:
            barrier.wait()
            engine.generate_results([p], new, params)

        pool = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    def sequential() -> None:
        for p in prompts:
            engine.generate_results([p], new, params)

    loads = {"one call": one_call, f"{n} threads": threads, f"{n} one after another": sequential}
    one_call()  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in loads}
    for _ in range(args.repeats):
        for name, fn in loads.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(n * new / (time.perf_counter() - t0))
    base = statistics.median(rates["one call"])
    for name, r in rates.items():
        print(f"{name:24s} {statistics.median(r):8.1f} tok/s  ({statistics.median(r) / base:.2f}× one call)")
    engine.close()


if __name__ == "__main__":
    main()
