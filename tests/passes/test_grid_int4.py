"""int4 on the source's own grid (:mod:`passes.grid_int4`): a weight that is already 4-bit (Q4_1:
``m + q·d`` per block of 32) becomes a ``MatMulNBits`` that reproduces it exactly; any other
weight is left alone. Run in ORT with its own graph optimizations off."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from passes.grid_int4 import grid_quantize, on_grid

K, N, BLOCK = 128, 48, 32


def _q4_1(rng: np.random.Generator) -> np.ndarray:
    """A [K, N] weight whose rows (along K, per column) are Q4_1 blocks, as a GGUF dequantizes them."""
    d = rng.uniform(0.001, 0.01, (N, K // BLOCK)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.06, 0.0, (N, K // BLOCK)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (N, K // BLOCK, BLOCK)).astype(np.float32)
    q[:, :, 0], q[:, :, 1] = 0, 15  # Q4_1 maps each block's min to 0 and its max to 15
    return (q * d[..., None] + m[..., None]).reshape(N, K).T.copy()


def _model(weight: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


def test_grid_weight_becomes_exact_matmulnbits() -> None:
    rng = np.random.default_rng(0)
    weight = _q4_1(rng)
    x = rng.standard_normal((3, K)).astype(np.float32)
    model = _model(weight)
    want = _run(model, x)
    assert grid_quantize(model, {"w": weight}, exclude=set()) == ["proj"]
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    assert {t.name for t in model.graph.initializer} == {"w__grid4_B", "w__grid4_scales", "w__grid4_zero_points"}
    np.testing.assert_allclose(_run(model, x), want, rtol=0, atol=2e-5)  # fp32 rounding only


def test_other_weights_are_left_alone() -> None:
    rng = np.random.default_rng(1)
    plain = rng.standard_normal((K, N)).astype(np.float32)
    assert on_grid(plain, BLOCK) is None
    model = _model(plain)
    assert grid_quantize(model, {"w": plain}, exclude=set()) == []
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    grid = _q4_1(rng)
    model = _model(grid)
    assert grid_quantize(model, {"w": grid}, exclude={"proj"}) == []  # excluded (e.g. the lm head)
    assert on_grid(grid[:100], BLOCK) is None  # K not a multiple of the block


def test_cpu_grid_is_exact_without_zero_points() -> None:
    """The CPU form: a symmetric MatMulNBits (no zero-point input: the kernel's fast path) plus the
    input's block sums times per-block offsets reproduces the grid weight exactly (weight-only
    kernel), and within int8-activation rounding at accuracy level 4."""
    from passes.grid_int4 import grid_quantize_cpu

    rng = np.random.default_rng(2)
    weight = _q4_1(rng)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)

    def model() -> onnx.ModelProto:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])],
                                  [numpy_helper.from_array(weight, "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)

    want = _run(model(), x)
    exact = model()
    assert grid_quantize_cpu(exact, exclude=set(), accuracy_level=None) == ["proj"]
    nbits = next(n for n in exact.graph.node if n.op_type == "MatMulNBits")
    assert len(nbits.input) == 3  # B and scales only: no zero points
    assert sorted(n.op_type for n in exact.graph.node) == ["Add", "MatMul", "MatMul", "MatMulNBits"]
    assert "w" not in {t.name for t in exact.graph.initializer}
    np.testing.assert_allclose(_run(exact, x), want, rtol=0, atol=2e-5)  # fp32 rounding only
    fast = model()
    assert grid_quantize_cpu(fast, exclude=set(), accuracy_level=4) == ["proj"]
    got = _run(fast, x)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()  # int8 activations, per block of 32
    plain = _model(rng.standard_normal((K, N)).astype(np.float32))
    assert grid_quantize_cpu(plain, exclude=set()) == []  # not on a grid: left for the quantizer
    grid = model()
    assert grid_quantize_cpu(grid, exclude={"proj"}) == []
