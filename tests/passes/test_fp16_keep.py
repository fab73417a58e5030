"""The fp16 pass keeps norms and the position arithmetic in fp32, and says so in the manifest.

Tiny weights hide a norm run in fp16, so the manifest's record is asserted directly; and integers
above 2048 are not exact in fp16 (3001 rounds to 3000), so a position computed by ``Range`` or
``CumSum`` in fp16 would put rotary angles at the wrong position at long context.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from passes.pipeline import optimize_artifact
from passes.precision import quantize_file

POSITION_OPS = {"Range", "CumSum", "Cos", "Sin"}
NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "SkipLayerNormalization", "Softmax"}


def test_manifest_records_what_fp16_kept_in_fp32(artifact_cache: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "llama-fp16"
    optimize_artifact(artifact_cache("tiny:llama"), out, "cpu", "fp16", check=True, progress=False, force=True)
    quant = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["quantization"]
    assert set(quant["settings"]["op_block_list"]) >= POSITION_OPS | NORM_OPS
    # the fused tiny llama: its norms and the arange of its mask/position arithmetic stayed fp32
    assert quant["kept"] == ["Range", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    fp16_inits = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type not in quant["kept"]:
            continue
        for name in filter(None, node.input):  # nothing fp16 flows into a kept node without a Cast to fp32
            assert name not in fp16_inits, (node.name, name)
            src = producers.get(name)
            if src is not None and src.op_type == "Cast":
                assert helper.get_attribute_value(src.attribute[0]) != TensorProto.FLOAT16, (node.name, name)


def _positions_graph() -> onnx.ModelProto:
    """Positions as float arithmetic builds them, ``Range(0, n)`` and a mask's ``CumSum``, each
    turned into angles (inv_freq 1) by ``Cos`` / ``Sin``; fp32 inputs and outputs."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Range", ["zero", "limit", "one"], ["pos"]),
        helper.make_node("Cos", ["pos"], ["cos"]),
        helper.make_node("CumSum", ["mask", "axis"], ["csum"]),
        helper.make_node("Sin", ["csum"], ["sin"]),
    ]
    graph = helper.make_graph(
        nodes, "positions",
        [helper.make_tensor_value_info("limit", f, []), helper.make_tensor_value_info("mask", f, ["n"])],
        [helper.make_tensor_value_info("cos", f, ["n"]), helper.make_tensor_value_info("sin", f, ["n"])],
        [helper.make_tensor("zero", f, [], [0.0]), helper.make_tensor("one", f, [], [1.0]),
         helper.make_tensor("axis", TensorProto.INT64, [], [0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def test_positions_above_2048_stay_exact_through_fp16(tmp_path: Path) -> None:
    src, dst = tmp_path / "pos.onnx", tmp_path / "pos16.onnx"
    onnx.save(_positions_graph(), str(src))
    quant = quantize_file(src, dst, "fp16", "cpu")  # its record is checked after the numbers
    n = 3004
    feeds = {"limit": np.array(n, np.float32), "mask": np.ones(n, np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    cos, sin = ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"]).run(["cos", "sin"], feeds)
    tail = np.arange(3000, n, dtype=np.float64)
    np.testing.assert_allclose(cos[3000:], np.cos(tail), atol=1e-3)  # 3001 in fp16 is 3000: cos off by ~1
    np.testing.assert_allclose(sin[2999 : n - 1], np.sin(tail), atol=1e-3)  # the cumsum of ones is 1-based
    assert quant is not None and set(quant.kept) == {"Range", "CumSum", "Cos", "Sin"}
