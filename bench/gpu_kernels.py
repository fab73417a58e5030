"""GPU: lmforge's fused sampling kernel against the ONNX sampler, decode tok/s on a real shape.

Run on the lent GPU after staging onnxruntime-gpu (``bench/gpu_kernels.sh`` does the whole call:
the build, the GPU tests, then this)::

    export PYTHONPATH=/tmp/gpu-site:$PWD HF_HUB_OFFLINE=1
    python3 bench/gpu_kernels.py --shape smollm2-135m --out $OUT

1. ``random:<shape>`` converted and optimized for CUDA fp16 (shared-buffer, the step model inside;
   ``bench/gpu_serving.py``'s :func:`build`), reused from ``--work`` when present;
2. the op alone: one ``lmforge.FusedSample`` node replayed as a captured CUDA graph over
   ``[rows, vocab]`` fp16 logits, microseconds a call per sampling kind at 1 and 16 rows;
3. decode tok/s (``bench/gpu_serving.py``'s :func:`decode_rate`: tokens after the first over the
   time after the first token, median of ``--repeats``) for greedy, temperature 0.7, temperature
   0.7 + top-p 0.9 and top-k 50 + top-p 0.9 at batch 1 and 16, once with the ONNX sampler
   (``LMFORGE_KERNELS=0``) and once with the fused kernel, each in its own process (a second
   session on the same model in one process slows the captured step).

Writes ``OUT/gpu_kernels.json`` and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODES = ("onnx", "fused", "single")
KINDS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "temperature 0.7": {"temperature": 0.7},
    "top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top-k 50 + top-p 0.9": {"temperature": 1.0, "top_k": 50, "top_p": 0.9},
}
BATCHES = (1, 16)


def _preload() -> None:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def op_timing(vocab: int, calls: int = 200) -> dict[str, Any]:
    """Microseconds per call of the fused op alone, replayed as a captured CUDA graph."""
    import onnxruntime as ort

    from runtime import SamplingParams
    from runtime._onnx_proto import GraphBuilder
    from runtime.kernels import kernel_library
    from runtime.sampler_graph import ROW_INPUTS, add_fused_sampling
    from runtime.sampling import row_arrays, stack_rows

    library = kernel_library()
    if library is None:
        return {"error": "no kernels library"}
    steps = 4
    g = GraphBuilder("fused_only")
    names = {row.name: g.input(row.name, row.dtype, ["batch", *row.dims(vocab, steps)]) for row in ROW_INPUTS}
    g.input("logits", "float16", ["batch", vocab])
    outs = {"next_ids": "next_ids", "seen": "seen_out", "counts": "counts_out", "step": "step_out"}
    add_fused_sampling(g, "logits", names, outs)
    for name, dtype, dims in (("next_ids", "int64", ["batch", 1]), ("seen_out", "bool", ["batch", vocab]),
                              ("counts_out", "float32", ["batch", vocab]), ("step_out", "int64", ["batch"])):
        g.output(name, dtype, dims)
    model = g.to_bytes()
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {}
    for kind, kw in KINDS.items():
        for rows in BATCHES:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.register_custom_ops_library(str(library))
            session = ort.InferenceSession(model, sess_options=options,
                                           providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
            host = stack_rows([row_arrays(SamplingParams(seed=r, **kw), [], [], vocab, steps) for r in range(rows)])
            host["logits"] = (rng.standard_normal((rows, vocab)) * 3).astype(np.float16)
            binding = session.io_binding()
            for name, array in host.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array),
                                                                                    "cuda", 0))
            for name, dtype, shape in (("next_ids", np.int64, [rows, 1]), ("seen_out", np.bool_, [rows, vocab]),
                                       ("counts_out", np.float32, [rows, vocab]), ("step_out", np.int64, [rows])):
                binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0))
            for _ in range(5):
                session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            t0 = time.perf_counter()
            for _ in range(calls):
                session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            result[f"{kind}, {rows} rows"] = (time.perf_counter() - t0) / calls * 1e6
            del session
    return result


def probe() -> None:
    """A first look, step by step with a watchdog: one fused session, a greedy and a sampled call
    at a small and a real vocabulary, each timed (a hang dumps every thread's stack)."""
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("PROBE_WATCHDOG_S", "40")), exit=True)
    _preload()
    import onnxruntime as ort

    from runtime import SamplingParams
    from runtime.kernels import kernel_library
    from runtime.sampler_graph import build_sampler_model
    from runtime.sampling import Sampler

    library = kernel_library()
    print("probe: library", library, flush=True)
    for vocab in (64, 4096, 49152, 128256):
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(library))
        t0 = time.perf_counter()
        session = ort.InferenceSession(build_sampler_model("float32", vocab, fused=True), sess_options=options,
                                       providers=["CUDAExecutionProvider"])
        fused = Sampler("float32", providers=("CUDAExecutionProvider",))
        fused._sessions[vocab] = session  # the probe reuses the Sampler feeds
        print(f"probe: vocab {vocab}: session {time.perf_counter() - t0:.2f}s", flush=True)
        logits = (np.random.default_rng(0).standard_normal((4, vocab)) * 3).astype(np.float32)
        for label, params in (("greedy", [SamplingParams()] * 4),
                              ("top-k 50 + top-p 0.9", [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=i)
                                                        for i in range(4)]),
                              ("top-p 0.9", [SamplingParams(temperature=0.7, top_p=0.9, seed=i) for i in range(4)])):
            t0 = time.perf_counter()
            ids = fused.sample(logits, params)
            print(f"probe: vocab {vocab} {label}: {ids.tolist()} in {time.perf_counter() - t0:.3f}s "
                  f"(onnx: {Sampler('float32').sample(logits, params).tolist()})", flush=True)
    faulthandler.cancel_dump_traceback_later()
    print("PROBE OK", flush=True)


