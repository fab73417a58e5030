"""Encoder throughput on CPU, side by side in one process: lmforge vs PyTorch vs a default ORT session.

    PYTHONPATH=. .venv/bin/python bench/encoder_cpu.py ARTIFACT [ARTIFACT…] [--batch 32] [--seq 128]
        [--rounds 8] [--threads 2] [--json out.json]

Each round runs every runner once on the same fixed ids (``lmforge.benchmark.tune.fixed_ids``),
in rotating order, with a short pause between runners; the table gives median sequences/s over the
rounds after one warm-up, the spread (min–max), and ratios of medians. Runners:

* ``lmforge <precision>`` — :class:`runtime.Encoder` on each ARTIFACT (``encode_ids``: bucketing,
  pooling, normalization), ``threads`` intra-op threads, spinning off;
* ``ort default`` — ``onnxruntime.InferenceSession`` with default options on the unoptimized export
  (the fp32 artifact the first ARTIFACT was optimized from), numpy pooling;
* ``pytorch fp32`` — transformers ``AutoModel`` on the source model, same pooling, ``torch.set_num_threads``.

Alternating in one process is what makes the ratios meaningful on a shared machine (each runner
sees the same background load, round by round); ``lmforge tune`` measures configurations one
after another and is for choosing a configuration, not for these ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from lmforge.benchmark.encoder_peers import fixed_ids, open_runner, peer_artifact
    from runtime.artifact import load_artifact
    from runtime.encoder import Encoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--pause", type=float, default=0.2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    first = load_artifact(args.artifacts[0])
    probe = Encoder(first, threads=1)
    ids = fixed_ids(int(first.architecture["vocab"]), probe.tokenizer.encode("").ids, args.batch, args.seq, 0)
    runners: dict[str, object] = {}
    for path in args.artifacts:
        art = load_artifact(path)
        runners[f"lmforge {art.precision} ({Path(path).name})"] = open_runner("lmforge", path, args.threads)
    base, why = peer_artifact(first, "ort")
    if base is None:
        print(f"ort default: skipped ({why})", file=sys.stderr)
    else:
        runners["ort default (unoptimized export)"] = open_runner("ort", str(base), args.threads)
    runners["pytorch fp32"] = open_runner("pytorch", str(first.path), args.threads)

    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            time.sleep(args.pause)
            t0 = time.perf_counter()
            runners[name](ids)  # type: ignore[operator]
            if r:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    rate = {n: args.batch / float(np.median(t)) for n, t in times.items()}
    torch_rate = rate["pytorch fp32"]
    ort_rate = rate.get("ort default (unoptimized export)")
    print(f"batch {args.batch} × {args.seq} tokens, {args.threads} threads, {args.rounds} rounds "
          f"(load average before: {os.getloadavg()[0]:.2f})")
    print("| runner | seq/s (median) | min–max | vs PyTorch | vs default ORT |")
    print("|---|---:|---:|---:|---:|")
    for n in names:
        lo, hi = args.batch / max(times[n]), args.batch / min(times[n])
        vs_ort = f"{rate[n] / ort_rate:.2f}×" if ort_rate else "—"
        print(f"| {n} | {rate[n]:.1f} | {lo:.1f}–{hi:.1f} | {rate[n] / torch_rate:.2f}× | {vs_ort} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": args.batch, "seq": args.seq, "threads": args.threads,
                                               "seq_per_s": rate, "seconds": times}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
