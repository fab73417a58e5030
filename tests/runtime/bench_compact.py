"""Measure compacting finished rows vs keeping them in the batch (numbers in runtime/engine.py).

Not a test (speed targets live in benchmarks): ``PYTHONPATH=. python tests/runtime/bench_compact.py
ARTIFACT [ARTIFACT …]``. Batch 8, 16-token prompts, row r stops after 16·(r+1) tokens, greedy,
median of 3 runs after a warm-up.
"""

from __future__ import annotations

import statistics
import sys
import time

from runtime import Engine


def run(engine: Engine, compact: bool) -> float:
    engine.compact_finished_rows = compact
    prompts = [[(7 * r + 3 * i) % 200 + 10 for i in range(16)] for r in range(8)]
    state = engine.start(prompts, max_new_tokens=128)
    for r, row in enumerate(state.rows):
        row.max_new = 16 * (r + 1)  # staggered finishes; the public API has one max per call
    t0 = time.perf_counter()
    for _ in engine._events(state):
        pass
    return time.perf_counter() - t0


def main(paths: list[str]) -> None:
    for path in paths:
        engine = Engine.load(path)
        for compact in (True, False):
            run(engine, compact)
        times = {c: statistics.median(run(engine, c) for _ in range(3)) for c in (True, False)}
        print(f"{path}: compact {times[True] * 1e3:.0f} ms, keep {times[False] * 1e3:.0f} ms "
              f"({times[False] / times[True]:.2f}x)")


if __name__ == "__main__":
    main(sys.argv[1:])
