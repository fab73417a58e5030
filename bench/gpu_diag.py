"""One-off diagnosis of GroupQueryAttention's rotary cache check on CUDA (kept for the record)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_optimize import feeds_for  # noqa: E402

art = Path(sys.argv[1])
m = onnx.load(str(art / "model.onnx"), load_external_data=False)
inits = {i.name: list(i.dims) for i in m.graph.initializer}
g = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"][0]
print("GQA inputs", [(x, inits.get(x)) for x in g.input], [(a.name, onnx.helper.get_attribute_value(a)) for a in g.attribute])
manifest = json.loads((art / "manifest.json").read_text())
ort.preload_dlls()
so = ort.SessionOptions()
so.log_severity_level = 3
for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so.graph_optimization_level = level
    s = ort.InferenceSession(str(art / "model.onnx"), so, providers=["CUDAExecutionProvider"])
    for label, args in (("prefill", (1, 8, 0, 64)), ("decode", (1, 1, 8, 64))):
        feeds = feeds_for(manifest, *args)
        try:
            s.run(None, feeds)
            print(level, label, "ok", {k: v.shape for k, v in feeds.items() if "past" not in k}, feeds.get("total_sequence_length"))
        except Exception as exc:  # noqa: BLE001
            print(level, label, "FAIL", str(exc)[-160:], {k: v.shape for k, v in feeds.items() if "past" not in k}, feeds.get("total_sequence_length"))

prod = {o: n for n in m.graph.node for o in n.output}


def walk(name: str, depth: int = 0) -> None:
    node = prod.get(name)
    if node is None or depth > 8:
        print("  " * depth, name, "init" if name in inits else "input", inits.get(name))
        return
    print("  " * depth, name, "<-", node.op_type, [(a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute][:4])
    for inp in node.input:
        if inp:
            walk(inp, depth + 1)


walk(g.input[7])
