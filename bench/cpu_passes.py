"""Decode speed of SmolLM2-135M on CPU: fp32 unfused vs fp32 fused vs int8 vs int4, in one run.

A plain onnxruntime greedy loop with the ``concat`` KV contract (no lmforge runtime, so the
numbers are the graphs' own): a 64-token prompt, 64 new tokens, batch 1. Per variant: one warm-up
generation, then ``--repeats`` timed ones; the table shows medians of decode tokens/s (the 63
one-token steps after prefill) and of prefill time. Also reports greedy-token agreement of each
variant with the fp32 unfused one on a handful of prompts.

    PYTHONPATH=. python bench/cpu_passes.py --root /tmp/passart/smol

``--root`` holds the artifacts ``fp32_nofuse``, ``fp32``, ``int8``, ``int4`` made by
``lmforge optimize /tmp/art/smollm2 -o ROOT/<name> --precision … [--no-fuse]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.artifact import Artifact, load_artifact

__all__ = ["main"]

VARIANTS = ("fp32_nofuse", "fp32", "int8", "int4")
PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The capital of France is",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
]


class Greedy:
    """Batch-1 greedy decoding over a ``concat`` artifact with plain ``InferenceSession.run``."""

    def __init__(self, art: Artifact, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(art.model_path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        a, kv = art.architecture, art.manifest["kv"]
        self.layers, self.kv_heads, self.head_dim = int(a["layers"]), int(a["kv_heads"]), int(a["head_dim"])
        self.kv = kv

    def generate(self, ids: list[int], new: int) -> tuple[list[int], float, float]:
        """(tokens, prefill seconds, decode seconds for the new-1 one-token steps)."""
        past = {}
        for i in range(self.layers):
            for t in (self.kv["past_key"], self.kv["past_value"]):
                past[t.format(i=i)] = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        step = np.array([ids], np.int64)
        total = len(ids)
        out: list[int] = []
        t0 = time.perf_counter()
        prefill = 0.0
        for n in range(new):
            feed = {"input_ids": step, "attention_mask": np.ones((1, total), np.int64),
                    "position_ids": np.arange(total - step.shape[1], total, dtype=np.int64)[None], **past}
            res = dict(zip(self.outputs, self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})))
            token = int(res["logits"][0, -1].argmax())
            out.append(token)
            past = {self.kv[p].format(i=i): res[self.kv[q].format(i=i)] for i in range(self.layers)
                    for p, q in (("past_key", "present_key"), ("past_value", "present_value"))}
            step = np.array([[token]], np.int64)
            total += 1
            if n == 0:
                prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
        return out, prefill, time.perf_counter() - t0


def _prompt_ids(tokenizer_dir: Path, text: str, length: int | None) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tok.encode(text).ids
    if length is not None:
        ids = (ids * (length // max(1, len(ids)) + 1))[:length]
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/passart/smol"))
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--agreement-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    arts = {v: load_artifact(args.root / v, verify_hashes=False) for v in VARIANTS if (args.root / v).is_dir()}
    runners = {v: Greedy(a, args.threads) for v, a in arts.items()}
    first = next(iter(arts.values()))
    bench_ids = _prompt_ids(first.tokenizer_dir, " ".join(PROMPTS), args.prompt_tokens)

    rows = []
    for name, runner in runners.items():
        runner.generate(bench_ids, args.new_tokens)  # warm-up
        decode, prefill = [], []
        for _ in range(args.repeats):
            _, p, d = runner.generate(bench_ids, args.new_tokens)
            prefill.append(p)
            decode.append((args.new_tokens - 1) / d)
        size = sum(f["size"] for f in arts[name].manifest["files"].values()) / 2**20
        rows.append((name, statistics.median(decode), min(decode), max(decode), statistics.median(prefill) * 1e3, size))

    base = rows[0][1]
    print(f"\nSmolLM2-135M, CPU ({args.threads} threads, onnxruntime {ort.__version__}), batch 1, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.repeats} after a warm-up\n")
    print(f"| variant | decode tok/s (median) | min–max | × fp32 unfused | prefill ms | artifact MiB |")
    print(f"|---|---:|---:|---:|---:|---:|")
    for name, med, lo, hi, pre, size in rows:
        print(f"| {name} | {med:.1f} | {lo:.1f}–{hi:.1f} | {med / base:.2f}× | {pre:.0f} | {size:.0f} |")

    ref = runners.get("fp32_nofuse")
    if ref is not None:
        print(f"\nGreedy agreement with fp32 unfused, {len(PROMPTS)} prompts × {args.agreement_tokens} tokens:")
        refs = [ref.generate(_prompt_ids(first.tokenizer_dir, p, None), args.agreement_tokens)[0] for p in PROMPTS]
        for name, runner in runners.items():
            if name == "fp32_nofuse":
                continue
            exact, firsts = 0, []
            for p, r in zip(PROMPTS, refs):
                got = runner.generate(_prompt_ids(first.tokenizer_dir, p, None), args.agreement_tokens)[0]
                div = next((i for i, (a, b) in enumerate(zip(r, got)) if a != b), None)
                exact += div is None
                firsts.append("=" if div is None else str(div))
            print(f"  {name}: {exact}/{len(PROMPTS)} identical; first divergence step per prompt: {', '.join(firsts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
