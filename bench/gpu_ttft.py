"""Where time to first token goes on the GPU, and what the fused prefill changed.

For each artifact (opened with CUDA graphs, as ``lmforge bench`` opens it) and batch, after a
warm-up: TTFT (``GenerationResult.ttft_s`` of a one-token request, median of ``--reps``) with the
prefill fused into the step model (``fuse_prefill``: one eager run picks the first token and
writes the first decode step's inputs) and without it (prefill, last-position gather, sampler
and advance sessions); the time inside the prefill's eager ``run_with_iobinding`` calls alone;
and, from CUPTI through ``torch.profiler``, the GPU-busy time and kernel count of one fused
prefill, so the rest (host work between kernels, launches, syncs) shows.

    PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD python3 bench/gpu_ttft.py \\
        --artifacts /tmp/lmf/llama-3.2-1b/fp16,/tmp/lmf/smollm2-135m/fp16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 3)


def measure(path: Path, batch: int, prompt_len: int, reps: int, device: str) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity

    from runtime import Engine, SamplingParams

    eng: Any = Engine.load(path, device=device, verify_hashes=False, cuda_graph=device == "cuda")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, eng.vocab - 1, prompt_len).tolist() for _ in range(batch)]
    params = SamplingParams(min_new_tokens=1)
    eng.generate_results(prompts, 32, SamplingParams(min_new_tokens=32))  # warm-up, graph capture

    runs: list[float] = []
    invoke = eng._invoke

    def timed(session: Any, binding: Any, options: Any = None) -> None:
        t0 = time.perf_counter()
        invoke(session, binding, options)
        if session is eng._session and options is eng._eager:
            runs.append(time.perf_counter() - t0)

    eng._invoke = timed
    out: dict[str, Any] = {"artifact": str(path), "batch": batch, "prompt_len": prompt_len}
    for fused in (True, False, True):  # fused twice: first and last, to see drift
        eng.fuse_prefill = fused
        ttft, eager = [], []
        for _ in range(reps):
            runs.clear()
            ttft.append(max(r.ttft_s for r in eng.generate_results(prompts, 1, params)))
            eager.append(sum(runs))
        key = "fused" if fused else "unfused"
        out.setdefault(key, []).append({"ttft_ms": _ms(ttft), "eager_run_ms": _ms(eager)})
    eng.fuse_prefill = True
    eng._invoke = invoke

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        t0 = time.perf_counter()
        eng.generate_results(prompts, 1, params)
        wall = time.perf_counter() - t0
    kernels = [(ev.name, ev.time_range.elapsed_us()) for ev in prof.events()
               if ev.device_type.name == "CUDA" and ev.time_range.elapsed_us() > 0]
    by_name: dict[str, float] = {}
    for name, us in kernels:
        by_name[name] = by_name.get(name, 0.0) + us
    out["profile"] = {
        "wall_ms": round(1e3 * wall, 3), "gpu_busy_ms": round(sum(us for _, us in kernels) / 1e3, 3),
        "kernels": len(kernels),
        "top": [{"kernel": n[:120], "us": round(u, 1)} for n, u in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]],
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="", help="comma-separated artifact folders")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no kernels)")
    parser.add_argument("--compare", default="", metavar="ARTIFACT=MODEL.onnx",
                        help="also time one eager prefill of the artifact's bare decoder against another ONNX "
                             "decoder (input_ids, attention_mask, past_key_values.*; e.g. onnxruntime-genai's)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    import onnxruntime as ort

    if args.device == "cuda":
        ort.preload_dlls()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.compare:
        artifact, _, foreign = args.compare.partition("=")
        for r in compare(Path(artifact), Path(foreign), args.prompt_len, args.reps, args.out, args.device):
            rows.append({"compare": r})
            print(f"eager prefill {r['label']}: " + (r["error"] if "error" in r else
                  f"{r['eager_ms']} ms, profiled run {r['profiled_run_ms']} ms, {r['nodes']} nodes, "
                  f"node host time {r['node_host_ms']} ms; " + ", ".join(f"{k} {v}" for k, v in list(r["by_op_us"].items())[:8])),
                  flush=True)
    for path in [p for p in args.artifacts.split(",") if p]:
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                r = measure(Path(path), batch, args.prompt_len, args.reps, args.device)
            except Exception as exc:  # noqa: BLE001 - reported, the next one runs
                r = {"artifact": path, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:500]}
            rows.append(r)
            (args.out / "gpu_ttft.json").write_text(json.dumps(rows, indent=2))
            if "error" in r:
                print(f"{path} b{batch}: ERROR {r['error']}", flush=True)
                continue
            p = r["profile"]
            print(f"{path} b{batch}: TTFT fused {[x['ttft_ms'] for x in r['fused']]} ms "
                  f"(eager run {[x['eager_run_ms'] for x in r['fused']]}), unfused {r['unfused'][0]['ttft_ms']} ms "
                  f"(eager runs {r['unfused'][0]['eager_run_ms']}); profiled: wall {p['wall_ms']} ms, "
                  f"GPU busy {p['gpu_busy_ms']} ms, {p['kernels']} kernels", flush=True)
            for k in p["top"][:8]:
                print(f"    {k['us']:9.1f} µs  {k['kernel'][:100]}")
    return 0



# ------------------------------------------------------------------------------------------------
# One eager prefill of a bare decoder graph: lmforge's artifact against another ONNX decoder


def _feeds_lmforge(path: Path, ids: np.ndarray) -> tuple[str, dict[str, Any]]:
    import onnxruntime as ort

    manifest = json.loads((path / "manifest.json").read_text())
    arch = manifest["architecture"]
    n, length = ids.shape
    kv = np.zeros((n, int(arch["kv_heads"]), length, int(arch["head_dim"])),
                  dtype=np.dtype(manifest.get("kv", {}).get("dtype", "float16")))
    feeds: dict[str, Any] = {"input_ids": ids, "position_ids": np.tile(np.arange(length, dtype=np.int64), (n, 1)),
                             "seqlens_k": np.full(n, length - 1, dtype=np.int32),
                             "total_sequence_length": ort.OrtValue.ortvalue_from_numpy(np.array(length, np.int32))}
    for t in manifest["io"]["inputs"]:
        if t["name"].startswith("past_key_values"):
            feeds[t["name"]] = kv
    return str(path / "model.onnx"), feeds


def _feeds_foreign(model: Path, ids: np.ndarray) -> tuple[str, dict[str, Any]]:
    """A decoder with ``input_ids``, ``attention_mask`` and empty ``past_key_values.*`` (the
    onnxruntime-genai builder's layout)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    config = model.with_name("genai_config.json")
    head = json.loads(config.read_text())["model"]["decoder"]["head_size"] if config.is_file() else None
    n, length = ids.shape
    feeds: dict[str, Any] = {}
    for inp in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
        if inp.name == "input_ids":
            feeds[inp.name] = ids if inp.type.tensor_type.elem_type == 7 else ids.astype(np.int32)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((n, length), dtype=np.int64 if inp.type.tensor_type.elem_type == 7 else np.int32)
        elif inp.name.startswith("past_key_values"):
            feeds[inp.name] = np.zeros((n, dims[1], 0, dims[3] or head), dtype=np.float16)
        else:
            raise ValueError(f"{model}: input {inp.name} is not one this comparison knows")
    return str(model), feeds


def eager_prefill(label: str, model: str, feeds: dict[str, Any], reps: int, profile_dir: Path,
                  device: str = "cuda") -> dict[str, Any]:
    """Median wall of ``run_with_iobinding`` on device-resident inputs, then an ORT profile of a
    few runs: host time per op type (a node's ``dur`` is its launch, the kernels run async)."""
    import onnxruntime as ort

    def bound(profile: bool) -> tuple[Any, Any]:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile_dir / f"ort-{label}")
        session = ort.InferenceSession(model, sess_options=options, providers=[_PROVIDER[device]])
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, device, 0)
            binding.bind_ortvalue_input(name, value)
        for out in session.get_outputs():
            binding.bind_output(out.name, device, 0)
        return session, binding

    session, binding = bound(profile=False)
    times = []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    prof, binding = bound(profile=True)
    for _ in range(5):
        prof.run_with_iobinding(binding)
    events = json.loads(Path(prof.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[2:]
    runs = [e["dur"] for e in model_runs]  # the first runs of a session allocate: skipped
    start = model_runs[0]["ts"] if model_runs else 0
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    per_run = max(1, len(runs))
    by_op: dict[str, float] = {}
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"] / per_run
    return {"label": label, "eager_ms": _ms(times), "nodes": len(nodes) // per_run,
            "profiled_run_ms": round(statistics.median(runs) / 1e3, 3) if runs else None,
            "node_host_ms": round(sum(by_op.values()) / 1e3, 3),
            "by_op_us": {k: round(v, 1) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}


_PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def compare(artifact: Path, foreign: Path, prompt_len: int, reps: int, out_dir: Path,
            device: str) -> list[dict[str, Any]]:
    ids = np.random.default_rng(2).integers(3, 300, (1, prompt_len)).astype(np.int64)  # in every vocabulary
    rows = []
    for label, (model, feeds) in (("lmforge", _feeds_lmforge(artifact, ids)), ("foreign", _feeds_foreign(foreign, ids))):
        try:
            rows.append(eager_prefill(label, model, feeds, reps, out_dir, device))
        except Exception as exc:  # noqa: BLE001 - reported
            rows.append({"label": label, "error": f"{type(exc).__name__}: {exc}"[:400]})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
