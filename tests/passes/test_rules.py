"""Per-rule tests: a small graph built here, run in ORT with its own optimizations off, before and after."""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from passes.rule_fast_gelu import fast_gelu_rules
from passes.rule_gemm_matmul import gemm_matmul_rules


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:  # type: ignore[assignment]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))


def _apply(model: onnx.ModelProto, rules) -> tuple[onnx.ModelProto, int]:  # type: ignore[no-untyped-def]
    ir_model = ir.serde.deserialize_model(model)
    count = rules.apply_to_model(ir_model)
    return ir.serde.serialize_model(ir_model), count


def _gelu_exported() -> onnx.ModelProto:
    """0.5·x · (1 + tanh(√(2/π)·(x + 0.044715·x³))), as torch.onnx.export writes gelu_new."""
    nodes = [
        _const("half", 0.5), _const("three", 3.0), _const("c", 0.044715), _const("k", math.sqrt(2 / math.pi)),
        _const("one", 1.0),
        helper.make_node("Mul", ["x", "half"], ["hx"]),
        helper.make_node("Pow", ["x", "three"], ["x3"]),
        helper.make_node("Mul", ["x3", "c"], ["cx3"]),
        helper.make_node("Add", ["x", "cx3"], ["inner"]),
        helper.make_node("Mul", ["inner", "k"], ["arg"]),
        helper.make_node("Tanh", ["arg"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", ["hx", "t1"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 32])])


def _gelu_bloom() -> onnx.ModelProto:
    """x·0.5 · (1 + tanh(0.79788456·x · (1 + 0.044715·x·x))), as BLOOM writes it."""
    nodes = [
        _const("half", 0.5), _const("c", 0.044715), _const("k", 0.79788456), _const("one", 1.0),
        helper.make_node("Mul", ["x", "half"], ["hx"]),
        helper.make_node("Mul", ["x", "k"], ["kx"]),
        helper.make_node("Mul", ["x", "c"], ["cx"]),
        helper.make_node("Mul", ["cx", "x"], ["cxx"]),
        helper.make_node("Add", ["cxx", "one"], ["inner"]),
        helper.make_node("Mul", ["kx", "inner"], ["arg"]),
        helper.make_node("Tanh", ["arg"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", ["hx", "t1"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 32])])


@pytest.mark.parametrize("build", [_gelu_exported, _gelu_bloom], ids=["gelu_new", "bloom"])
def test_fast_gelu_rule(build) -> None:  # type: ignore[no-untyped-def]
    model = build()
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32) * 3
    (before,) = _run(model, {"x": x})
    fused, count = _apply(model, fast_gelu_rules())
    assert count == 1
    assert _ops(fused)["FastGelu"] == 1 and _ops(fused)["Tanh"] == 0
    (after,) = _run(fused, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_fast_gelu_rule_leaves_other_tanh_alone() -> None:
    nodes = [_const("k", 0.5), helper.make_node("Mul", ["x", "k"], ["a"]), helper.make_node("Tanh", ["a"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    _, count = _apply(model, fast_gelu_rules())
    assert count == 0


def _gemm_graph(with_bias: bool, heads: bool) -> onnx.ModelProto:
    """x[B,S,K] (or [B,S,H,Dh]) → Reshape [-1,K] → Gemm(W[K,N], b) → Reshape [B,S,N], shapes from Shape."""
    rng = np.random.default_rng(1)
    k, n = 16, 24
    w = helper.make_tensor("w", TensorProto.FLOAT, [k, n], rng.standard_normal((k, n)).astype(np.float32).ravel())
    b = helper.make_tensor("b", TensorProto.FLOAT, [n], rng.standard_normal(n).astype(np.float32))
    x_shape = ["B", "S", 4, 4] if heads else ["B", "S", k]
    nodes = [
        helper.make_node("Constant", [], ["flat"], value=helper.make_tensor("flat", TensorProto.INT64, [2], [-1, k])),
        helper.make_node("Shape", ["x"], ["bs"], start=0, end=2),
        helper.make_node("Constant", [], ["nn"], value=helper.make_tensor("nn", TensorProto.INT64, [1], [n])),
        helper.make_node("Concat", ["bs", "nn"], ["out_shape"], axis=0),
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        helper.make_node("Gemm", ["x2", "w", "b"] if with_bias else ["x2", "w"], ["g"]),
        helper.make_node("Reshape", ["g", "out_shape"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])], [w, b])


@pytest.mark.parametrize("with_bias,heads", [(True, False), (False, False), (False, True)])
def test_gemm_to_matmul_rule(with_bias: bool, heads: bool) -> None:
    model = _gemm_graph(with_bias, heads)
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4) if heads else (2, 3, 16)).astype(np.float32)
    (before,) = _run(model, {"x": x})
    fused, count = _apply(model, gemm_matmul_rules())
    assert count == 1
    ops = _ops(fused)
    assert ops["Gemm"] == 0 and ops["MatMul"] == 1 and ops["Add"] == int(with_bias)
    (after,) = _run(fused, {"x": x})
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
