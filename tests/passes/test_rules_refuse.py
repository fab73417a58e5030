"""Patterns the fusion rules must refuse: a rule that fires where it should not changes the numbers.

Each case builds a graph that looks like the rule's pattern but breaks one of its checks, and
asserts that the rule does not fire and that onnxruntime (all its own optimizations off) computes
the same output before and after the rule set ran.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from passes.rule_gemm_matmul import gemm_matmul_rules
from tests.passes.test_rules import _apply, _model, _ops, _run


def _gemm_graph(attrs: dict[str, float | int], w_shape: tuple[int, int] = (16, 16)) -> onnx.ModelProto:
    """x[B,S,16] → Reshape [-1,16] → Gemm(W, b, **attrs) → Reshape [B,S,16], the rule's shape."""
    rng = np.random.default_rng(7)
    k, n = 16, 16
    weights = rng.standard_normal(w_shape).astype(np.float32).ravel()
    w = helper.make_tensor("w", TensorProto.FLOAT, list(w_shape), weights)
    b = helper.make_tensor("b", TensorProto.FLOAT, [n], rng.standard_normal(n).astype(np.float32))
    nodes = [
        helper.make_node("Constant", [], ["flat"], value=helper.make_tensor("flat", TensorProto.INT64, [2], [-1, k])),
        helper.make_node("Shape", ["x"], ["bs"], start=0, end=2),
        helper.make_node("Constant", [], ["nn"], value=helper.make_tensor("nn", TensorProto.INT64, [1], [n])),
        helper.make_node("Concat", ["bs", "nn"], ["out_shape"], axis=0),
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        helper.make_node("Gemm", ["x2", "w", "b"], ["g"], **attrs),
        helper.make_node("Reshape", ["g", "out_shape"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])], [w, b])


@pytest.mark.parametrize("attrs", [{"transB": 1}, {"transA": 1}, {"alpha": 0.5}, {"beta": 2.0}],
                         ids=["transB", "transA", "alpha", "beta"])
def test_gemm_rule_refuses(attrs: dict[str, float | int]) -> None:
    model = _gemm_graph(attrs)
    x = np.random.default_rng(3).standard_normal((2, 3, 16)).astype(np.float32)
    if attrs.get("transA"):
        x = np.random.default_rng(3).standard_normal((1, 16, 16)).astype(np.float32)  # [K, M] square
    (before,) = _run(model, {"x": x})
    fused, count = _apply(model, gemm_matmul_rules())
    assert count == 0
    assert _ops(fused)["Gemm"] == 1 and _ops(fused)["MatMul"] == 0
    (after,) = _run(fused, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_gemm_rule_still_fires_on_the_plain_form() -> None:
    """The control: the same graph without the offending attribute is rewritten, same numbers."""
    model = _gemm_graph({})
    x = np.random.default_rng(3).standard_normal((2, 3, 16)).astype(np.float32)
    (before,) = _run(model, {"x": x})
    fused, count = _apply(model, gemm_matmul_rules())
    assert count == 1 and _ops(fused)["Gemm"] == 0
    (after,) = _run(fused, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
