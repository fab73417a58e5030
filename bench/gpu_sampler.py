"""The sampling nodes alone on the lent GPU, per sampling plan, for variants of the top-k / top-p
candidates' selection (one ``TopK`` over the row, or two stages over parts of it: how many parts,
and whether the first stage sorts): the standalone sampler graph
(:func:`runtime.sampler_graph.build_sampler_model`, the nodes the step model appends to the
decoder) captured in a CUDA graph and replayed over fp16 logits of the SmolLM2 vocabulary (and
Llama 3's), µs a replay (launched back to back, one sync at the end; every variant pays the same
replay overhead). Every variant is checked to draw the same ids as one selection.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 bench/gpu_sampler.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# label: (candidates, sampled rows, penalized rows), the rows' parameters
PLANS = {"greedy": ((1, 0, 0), {"temperature": 0.0}), "temperature": ((1, "all", 0), {"temperature": 0.7}),
         "top-k 50 (64)": ((64, "all", 0), {"temperature": 1.0, "top_k": 50, "top_p": 0.9}),
         "top-p (256)": ((256, "all", 0), {"temperature": 0.7, "top_p": 0.9}),
         "top-p (1024)": ((1024, "all", 0), {"temperature": 0.7, "top_p": 0.9})}


def time_variant(vocab: int, rows: int, segments: int, parts_sorted: int, replays: int,
                 device: str = "cuda") -> dict[str, Any]:
    import onnxruntime as ort

    from runtime import SamplingParams, sampler_graph
    from runtime.sampler_graph import ALL_ROWS, HOST_INPUTS, build_sampler_model
    from runtime.sampling import row_arrays, stack_rows

    sampler_graph._PARTS_SORTED = parts_sorted
    model = build_sampler_model("float16", vocab, segments=segments)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})
    providers = [cuda] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(model, options, providers=providers)
    logits = (np.random.default_rng(rows).standard_normal((rows, 1, vocab)) * 3).astype(np.float16)
    outs = {o.name: o for o in sess.get_outputs()}
    out: dict[str, Any] = {"vocab": vocab, "rows": rows, "segments": segments, "parts_sorted": parts_sorted}
    for i, (label, (plan, kw)) in enumerate(PLANS.items()):
        feeds = stack_rows([row_arrays(SamplingParams(seed=r, **kw), [], [], vocab, 64) for r in range(rows)])
        feeds["step"] = np.zeros(rows, np.int64)
        feeds["logits"] = logits
        feeds["attention_mask"] = np.ones((rows, 1), np.int64)
        dev = {k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in feeds.items()}
        binding = sess.io_binding()
        for k, v in dev.items():
            binding.bind_ortvalue_input(k, v)
        host = [plan[0], ALL_ROWS if plan[1] == "all" else 0, plan[2]]
        keep = [ort.OrtValue.ortvalue_from_numpy(np.array([v], np.int64)) for v in host]
        for name, value in zip(HOST_INPUTS, keep):
            binding.bind_ortvalue_input(name, value)
        shapes = {"next_ids": [rows, 1], "next_attention_mask": [rows, 2], "next_position_ids": [rows, 1],
                  "seen_out": [rows, vocab], "counts_out": [rows, vocab], "step_out": [rows]}
        dtypes = {"seen_out": np.bool_, "counts_out": np.float32}
        bound = {n: ort.OrtValue.ortvalue_from_shape_and_type(shapes[n], dtypes.get(n, np.int64), device, 0)
                 for n in outs}
        for n, v in bound.items():
            binding.bind_ortvalue_output(n, v)
        run = ort.RunOptions()
        run.add_run_config_entry("gpu_graph_id", str(i + 1))
        for _ in range(5):
            sess.run_with_iobinding(binding, run)
        t0 = time.perf_counter()
        for _ in range(replays):
            sess.run_with_iobinding(binding, run)
        binding.synchronize_outputs()
        out[label] = round((time.perf_counter() - t0) / replays * 1e6, 1)
        out[label + " ids"] = bound["next_ids"].numpy().ravel().tolist()
        del keep
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="49152,128256")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--variants", default="1:0,8:0,8:1,12:0,12:1,16:0")
    parser.add_argument("--replays", type=int, default=400)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    import onnxruntime as ort

    if args.device == "cuda":
        ort.preload_dlls()
    results = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            base = None
            for variant in args.variants.split(","):
                segments, parts_sorted = (int(x) for x in variant.split(":"))
                if segments > 1 and vocab // segments < 4096:
                    continue
                try:
                    r = time_variant(vocab, rows, segments, parts_sorted, args.replays, args.device)
                    base = base or r
                    r["same_ids"] = all(r[k] == base[k] for k in r if k.endswith(" ids"))
                    results.append(r)
                    print(json.dumps({k: v for k, v in r.items() if not k.endswith(" ids")}), flush=True)
                except Exception as exc:  # noqa: BLE001 - reported, the next variant runs
                    print(json.dumps({"vocab": vocab, "rows": rows, "variant": variant,
                                      "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_sampler.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
