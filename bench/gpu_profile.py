"""Where a decode step's time goes on the GPU: every CUDA kernel of a step, by kind, against the step's wall time.

On one warm :class:`runtime.Engine` (CUDA graphs, ``Engine.warm_up()`` run) over a fp16
shared-buffer artifact (``bench/gpu_serving.py``'s ``build``), for each ``--batch`` size it

* times whole-batch decode (tokens after the first over the time after the first token, median of
  ``--repeats``), so a step's wall time is known;
* records one more generation's decode with CUPTI through ``torch.profiler`` (CUDA activity only;
  CUPTI reports each kernel a captured CUDA graph replays as its own record), from the first token
  on, and sums each kernel's device time per step;
* groups the kernels by kind (GEMM/GEMV, attention, norms, element-wise, sampling, copies) and
  prints, per step: the wall time, the kernels' summed time, the idle rest, the launch count, and
  the weights' bytes over the wall time (bandwidth).

With ``--phases`` and a kernels library built with ``-DLMFORGE_PROFILE=1`` (``LMFORGE_KERNELS_LIB``), it
also prints where the fused sampler's time goes inside those timed steps: a row's SM cycles per
phase of the cluster kernel, its wall time, the SM clock they imply, its search rounds (and how many
were interpolated, with ``LMFORGE_PIVOT_RULE=1``) and the searches' cycles split between the passes
over the row and the cluster reductions (``lmforge_profile_read`` in ``runtime/kernels/sampling.cu``).

onnxruntime's own profiler cannot see inside a captured graph; CUPTI can. torch is imported only
after onnxruntime has loaded its CUDA libraries. Writes ``OUT/gpu_profile-<label>.json``.

``--unfused-from SRC`` first builds ``--artifact`` from the fp32 artifact ``SRC`` as the pipeline
did before gate|up were fused on CUDA (separate gate and up GEMVs, no named SwiGLU gates): the
baseline of ``bench/gpu_mlp.sh``. ``LMFORGE_KERNELS_SILU=0`` in the environment keeps the gates'
ONNX nodes on a fused artifact.

    export PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD HF_HUB_OFFLINE=1
    python3 bench/gpu_profile.py --artifact /tmp/lmf-serve/llama-3.2-1b/serve-cuda --label before --out $OUT
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = (  # first match wins: (kind, substrings of the kernel's name, lower case)
    ("sampling", ("fused_sample",)),
    ("silu-mul", ("silu_mul",)),
    ("attention", ("flash", "attention", "xqa", "mmha", "kernel_mha", "rotary", "concat", "kv_cache", "unpack",
                   "softmax", "getsequencelengths")),
    ("norm", ("layernorm", "layer_norm", "rmsnorm")),
    ("gemm/gemv", ("gemv", "gemm", "cutlass", "xmma", "cublas", "splitk", "matmul", "sm90_")),
    ("element-wise", ("elementwise", "unary", "binary", "sigmoid", "_mul", "impl_cast", "cast", "where", "expand")),
    ("copy", ("memcpy", "memset", "copy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def weight_bytes(art: Path) -> int:
    return sum(p.stat().st_size for p in art.glob("*.data"))


_cupti_warm: list[bool] = []


def profile_batch(engine: Any, prompts: list[list[int]], new_tokens: int, device: str,
                  sampling: dict[str, Any]) -> dict[str, Any]:
    """One generation of ``prompts`` with CUPTI on from its first token: kernel time per step."""
    # torch after onnxruntime's CUDA libraries are loaded (the engine exists)
    from gpu_serving import _params
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    if not _cupti_warm:  # a process's first CUPTI session recorded no kernel on the H100: one to throw away
        with profile(activities=[activity]):
            engine.generate_results(prompts[:1], 4)
        _cupti_warm.append(True)
    requests = [engine.submit(p, max_new_tokens=new_tokens, sampling=_params(new_tokens, i, **sampling))
                for i, p in enumerate(prompts)]
    prof = profile(activities=[activity])
    started = False
    tokens = 0
    first = requests[0]
    for event in first:  # the first request paces the window; the others run in the same steps
        if not started and event.token_ids:
            prof.start()
            started = True
            continue
        tokens += len(event.token_ids)
    for request in requests[1:]:
        for _ in request:
            pass
    prof.stop()
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    # the trace's device records (CUPTI): kernels, copies and memsets, with their durations in µs
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    device_kinds = ("kernel", "gpu_memcpy", "gpu_memset") if device == "cuda" else ("cpu_op",)
    for ev in events:
        if ev.get("ph") == "X" and ev.get("cat") in device_kinds:
            kernels[ev["name"]][0] += float(ev.get("dur", 0.0))
            kernels[ev["name"]][1] += 1
    samples = [c for n, (_, c) in kernels.items() if "fused_sample" in n.lower()]
    steps = max(samples[0] if samples else tokens, 1)
    return {"steps": steps, "tokens_in_window": tokens,
            "kernels": {n: {"us_per_step": t / steps, "per_step": c / steps} for n, (t, c) in kernels.items()}}


PHASES = ("rows", "sampled", "argmax", "stats", "top-k", "top-p", "draw", "state", "exit", "cycles", "ns",
          "rounds top-k", "rounds top-p", "search passes", "search reductions",
          "rounds interpolated")  # sampling.cu's ProfileSlot order


def read_phases(reset_only: bool = False) -> dict[str, float] | None:
    """The fused sampler's profile counters since the last read, a row's mean (None: the library is
    not a ``LMFORGE_PROFILE`` build). Reading zeroes them."""
    import ctypes

    from runtime.kernels import kernel_library

    path = kernel_library()
    if path is None:
        return None
    try:
        fn = ctypes.CDLL(str(path)).lmforge_profile_read
    except AttributeError:
        return None
    values = (ctypes.c_ulonglong * len(PHASES))()
    if fn(values, len(PHASES)) != len(PHASES) or reset_only:
        return None
    raw = dict(zip(PHASES, (float(v) for v in values), strict=True))
    rows, sampled = max(raw["rows"], 1.0), max(raw["sampled"], 1.0)
    counts = ("rows", "sampled", "rounds top-k", "rounds top-p", "rounds interpolated")
    out = {k: round(v / rows, 1) for k, v in raw.items() if k not in counts}
    out.update({"rows": raw["rows"], "sampled": raw["sampled"],
                "rounds top-k": round(raw["rounds top-k"] / sampled, 2),
                "rounds top-p": round(raw["rounds top-p"] / sampled, 2),
                "rounds interpolated": round(raw["rounds interpolated"] / sampled, 2),
                "mhz": round(1e3 * raw["cycles"] / raw["ns"], 0) if raw["ns"] else 0.0})
    return out


def build_unfused(src: Path, out: Path) -> None:
    """``out``: ``src`` optimized for CUDA fp16 shared-buffer without the gate|up fusion."""
    from unittest import mock

    from passes.pipeline import optimize_artifact

    if (out / "manifest.json").is_file():
        return
    with mock.patch("passes.precision.fuse_shared_input_matmuls", return_value=0), \
            mock.patch("passes.precision.name_silu_gates", return_value=0):
        optimize_artifact(src, out, device="cuda", precision="fp16", kv_mode="shared-buffer", force=True,
                          progress=False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from gpu_serving import GREEDY, SAMPLED, decode_rate

    from runtime import Engine

    art = Path(args.artifact)
    if args.unfused_from:
        build_unfused(Path(args.unfused_from), art)
    engine = Engine.load(art, device=args.device, cuda_graph=args.device == "cuda", verify_hashes=False,
                         max_batch=max(args.batch), max_context=args.prompt_len + args.new_tokens + 16)
    out: dict[str, Any] = {"artifact": str(art), "weight_bytes": weight_bytes(art), "label": args.label}
    try:
        t0 = time.perf_counter()
        engine.warm_up()
        out["warm_up_s"] = round(time.perf_counter() - t0, 1)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(100, engine.vocab - 100, args.prompt_len).tolist() for _ in range(max(args.batch))]
        sampling = GREEDY if args.sampling == "greedy" else SAMPLED[args.sampling]
        out["sampling"] = args.sampling
        for b in args.batch:
            if args.phases:
                read_phases(reset_only=True)
            rate = decode_rate(engine, prompts[:b], args.new_tokens, sampling, args.repeats)
            phases = read_phases() if args.phases else None
            step_us = 1e6 * b / rate
            prof = profile_batch(engine, prompts[:b], args.new_tokens, args.device, sampling)
            by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
            for name, k in prof["kernels"].items():
                by_kind[kind_of(name)][0] += k["us_per_step"]
                by_kind[kind_of(name)][1] += k["per_step"]
            busy = sum(v[0] for v in by_kind.values())
            launches = sum(v[1] for v in by_kind.values())
            top = sorted(prof["kernels"].items(), key=lambda kv: -kv[1]["us_per_step"])[: args.top]
            row = {"decode_tok_s": round(rate, 1), "step_us": round(step_us, 1), "kernel_us": round(busy, 1),
                   "idle_us": round(step_us - busy, 1), "launches": round(launches, 1),
                   "bandwidth_gb_s": round(out["weight_bytes"] / step_us / 1e3, 1), "steps_profiled": prof["steps"],
                   "by_kind": {k: {"us": round(v[0], 1), "launches": round(v[1], 1)}
                               for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
                   "top": [{"name": n[:160], "kind": kind_of(n), "us": round(k["us_per_step"], 2),
                            "per_step": round(k["per_step"], 2)} for n, k in top]}
            if phases is not None:
                row["phases"] = phases
                print(f"[{args.label}] batch {b} sampler phases, a row: {phases}", flush=True)
            out[f"batch {b}"] = row
            print(f"[{args.label}] batch {b}: {rate:.0f} tok/s, step {step_us:.0f} us = kernels {busy:.0f} "
                  f"+ idle {step_us - busy:.0f} us, {launches:.0f} launches, {row['bandwidth_gb_s']} GB/s of weights",
                  flush=True)
            for kind, v in row["by_kind"].items():
                print(f"    {kind:>13}: {v['us']:8.1f} us  {v['launches']:6.1f} launches", flush=True)
            for k in row["top"][:12]:
                print(f"    {k['us']:8.2f} us x{k['per_step']:5.1f}  {k['kind']:>12}  {k['name'][:90]}", flush=True)
    finally:
        engine.close(drain=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--label", default="profile")
    parser.add_argument("--unfused-from", default=None,
                        help="build --artifact from this fp32 artifact, gate|up not fused")
    parser.add_argument("--batch", type=lambda t: [int(v) for v in t.split(",")], default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--sampling", default="greedy", choices=("greedy", "temperature 0.7",
                        "temperature 0.7 + top-p 0.9", "top-k 50 + top-p 0.9"),
                        help="every request's sampling (seeded per row), as bench/gpu_serving.py names them")
    parser.add_argument("--phases", action="store_true",
                        help="the fused sampler's per-phase cycles (a LMFORGE_PROFILE=1 build in LMFORGE_KERNELS_LIB)")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (CPU activity, no kernels)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    result = run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"gpu_profile-{args.label}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("batch")}), flush=True)


if __name__ == "__main__":
    main()