def child(args: argparse.Namespace) -> None:
    """One process, one sampler: decode tok/s per kind and batch, as one JSON line."""
    _preload()
    from gpu_serving import GREEDY, decode_rate, one_call

    from runtime import Engine

    art = Path(args.artifact)
    vocab = json.loads((art / "manifest.json").read_text())["architecture"]["vocab"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, vocab - 10, args.prompt_len).tolist() for _ in range(16)]
    engine = Engine.load(art, device="cuda", max_batch=16, verify_hashes=False,
                         max_context=args.prompt_len + args.new_tokens + 16)
    out: dict[str, Any] = {"mode": args.child, "fused": engine.backend.device.kernels is not None}
    try:
        for n in BATCHES:  # capture every bucket used, for every kind
            for kw in KINDS.values():
                one_call(engine, prompts[:n], 8, kw or GREEDY)
        out["tok_s"] = {kind: {f"batch {b}": decode_rate(engine, prompts[:b], args.new_tokens, kw, args.repeats)
                               for b in BATCHES} for kind, kw in KINDS.items()}
        if args.child != "onnx":
            out["op_us"] = op_timing(vocab)
    finally:
        engine.close(drain=False)
    print("RESULT " + json.dumps(out), flush=True)


def table(results: dict[str, Any]) -> str:
    lines = ["decode tok/s (× greedy of the same sampler)"]
    modes = [m for m in MODES if m in results]
    head = f"{'kind':<24}" + "".join(f"{m + ' b' + str(b):>22}" for m in modes for b in BATCHES)
    lines.append(head)
    for kind in KINDS:
        cells = []
        for mode in modes:
            rates = results.get(mode, {}).get("tok_s", {})
            for b in BATCHES:
                rate = rates.get(kind, {}).get(f"batch {b}")
                base = rates.get("greedy", {}).get(f"batch {b}")
                cells.append(f"{rate:,.0f} ({rate / base:.2f}×)" if rate and base else "–")
        lines.append(f"{kind:<24}" + "".join(f"{c:>22}" for c in cells))
    for mode in ("fused", "single"):
        op = results.get(mode, {}).get("op_us")
        if isinstance(op, dict) and "error" not in op:
            lines.append(f"{mode} op alone (captured graph, µs a call): "
                         + ", ".join(f"{k} {v:.1f}" for k, v in op.items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--artifact", default=None, help="an fp16 CUDA shared-buffer artifact (default: build one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmf-kernels"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("--modes", default="onnx,fused",
                        help="samplers to time, each in its own process: onnx (the ONNX nodes), fused (the "
                             "kernels' default: the cluster kernel on sm_90+), single (the single-block kernel)")
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help="only a first look at the op (watchdog on)")
    args = parser.parse_args()
    if args.probe:
        probe()
        return 0
    if args.child:
        child(args)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"shape": args.shape, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
    t0 = time.perf_counter()
    if args.artifact is None:
        _preload()
        from gpu_serving import build

        args.artifact = str(build(args.shape, args.work, "cuda"))
    results["artifact"] = args.artifact
    print(f"[{time.perf_counter() - t0:5.0f}s] artifact {args.artifact}", flush=True)
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
        env = {**os.environ, "LMFORGE_KERNELS": "0" if mode == "onnx" else "1",
               "LMFORGE_KERNELS_CLUSTER": "0" if mode == "single" else "1"}
        command = [sys.executable, __file__, "--child", mode, "--artifact", args.artifact, "--prompt-len",
                   str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if found:
            results[mode] = json.loads(found[-1][len("RESULT "):])
        else:
            results[mode] = {"error": (done.stderr or done.stdout)[-3000:]}
            print(f"{mode} failed:\n{results[mode]['error']}", flush=True)
        print(f"[{time.perf_counter() - t0:5.0f}s] {mode} done", flush=True)
        (args.out / "gpu_kernels.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (args.out / "gpu_kernels.txt").write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
