"""Projections that share an input fused into one MatMul + Split (:mod:`passes.fuse_projections`):
op counts, the same numbers in fp32 (ORT with its own optimizations off), and the same numbers
after the 8-bit MatMulNBits quantizer (each output column is quantized on its own)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.fuse_projections import fuse_shared_input_matmuls

K = 64
WIDTHS = {"q": 64, "k": 32, "v": 32}


def _model() -> onnx.ModelProto:
    """x → q, k, v (share x); x → Relu → o (alone); q·k·v summed so every output is used."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", f"w_{n}"], [n], name=f"proj_{n}") for n in WIDTHS]
    nodes += [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w_o"], ["o"], name="proj_o"),
              helper.make_node("MatMul", ["x", "rot"], ["small"], name="rotary")]
    inits = [numpy_helper.from_array(rng.standard_normal((K, n)).astype(np.float32) / 8, f"w_{name}")
             for name, n in WIDTHS.items()]
    inits += [numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32) / 8, "w_o"),
              numpy_helper.from_array(rng.standard_normal((K, 4)).astype(np.float32), "rot")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", w]) for n, w in WIDTHS.items()]
    outputs += [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["b", "s", K]),
                helper.make_tensor_value_info("small", TensorProto.FLOAT, ["b", "s", 4])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_siblings_become_one_matmul_and_a_split() -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    model = _model()
    want = _run(model, x)
    # "rotary" reads x too but is excluded (as the pipeline excludes the lm head and arithmetic)
    assert fuse_shared_input_matmuls(model, exclude={"rotary"}) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 3 and ops.count("Split") == 1  # fused q|k|v, o, rotary
    fused = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] == "x" and n.name != "rotary")
    assert next(t for t in model.graph.initializer if t.name == fused.input[1]).dims == [K, sum(WIDTHS.values())]
    assert not {"w_q", "w_k", "w_v"} & {t.name for t in model.graph.initializer}  # the old weights are gone
    onnx.checker.check_model(model)
    for got, ref in zip(_run(model, x), want):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)  # fp32 summation order only


def test_nothing_to_fuse_leaves_the_graph() -> None:
    model = _model()
    before = model.SerializeToString()
    assert fuse_shared_input_matmuls(model, exclude={"proj_q", "proj_k", "rotary"}) == 0  # v alone now
    assert model.SerializeToString() == before


def test_quantized_fused_equals_quantized_separate() -> None:
    """MatMulNBits quantizes per output column (blocks along K), so the fused weight quantizes to
    the separate ones' columns, and the int8-activation kernel gives the same outputs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    x = np.random.default_rng(2).standard_normal((1, 5, K)).astype(np.float32)

    def quantized(fuse: bool) -> list[np.ndarray]:
        model = _model()
        if fuse:
            assert fuse_shared_input_matmuls(model, exclude={"rotary"}) == 1
        quant = MatMulNBitsQuantizer(model, bits=8, block_size=16, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=["rotary"], op_types_to_quantize=("MatMul",))
        quant.process()
        out = quant.model.model
        assert sum(n.op_type == "MatMulNBits" for n in out.graph.node) == (2 if fuse else 4)
        return _run(out, x)

    for got, ref in zip(quantized(True), quantized(False)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def _mlp(inner: int = 8, extra_reader: bool = False, sizes: tuple[int, int] | None = None) -> onnx.ModelProto:
    """x → MatMul(gate), MatMul(up) → silu(gate) · up, as an exported SwiGLU MLP reads."""
    rng = np.random.default_rng(3)
    first, second = sizes or (inner, inner)
    nodes = [helper.make_node("MatMul", ["x", "w_gate"], ["gate"], name="gate_proj"),
             helper.make_node("MatMul", ["x", "w_up"], ["up"], name="up_proj"),
             helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
             helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
             helper.make_node("Mul", ["silu", "up"], ["y"], name="gated")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", first])]
    if extra_reader:  # the gate's silu is read elsewhere too: not a plain SwiGLU gate
        nodes.append(helper.make_node("Relu", ["silu"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["b", "s", first]))
    inits = [numpy_helper.from_array(rng.standard_normal((K, first)).astype(np.float32), "w_gate"),
             numpy_helper.from_array(rng.standard_normal((K, second)).astype(np.float32), "w_up")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_a_swiglu_gate_over_fused_gate_up_is_named_for_the_runtime() -> None:
    from passes.fuse_projections import name_silu_gates
    from runtime.kernels.graph import SILU_GATE_PREFIX

    x = np.random.default_rng(4).standard_normal((2, 3, K)).astype(np.float32)
    model = _mlp()
    want = _run(model, x)
    assert name_silu_gates(model) == 0  # nothing fused yet: no Split to read
    assert fuse_shared_input_matmuls(model) == 1
    assert name_silu_gates(model) == 1
    named = {n.name: n.op_type for n in model.graph.node if n.name.startswith(SILU_GATE_PREFIX)}
    assert named == {f"{SILU_GATE_PREFIX}0.split": "Split", f"{SILU_GATE_PREFIX}0.sigmoid": "Sigmoid",
                     f"{SILU_GATE_PREFIX}0.silu": "Mul", f"{SILU_GATE_PREFIX}0.gate": "Mul"}
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, x)[0], want[0], rtol=1e-5, atol=1e-5)  # names only: same numbers


@pytest.mark.parametrize("case", ["extra reader", "unequal halves"])
def test_what_is_not_a_plain_swiglu_gate_keeps_its_names(case: str) -> None:
    from passes.fuse_projections import name_silu_gates

    model = _mlp(extra_reader=True) if case == "extra reader" else _mlp(sizes=(8, 16))
    if case == "unequal halves":  # a gate of 8 columns cannot multiply an up of 16: fix the product's shape
        model.graph.node[-1].input[1] = "silu"
    assert fuse_shared_input_matmuls(model) == 1
    assert name_silu_gates(model) == 0
