"""Optimize fp32 artifacts for CUDA and report fusion counts and node placement.

Run on the lent GPU after ``bench/gpu_suite.py convert`` (artifacts in ``--work``)::

    python3 bench/gpu_optimize.py --work /tmp/lmf --out $OUT [--models smollm2,llama1b]

For each model and precision (fp16, int8, int4) it writes ``WORK/<model>-<precision>`` with
``passes.pipeline.optimize_artifact(device="cuda")``, then opens the graph on the CUDA provider
with ORT's profiler on, runs one prefill and one decode step, and lists every node the profiler
saw run on a provider other than CUDA (the CPU fallbacks). Each variant fails soft.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def feeds_for(manifest: dict[str, Any], batch: int, seq: int, past: int, max_context: int) -> dict[str, np.ndarray]:
    """Inputs for one step of either KV contract, with a prompt of ``seq`` after ``past`` tokens."""
    feeds: dict[str, np.ndarray] = {}
    total = past + seq
    for spec in manifest["io"]["inputs"]:
        name, dtype = spec["name"], _NP[spec["dtype"]]
        if name == "input_ids":
            feeds[name] = np.full((batch, seq), 5, dtype)
        elif name == "position_ids":
            feeds[name] = np.tile(np.arange(past, total, dtype=dtype), (batch, 1))
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, total), dtype)
        elif name == "seqlens_k":
            feeds[name] = np.full((batch,), total - 1, dtype)
        elif name == "total_sequence_length":
            feeds[name] = np.array(total if past == 0 else max_context, dtype)
        elif name.startswith("past_key_values."):
            dims = [
                batch
                if d == "batch"
                else d
                if isinstance(d, int)
                else (max_context if manifest["kv_mode"] == "shared-buffer" else past)
                for d in spec["shape"]
            ]
            feeds[name] = np.zeros(dims, dtype)
        else:
            raise KeyError(name)
    return feeds


def placement(art: Path) -> dict[str, Any]:
    import onnxruntime as ort

    manifest = json.loads((art / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(art / "placement")
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(art / "model.onnx"), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    session.run(None, feeds_for(manifest, 1, 8, 0, 64))
    if manifest["kv_mode"] == "concat":
        session.run(None, feeds_for(manifest, 1, 1, 8, 64))
    else:
        session.run(None, feeds_for(manifest, 1, 1, 8, 64))
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    providers: Counter[str] = Counter()
    off_cuda: Counter[str] = Counter()
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event["name"].endswith("_kernel_time"):
            providers[args["provider"]] += 1
            if args["provider"] != "CUDAExecutionProvider":
                off_cuda[f"{args.get('op_name')}:{event['name'].removesuffix('_kernel_time')}"] += 1
    profile.unlink()
    return {"kernel_runs_by_provider": dict(providers), "cpu_fallbacks": sorted(off_cuda)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmf"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--models", default="smollm2,llama1b")
    parser.add_argument("--precisions", default="fp16,int8,int4")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    from passes.pipeline import optimize_artifact

    results: list[dict[str, Any]] = []
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            out = args.work / f"{model}-{precision}"
            row: dict[str, Any] = {"model": model, "precision": precision}
            try:
                t0 = time.perf_counter()
                report = optimize_artifact(args.work / model, out, device="cuda", precision=precision, force=True,
                                           check=False, progress=False)
                row["optimize_s"] = round(time.perf_counter() - t0, 1)
                row["ops"] = report.ops
                row["missing"] = report.missing
                manifest = json.loads((out / "manifest.json").read_text())
                row["kv_mode"] = manifest["kv_mode"]
                row["quantization"] = manifest.get("quantization")
                row["placement"] = placement(out)
            except Exception as exc:  # noqa: BLE001 - report every variant, carry on
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                row["trace"] = traceback.format_exc()[-3000:]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}, default=str)[:1500], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_optimize.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
