"""Which onnxruntime CUDA nodes become device-to-device copies inside a captured CUDA graph, and
what each costs a replay.

The sampled decode step showed ~12 "Memcpy DtoD" entries a step in its CUPTI profile (greedy:
none). This builds one tiny graph per candidate node kind (ten of them in a chain), captures it,
replays it ``--replays`` times, and reports the µs per replay and the CUDA activities (kernels
and copies) per replay; and one ``TopK`` of each candidate bound over a SmolLM2-sized
vocabulary, at 1 and 16 rows.

Found on an H100 (docs/benchmarks.md, fourth session): a ``Slice`` that spans its whole input is
a memcpy (``Concat``, ``Gather`` and ``Unsqueeze`` are kernels or aliases), but taking the step's
copies out changed its replay time by 1–2 %; ``TopK`` runs a fast kernel up to K = 256 and a
radix select from 512 (0.25–0.34 ms), which is what top-p's sort costs.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 bench/gpu_copies.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

V = 49152
CHAIN = 10


def graph(case: str) -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(model bytes, device inputs, host inputs) for one case: ``CHAIN`` nodes of that kind."""
    from runtime._onnx_proto import GraphBuilder

    g = GraphBuilder(case)
    axis0 = g.const(np.array([0], np.int64))
    start = g.const(np.array([0], np.int64))
    big = np.random.default_rng(0).standard_normal((1, V)).astype(np.float32)
    small = np.array([[3]], np.int64)
    host = {"rows": np.array([np.iinfo(np.int64).max if "full" in case else 0], np.int64)}
    g.input("rows", "int64", [1])
    if case.endswith("big"):
        x = g.input("x", "float32", [1, V])
        feeds = {"x": big}
    else:
        x = g.input("x", "int64", [1, 1])
        feeds = {"x": small}
    y = x
    if case.startswith("topk"):  # one TopK of K over [rows, V] (the top-k / top-p candidates)
        _, k, rows = case.split("-")
        feeds = {"x": np.random.default_rng(0).standard_normal((int(rows), V)).astype(np.float32)}
        g = GraphBuilder(case)
        g.input("rows", "int64", [1])
        g.input("x", "float32", ["a", V])
        vals = g.op("TopK", ["x", g.const(np.array([int(k)], np.int64))], {"axis": 1, "largest": 1, "sorted": 1},
                    outputs=2)[0]
        g.op("Add", [vals, g.const(np.zeros(1, np.float32))], outputs=["y"])
        g.output("y", "float32", ["a", "b"])
        return g.to_bytes(), feeds, host
    for _ in range(CHAIN):
        if case.startswith("slice"):  # rows 0:rows of y (host input): all of it, or none
            s = g.op("Slice", [y, start, "rows", axis0])
            y = g.op("Add", [s, g.const(np.ones(1, feeds["x"].dtype))]) if "full" in case else y
        elif case.startswith("concat"):  # an empty piece and all of y
            empty = g.op("Slice", [y, start, g.const(np.array([0], np.int64)), axis0])
            y = g.op("Add", [g.op("Concat", [empty, y], {"axis": 0}), g.const(np.ones(1, feeds["x"].dtype))])
        elif case.startswith("unsqueeze"):  # Unsqueeze then Squeeze of a computed tensor
            u = g.op("Unsqueeze", [g.op("Add", [y, g.const(np.ones(1, feeds["x"].dtype))]), axis0])
            y = g.op("Squeeze", [u, axis0])
        elif case.startswith("add"):  # the control: one elementwise kernel a node
            y = g.op("Add", [y, g.const(np.ones(1, feeds["x"].dtype))])
        elif case.startswith("gather"):  # rows by index instead of a slice
            y = g.op("Add", [g.op("Gather", [y, g.const(np.array([0], np.int64))], {"axis": 0}),
                             g.const(np.ones(1, feeds["x"].dtype))])
    g.op("Add", [y, g.const(np.zeros(1, feeds["x"].dtype))], outputs=["y"])
    g.output("y", str(feeds["x"].dtype), ["a", "b"])
    return g.to_bytes(), feeds, host


def run(case: str, replays: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from torch.profiler import ProfilerActivity

    model, feeds, host = graph(case)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model, options, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    binding = sess.io_binding()
    dev = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
    hv = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in host.items()}
    for k, v in dev.items():
        binding.bind_ortvalue_input(k, v)
    for k, v in hv.items():
        binding.bind_ortvalue_input(k, v)
    out_shape = list(feeds["x"].shape)
    if case.startswith("topk"):
        out_shape = [feeds["x"].shape[0], int(case.split("-")[1])]
    out = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, feeds["x"].dtype, "cuda", 0)
    binding.bind_ortvalue_output("y", out)
    run_options = ort.RunOptions()
    for _ in range(5):
        sess.run_with_iobinding(binding, run_options)
    t0 = time.perf_counter()
    for _ in range(replays):
        sess.run_with_iobinding(binding, run_options)
    per = (time.perf_counter() - t0) / replays * 1e6
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            sess.run_with_iobinding(binding, run_options)
    acts = Counter(ev.name[:60] for ev in prof.events() if ev.device_type.name == "CUDA")
    return {"case": case, "us_per_replay": round(per, 1), "activities_per_replay": {k: v / 20 for k, v in acts.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    import onnxruntime as ort

    ort.preload_dlls()
    rows = []
    for case in ("add-small", "add-big", "slice-full-small", "slice-full-big", "concat-small", "concat-big",
                 "unsqueeze-small", "unsqueeze-big", "gather-small", "gather-big",
                 *(f"topk-{k}-{rows}" for rows in (1, 16) for k in (64, 256, 512, 1024))):
        try:
            r = run(case, args.replays)
        except Exception as exc:  # noqa: BLE001 - reported, the next case runs
            r = {"case": case, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(r)
        print(json.dumps(r), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_copies.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
