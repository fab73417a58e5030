"""Decode speed of SmolLM2-135M on CPU: fp32 unfused vs fp32 fused vs int8 vs int4, in one run.

A plain onnxruntime greedy loop (no lmforge runtime, so the numbers are the graphs' own): a 64-token
prompt, 64 new tokens, batch 1. The variants are timed *alternately* — every repeat runs each
variant once, in turn, after one warm-up generation of each — so that load from other processes
on the machine falls on all of them alike; the table shows medians of decode tokens/s (the
one-token steps after prefill) and of prefill time. Then the greedy-token agreement of each variant
with fp32 unfused on a handful of prompts.

    PYTHONPATH=. python bench/cpu_passes.py --root /tmp/passart/smol --build /tmp/art/smollm2

``--root`` holds the artifacts ``fp32_nofuse``, ``fp32``, ``fp32_shared``, ``int8``, ``int4``;
``--build SRC`` first makes the missing ones from the fp32 artifact ``SRC`` with
:func:`passes.pipeline.optimize_artifact` (the same as ``lmforge optimize SRC -o ROOT/<name>
--device cpu --precision … [--no-fuse] [--kv-mode shared-buffer]``). ``fp32_shared`` is the fused
fp32 graph with the ``shared-buffer`` KV contract (past and present bound to one buffer through
IO binding, nothing copied per step); the others keep ``concat`` (present = past + new, a new
tensor every step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.artifact import Artifact, load_artifact

__all__ = ["main"]

VARIANTS = ("fp32_nofuse", "fp32", "fp32_shared", "int8", "int4")
# name → (precision, fuse, kv_mode) for --build
RECIPES = {
    "fp32_nofuse": ("fp32", False, None),
    "fp32": ("fp32", True, "concat"),
    "fp32_shared": ("fp32", True, "shared-buffer"),
    "int8": ("int8", True, "concat"),
    "int4": ("int4", True, "concat"),
}
PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The capital of France is",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
]


SPIN = True  # set by --no-spin


def _session(art: Artifact, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not SPIN:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(art.model_path), options, providers=["CPUExecutionProvider"])


class Greedy:
    """Batch-1 greedy decoding over a ``concat`` artifact with plain ``InferenceSession.run``."""

    def __init__(self, art: Artifact, threads: int) -> None:
        self.session = _session(art, threads)
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


class SharedGreedy:
    """Batch-1 greedy decoding over a ``shared-buffer`` artifact: one KV buffer per past tensor,
    bound as both the past input and the present output (GroupQueryAttention updates it in place)."""

    def __init__(self, art: Artifact, threads: int, capacity: int = 512) -> None:
        self.session = _session(art, threads)
        a, kv = art.architecture, art.manifest["kv"]
        self.layers, self.kv_heads, self.head_dim = int(a["layers"]), int(a["kv_heads"]), int(a["head_dim"])
        self.kv, self.capacity = kv, capacity
        self.pairs = [(kv[p].format(i=i), kv[q].format(i=i)) for i in range(self.layers)
                      for p, q in (("past_key", "present_key"), ("past_value", "present_value"))]

    def _run(self, buffers: dict[str, ort.OrtValue], ids: np.ndarray, positions: np.ndarray,
             seqlens_k: int, total: int) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", positions)
        binding.bind_cpu_input("seqlens_k", np.array([seqlens_k], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for past, present in self.pairs:
            binding.bind_ortvalue_input(past, buffers[past])
            binding.bind_ortvalue_output(present, buffers[past])
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def generate(self, ids: list[int], new: int) -> tuple[list[int], float, float]:
        """(tokens, prefill seconds, decode seconds for the new-1 one-token steps)."""
        shape = (1, self.kv_heads, self.capacity, self.head_dim)
        buffers = {past: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for past, _ in self.pairs}
        n = len(ids)
        t0 = time.perf_counter()
        logits = self._run(buffers, np.array([ids], np.int64), np.arange(n, dtype=np.int64)[None], n - 1, n)
        out = [int(logits[0, -1].argmax())]
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for step in range(1, new):
            pos = n + step - 1
            logits = self._run(
                buffers, np.array([[out[-1]]], np.int64), np.array([[pos]], np.int64), pos, self.capacity
            )
            out.append(int(logits[0, -1].argmax()))
        return out, prefill, time.perf_counter() - t0


def _runner(art: Artifact, threads: int, capacity: int) -> Greedy | SharedGreedy:
    if art.manifest.get("kv_mode") == "shared-buffer":
        return SharedGreedy(art, threads, capacity)
    return Greedy(art, threads)


def _build(source: Path, root: Path, names: list[str]) -> None:
    from passes.pipeline import optimize_artifact

    for name in names:
        if (root / name).is_dir():
            continue
        precision, fuse, kv_mode = RECIPES[name]
        print(
            f"building {root / name} ({precision}, {'fused' if fuse else 'unfused'}, {kv_mode or 'concat'}) …",
            flush=True,
        )
        optimize_artifact(source, root / name, "cpu", precision, fuse=fuse, kv_mode=kv_mode, progress=False)


def _prompt_ids(tokenizer_dir: Path, text: str, length: int | None) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tok.encode(text).ids
    if length is not None:
        ids = (ids * (length // max(1, len(ids)) + 1))[:length]
    return ids


def _describe(art: Artifact) -> str:
    q = art.manifest.get("quantization")
    if not q:
        return f"{art.precision}, kv {art.manifest.get('kv_mode')}"
    keep = ("bits", "block_size", "symmetric", "accuracy_level", "weight_type", "per_channel")
    settings = ", ".join(f"{k}={v}" for k, v in q["settings"].items() if k in keep)
    return f"{q['method'].rsplit('.', 1)[-1]}({settings}) on {q['converted_nodes']} nodes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/passart/smol"))
    parser.add_argument("--build", type=Path, default=None, metavar="SRC",
                        help="make the missing variants from this fp32 artifact first")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--agreement-tokens", type=int, default=32)
    parser.add_argument("--no-spin", action="store_true",
                        help="session.intra_op.allow_spinning=0 (on a machine other processes load, spinning "
                             "intra-op threads wait on each other: 2 threads ran at 9.5 tok/s spinning, 14.3 not)")
    args = parser.parse_args(argv)
    global SPIN
    SPIN = not args.no_spin

    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in RECIPES]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.build is not None:
        _build(args.build, args.root, names)
    arts = {v: load_artifact(args.root / v, verify_hashes=False) for v in names if (args.root / v).is_dir()}
    if not arts:
        parser.error(f"none of {names} exists under {args.root}; pass --build SRC to make them")
    capacity = args.prompt_tokens + max(args.new_tokens, args.agreement_tokens) + 64
    runners = {v: _runner(a, args.threads, capacity) for v, a in arts.items()}
    first = next(iter(arts.values()))
    bench_ids = _prompt_ids(first.tokenizer_dir, " ".join(PROMPTS), args.prompt_tokens)

    for runner in runners.values():
        runner.generate(bench_ids, args.new_tokens)  # warm-up
    decode: dict[str, list[float]] = {v: [] for v in runners}
    prefill: dict[str, list[float]] = {v: [] for v in runners}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, runner in runners.items():  # alternating: each repeat times every variant once
            _, p, d = runner.generate(bench_ids, args.new_tokens)
            prefill[name].append(p)
            decode[name].append((args.new_tokens - 1) / d)
        load.append(os.getloadavg()[0])

    base_name = "fp32_nofuse" if "fp32_nofuse" in runners else next(iter(runners))
    base = statistics.median(decode[base_name])
    print(
        f"\nSmolLM2-135M, CPU ({args.threads} threads{'' if SPIN else ', no spinning'}, "
        f"onnxruntime {ort.__version__}, {os.cpu_count()} cores), "
        f"batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; variants alternated, "
        f"median of {args.repeats} after a warm-up; 1-min load average during the run "
        f"{min(load):.1f}–{max(load):.1f}\n"
    )
    print(f"| variant | decode tok/s (median) | min–max | × {base_name} | prefill ms | artifact MiB | graph |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in runners:
        med = statistics.median(decode[name])
        size = sum(f["size"] for f in arts[name].manifest["files"].values()) / 2**20
        print(f"| {name} | {med:.1f} | {min(decode[name]):.1f}–{max(decode[name]):.1f} | {med / base:.2f}× | "
              f"{statistics.median(prefill[name]) * 1e3:.0f} | {size:.0f} | {_describe(arts[name])} |")

    ref = runners.get("fp32_nofuse")
    if ref is not None and args.agreement_tokens > 0:
        print(f"\nGreedy agreement with fp32 unfused, {len(PROMPTS)} prompts × {args.agreement_tokens} tokens "
              "(first divergence step per prompt, = when identical):")
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
            print(f"  {name}: {exact}/{len(PROMPTS)} identical; {', '.join(firsts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
