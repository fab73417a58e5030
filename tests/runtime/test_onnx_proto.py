"""The runtime's own ModelProto encoder against the reference ``onnx`` package."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort
import pytest

from runtime._onnx_proto import GraphBuilder
from runtime.kv_concat import build_regroup_model
from runtime.sampler_graph import _draw, build_sampler_model


@pytest.mark.parametrize("logits_dtype", ["float32", "float16"])
def test_sampler_graph_passes_onnx_checker(logits_dtype: str) -> None:
    model = onnx.load_from_string(build_sampler_model(logits_dtype, 1000))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert [i.name for i in model.graph.input][:2] == ["logits", "attention_mask"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.helper.np_dtype_to_tensor_dtype(
        np.dtype(logits_dtype)
    )
    step = next(i for i in model.graph.input if i.name == "step")
    assert len(step.type.tensor_type.shape.dim) == 1  # one count per row
    assert "CumSum" in {n.op_type for n in model.graph.node}


def test_two_level_draw_equals_numpy_inverse_cdf() -> None:
    """The draw (a block by the block totals, then a token inside it) picks numpy's inverse-CDF
    index — the first ``i`` with ``cumsum(w)[i] > u · sum(w)`` — including zero-mass tokens, mass
    in the padded last block only, one token with all the mass, and ``u`` near 0 and 1."""
    for length in (7, 256, 1000, 1024, 49152):
        g = GraphBuilder("draw")
        g.input("w", "float32", ["b", length])
        g.input("u", "float32", ["b", 1])
        g.op("Identity", [_draw(g, "w", "u", length)], outputs=["i"])
        g.output("i", "int64", ["b", 1])
        sess = ort.InferenceSession(g.to_bytes(), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(length)
        w = rng.random((10, length), dtype=np.float32) ** 4  # many tiny masses
        w[1, rng.random(length) < 0.7] = 0.0  # most tokens masked out
        w[1, 0] = 0.5  # (the sampler always keeps the best token)
        w[2] = 0.0
        w[2, length - 1] = 3.0  # the mass at the very end (inside the padded block)
        w[3] = 0.0
        w[3, length // 2] = 1.0  # one token
        w[8] = w[2]  # mass at the end only, drawn with u = 0: the first token with mass
        w[9, : length // 2] = 0.0  # a leading run without mass (whole blocks of it), u = 0
        u = np.array([0.0, 0.5, 0.3, 0.999999, 1e-7, 0.25, 0.75, 0.9999, 0.0, 0.0], np.float32)[:, None]
        (got,) = sess.run(None, {"w": w, "u": u})
        cdf = np.cumsum(w.astype(np.float64), axis=1)
        want = [min(int(np.searchsorted(c, uu * c[-1], side="right")), int(np.flatnonzero(r)[-1]))
                for c, uu, r in zip(cdf, u[:, 0], w)]
        assert got[:, 0].tolist() == want, length
        assert all(w[r, got[r, 0]] > 0 for r in range(10))  # never a token without mass


def test_regroup_graph_keeps_merges_trims_and_pads() -> None:
    data = build_regroup_model([("past", "float16", 4, 2), ("mask", "int64", 2, 1), ("seen", "bool", 2, None)])
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    past_a = np.arange(3 * 2 * 5 * 4, dtype=np.float16).reshape(3, 2, 5, 4)
    past_b = np.ones((1, 2, 2, 4), np.float16)
    mask_a, mask_b = np.ones((3, 6), np.int64), np.ones((1, 3), np.int64)
    seen_a, seen_b = np.eye(3, 6, dtype=bool), np.ones((1, 6), bool)
    pads = {"pads_a4_2": np.array([0, 0, 0, 0, 0, 0, 0, 0]), "pads_b4_2": np.array([0, 0, 2, 0, 0, 0, 0, 0]),
            "pads_a2_1": np.array([0, 0, 0, 0]), "pads_b2_1": np.array([0, 2, 0, 0])}
    out = sess.run(None, {"keep": np.array([2, 0]), "trim": np.array([1]), **pads, "a.past": past_a,
                          "b.past": past_b, "a.mask": mask_a, "b.mask": mask_b, "a.seen": seen_a, "b.seen": seen_b})
    np.testing.assert_array_equal(out[0][:2], past_a[[2, 0], :, 1:])
    np.testing.assert_array_equal(out[0][2], np.concatenate([np.zeros((2, 2, 4), np.float16), past_b[0]], axis=1))
    assert out[1].tolist() == [[1] * 5, [1] * 5, [0, 0, 1, 1, 1]]
    np.testing.assert_array_equal(out[2], np.concatenate([seen_a[[2, 0]], seen_b]))


def test_every_attribute_kind_and_negative_ints_round_trip() -> None:
    g = GraphBuilder("attrs")
    x = g.input("x", "float32", ["n", 3])
    table = np.array([[1.5, -2.0], [3.25, 0.0]], dtype=np.float32)
    c = g.op("Constant", [], {"value": table})
    g.op("LeakyRelu", [x], {"alpha": 0.25}, outputs=["y"])
    g.op("Transpose", [c], {"perm": [1, 0]}, outputs=["t"])
    g.op("ArgMax", [x], {"axis": -1, "keepdims": 1}, outputs=["a"])
    g.op("Gather", [x, g.const(-1, "int64")], {"axis": 1}, outputs=["last"])
    g.output("y", "float32", ["n", 3])
    g.output("t", "float32", [2, 2])
    g.output("a", "int64", ["n", 1])
    g.output("last", "float32", ["n"])
    data = g.to_bytes()
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    attrs = {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in model.graph.node}
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(attrs["Constant"]["value"]), table)
    assert attrs["LeakyRelu"]["alpha"] == pytest.approx(0.25)
    assert list(attrs["Transpose"]["perm"]) == [1, 0]
    assert attrs["ArgMax"]["axis"] == -1
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).tolist() == -1
    xv = np.array([[1.0, -4.0, 2.0], [-1.0, 5.0, 0.5]], dtype=np.float32)
    y, t, a, last = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": xv})
    np.testing.assert_allclose(y, np.where(xv > 0, xv, 0.25 * xv))
    np.testing.assert_array_equal(t, table.T)
    assert a.ravel().tolist() == [2, 1]
    np.testing.assert_array_equal(last, xv[:, -1])
