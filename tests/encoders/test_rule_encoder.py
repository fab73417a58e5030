"""passes.rule_encoder on small graphs: op counts and onnxruntime's numbers (its optimizations off)
before and after each rewrite, and the cases the rules must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from passes.rule_encoder import skip_layer_norm_no_bias_rules, two_bias_softmax_rules

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _apply(model: onnx.ModelProto, rules) -> tuple[onnx.ModelProto, int]:  # type: ignore[no-untyped-def]
    graph = ir.from_proto(model)
    common_passes.ShapeInferencePass()(graph)  # as the pipeline's cleanup does before the fusions
    count = rules.apply_to_model(graph)
    proto = ir.to_proto(graph)
    proto.ir_version = 10  # onnxruntime 1.31 reads up to 13
    return proto, count


def _attention_graph(first: str = "MatMul") -> onnx.ModelProto:
    b, h, s, d = 2, 4, 5, 8
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, h, s, d])
    kt = helper.make_tensor_value_info("kt", TensorProto.FLOAT, [b, h, d, s])
    bias = helper.make_tensor_value_info("bias", TensorProto.FLOAT, [b, h, s, s])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [b, 1, 1, s])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, [b, h, s, s])
    scale = numpy_helper.from_array(np.array(np.sqrt(d), dtype=np.float32), "scale")
    if first == "MatMul":
        nodes = [helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Div", ["qk", "scale"], ["scores"])]
    else:  # a bias first: not q·kᵀ, left alone
        nodes = [helper.make_node("Identity", ["q"], ["scores"])]
    nodes += [helper.make_node("Add", ["scores", "bias"], ["with_bias"]),
              helper.make_node("Add", ["with_bias", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1)]
    inputs = [q, kt, bias, mask] if first == "MatMul" else [helper.make_tensor_value_info(
        "q", TensorProto.FLOAT, [b, h, s, s]), bias, mask]
    graph = helper.make_graph(nodes, "two_bias", inputs, [out], [scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_two_bias_softmax_sums_the_biases_with_the_same_numbers() -> None:
    model = _attention_graph()
    mask = np.zeros((2, 1, 1, 5), dtype=np.float32)
    mask[1, ..., 3:] = np.finfo(np.float32).min  # padded keys
    feeds = {"q": RNG.standard_normal((2, 4, 5, 8), dtype=np.float32),
             "kt": RNG.standard_normal((2, 4, 8, 5), dtype=np.float32),
             "bias": RNG.standard_normal((2, 4, 5, 5), dtype=np.float32), "mask": mask}
    before = _run(model, feeds)[0]
    rewritten, count = _apply(model, two_bias_softmax_rules())
    assert count == 1
    adds = [n for n in rewritten.graph.node if n.op_type == "Add"]
    assert len(adds) == 2 and any(set(n.input) == {"bias", "mask"} for n in adds)
    after = _run(rewritten, feeds)[0]
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert np.all(after[1, ..., 3:] == 0)  # padded keys keep a zero weight


def test_two_bias_softmax_leaves_scores_that_are_not_a_product() -> None:
    _, count = _apply(_attention_graph(first="Identity"), two_bias_softmax_rules())
    assert count == 0


def _skip_ln_graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])
    skip = helper.make_tensor_value_info("skip", TensorProto.FLOAT, [2, 3, 16])
    gamma = numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32), "gamma")
    nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma"], ["y"], axis=-1, epsilon=1e-5),
             helper.make_node("Add", ["sum", "y"], ["next"])]  # the residual sum feeds the next block
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 16]) for n in ("y", "next")]
    graph = helper.make_graph(nodes, "skip_ln", [x, skip], outs, [gamma])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def test_bias_free_skip_layer_norm_fuses_with_the_same_numbers() -> None:
    model = _skip_ln_graph()
    feeds = {"x": RNG.standard_normal((2, 3, 16), dtype=np.float32),
             "skip": RNG.standard_normal((2, 3, 16), dtype=np.float32)}
    before = _run(model, feeds)
    rewritten, count = _apply(model, skip_layer_norm_no_bias_rules())
    assert count == 1
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("SkipLayerNormalization") == 1 and "LayerNormalization" not in ops and ops.count("Add") == 1
    skip_ln = next(n for n in rewritten.graph.node if n.op_type == "SkipLayerNormalization")
    assert len(skip_ln.input) == 3  # no beta, no bias
    after = _run(rewritten, feeds)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_layer_norm_with_a_bias_is_left_to_onnxscript() -> None:
    model = _skip_ln_graph()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(16, dtype=np.float32), "beta"))
    model.graph.node[1].input.append("beta")
    _, count = _apply(model, skip_layer_norm_no_bias_rules())
    assert count == 0
