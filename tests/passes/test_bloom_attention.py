"""BLOOM's ALiBi attention → ``com.microsoft.MultiHeadAttention`` (:mod:`passes.rule_bloom_attention`).

A one-layer graph built here (as the exporter writes ``BloomAttention``) and the exported
``tiny:bloom`` artifact, each run in ORT with its own optimizations off before and after the rule:
op counts and numbers for prefill, decode and chunked prefill on left-padded batches; patterns the
rule must refuse, with the reason it gives; and ``optimize`` + ``verify`` on ``tiny:bloom``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxscript.rewriter._basics import MatchingTracer

from passes.graph_passes import PassContext, cleanup_passes, fusion_passes
from passes.pipeline import optimize_artifact
from passes.rule_bloom_attention import bloom_attention_rules

HEADS, HEAD_DIM = 4, 8
NEG = float(np.finfo(np.float32).min)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)],
                                                                              values))


def _attention_graph(q_k_v: tuple[int, int, int] = (0, 1, 2), constant_scale: bool = True) -> onnx.ModelProto:
    """One BLOOM attention as ``torch.onnx.export`` writes it (see the rule's docstring), with the
    packed projection, past KV, ALiBi ``[B·H, 1, T]`` and the additive mask as graph inputs."""
    h, d = HEADS, HEAD_DIM
    index = [helper.make_tensor(f"i{k}", TensorProto.INT64, [], [k]) for k in range(3)]
    scale = [helper.make_tensor("alpha", TensorProto.FLOAT, [], [1 / np.sqrt(d)])] if constant_scale else []
    nodes = [
        _ints("h", [h]), _ints("d", [d]), _ints("hd", [h * d]),
        helper.make_node("Shape", ["qkv"], ["b"], start=0, end=1),
        helper.make_node("Shape", ["qkv"], ["s"], start=1, end=2),
        helper.make_node("Mul", ["b", "h"], ["bh"]),
    ]
    for name, k in zip("qkv", q_k_v):
        nodes += [helper.make_node("Gather", ["qkv", f"i{k}"], [f"{name}_bshd"], axis=3),
                  helper.make_node("Transpose", [f"{name}_bshd"], [f"{name}_bhsd"], perm=[0, 2, 1, 3])]
    nodes += [
        helper.make_node("Concat", ["past_key", "k_bhsd"], ["present_key"], axis=-2),
        helper.make_node("Concat", ["past_value", "v_bhsd"], ["present_value"], axis=-2),
        helper.make_node("Shape", ["present_key"], ["t"], start=2, end=3),
        helper.make_node("Concat", ["bh", "s", "d"], ["q3_shape"], axis=0),
        helper.make_node("Concat", ["bh", "t", "d"], ["kv3_shape"], axis=0),
        helper.make_node("Concat", ["b", "h", "s", "t"], ["scores4_shape"], axis=0),
        helper.make_node("Concat", ["bh", "s", "t"], ["probs3_shape"], axis=0),
        helper.make_node("Concat", ["b", "h", "s", "d"], ["ctx4_shape"], axis=0),
        helper.make_node("Concat", ["b", "s", "hd"], ["out_shape"], axis=0),
        helper.make_node("Reshape", ["q_bhsd", "q3_shape"], ["q3"], allowzero=1),
        helper.make_node("Reshape", ["present_key", "kv3_shape"], ["k3"], allowzero=1),
        helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["present_value", "kv3_shape"], ["v3"], allowzero=1),
        helper.make_node("MatMul", ["q3", "k3t"], ["qk"]),
        helper.make_node("Mul", ["qk", "alpha"], ["qk_scaled"]),
        helper.make_node("Add", ["qk_scaled", "alibi"], ["baddbmm"]),
        helper.make_node("Reshape", ["baddbmm", "scores4_shape"], ["scores4"], allowzero=1),
        helper.make_node("Add", ["scores4", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("Reshape", ["probs", "probs3_shape"], ["probs3"], allowzero=1),
        helper.make_node("MatMul", ["probs3", "v3"], ["ctx3"]),
        helper.make_node("Reshape", ["ctx3", "ctx4_shape"], ["ctx4"], allowzero=1),
        helper.make_node("Transpose", ["ctx4"], ["ctx_bshd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_bshd", "out_shape"], ["y"], allowzero=1),
    ]
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("qkv", f, ["B", "S", h, 3, d]),
              helper.make_tensor_value_info("past_key", f, ["B", h, "P", d]),
              helper.make_tensor_value_info("past_value", f, ["B", h, "P", d]),
              helper.make_tensor_value_info("alibi", f, ["BH", 1, "T"]),
              helper.make_tensor_value_info("mask", f, ["B", 1, "S", "T"])]
    if not constant_scale:
        inputs.append(helper.make_tensor_value_info("alpha", f, []))
    outputs = [helper.make_tensor_value_info("y", f, ["B", "S", h * d]),
               helper.make_tensor_value_info("present_key", f, ["B", h, "T", d]),
               helper.make_tensor_value_info("present_value", f, ["B", h, "T", d])]
    graph = helper.make_graph(nodes, "bloom_attention", inputs, outputs, index + scale)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _alibi_and_mask(attention_mask: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """BLOOM's ALiBi ``[B·H, 1, T]`` (slopes × positions counted from the first real token) and
    transformers' additive causal + padding mask ``[B, 1, S, T]``, for an int ``[B, T]`` mask."""
    batch, total = attention_mask.shape
    slopes = 2.0 ** (-8.0 * np.arange(1, HEADS + 1) / HEADS)
    positions = (np.cumsum(attention_mask, axis=-1) - 1) * attention_mask
    alibi = (slopes[None, :, None] * positions[:, None, :]).reshape(batch * HEADS, 1, total)
    past = total - seq
    causal = np.arange(total)[None, :] <= (past + np.arange(seq))[:, None]
    allowed = causal[None] & attention_mask[:, None, :].astype(bool)
    mask = np.where(allowed, 0.0, NEG)[:, None]
    return alibi.astype(np.float32), mask.astype(np.float32)


def _feeds(batch: int, seq: int, past: int, pad: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    attention_mask = np.ones((batch, past + seq), np.int64)
    attention_mask[0, :pad] = 0  # row 0 left-padded
    alibi, mask = _alibi_and_mask(attention_mask, seq)
    return {"qkv": rng.standard_normal((batch, seq, HEADS, 3, HEAD_DIM)).astype(np.float32),
            "past_key": rng.standard_normal((batch, HEADS, past, HEAD_DIM)).astype(np.float32),
            "past_value": rng.standard_normal((batch, HEADS, past, HEAD_DIM)).astype(np.float32),
            "alibi": alibi, "mask": mask}


def _apply(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    ir_model = ir.serde.deserialize_model(model)
    count = bloom_attention_rules().apply_to_model(ir_model)
    common_passes.RemoveUnusedNodesPass()(ir_model)  # the shape arithmetic only the old views used
    return ir.serde.serialize_model(ir_model), count


# batch, seq, past, left padding of row 0
CASES = {"prefill": (3, 6, 0, 4), "decode": (3, 1, 7, 5), "chunk": (2, 3, 4, 2), "one-row": (1, 5, 0, 0)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_on_one_attention(case: str) -> None:
    model = _attention_graph()
    fused, count = _apply(model)
    assert count == 1
    ops = _ops(fused)
    assert ops["MultiHeadAttention"] == 1
    assert ops["Softmax"] == 0 and ops["MatMul"] == 0 and ops["Concat"] == 0  # scores, softmax and the KV concat
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["num_heads"] == HEADS and attrs["scale"] == pytest.approx(1 / np.sqrt(HEAD_DIM))
    assert [o for o in mha.output] == ["y", "present_key", "present_value"]

    feeds = _feeds(*CASES[case])
    before, after = _run(model, feeds), _run(fused, feeds)
    for name, b, a in zip(("y", "present_key", "present_value"), before, after):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    # the numbers depend on ALiBi and on the mask: a wrong bias would not pass the comparison above
    for key, value in (("alibi", feeds["alibi"] * 2), ("mask", np.zeros_like(feeds["mask"]))):
        changed = _run(fused, {**feeds, key: value})[0]
        assert np.abs(changed - after[0]).max() > 1e-3, key


def _fail_reasons(model: onnx.ModelProto) -> list[str]:
    tracer = MatchingTracer()
    ir_model = ir.serde.deserialize_model(model)
    assert bloom_attention_rules().apply_to_model(ir_model, tracer=tracer) == 0
    return [m.match_result.reason for matches in tracer.best_matches_map.values() for m in matches]


@pytest.mark.parametrize("build,reason", [
    # query and key slices swapped: same node shapes, different attention; fusing it would be wrong
    (lambda: _attention_graph(q_k_v=(1, 0, 2)), "the query/key/value slices are not Gather(0) on axis 3"),
    # a runtime scale cannot become MultiHeadAttention's `scale` attribute
    (lambda: _attention_graph(constant_scale=False), "the score scale (baddbmm's alpha) is not a constant scalar"),
], ids=["swapped-q-k", "runtime-scale"])
def test_rule_refuses(build: Callable[[], onnx.ModelProto], reason: str) -> None:
    model = build()
    reasons = _fail_reasons(model)
    assert any(r.startswith(reason) for r in reasons), reasons
    fused, count = _apply(model)
    assert count == 0 and _ops(fused)["MultiHeadAttention"] == 0


# --------------------------------------------------------------------------------------------
# The exported tiny:bloom


@pytest.fixture(scope="module")
def tiny_bloom(artifact_cache: Callable[[str], Path]) -> Path:
    return artifact_cache("tiny:bloom")


def _passes_up_to_bloom(path: Path, with_rule: bool) -> onnx.ModelProto:
    """The pipeline's cleanup and fusion passes up to the BLOOM rule (included or not)."""
    model = ir.external_data.load_to_model(ir.load(str(path / "model.onnx")))
    ctx = PassContext(max_positions=2048, debug=False)
    for graph_pass in cleanup_passes() + fusion_passes():
        if graph_pass.name == "bloom-attention" and not with_rule:
            break
        graph_pass.run(model, ctx)
        if graph_pass.name == "bloom-attention":
            break
    return ir.serde.serialize_model(model)


def _decoder_feeds(batch: int, seq: int, past: int, pad: int, layers: int, heads: int, head_dim: int,
                   seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    attention_mask = np.ones((batch, past + seq), np.int64)
    attention_mask[0, :pad] = 0
    feeds = {"input_ids": rng.integers(3, 320, (batch, seq)), "attention_mask": attention_mask}
    for i in range(layers):
        for kv in ("key", "value"):
            shape = (batch, heads, past, head_dim)
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal(shape).astype(np.float32)
    return feeds, attention_mask[:, past:].astype(bool)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_bloom_every_layer(tiny_bloom: Path, case: str) -> None:
    from runtime.artifact import load_artifact

    arch = load_artifact(tiny_bloom).architecture
    layers, heads, head_dim = int(arch["layers"]), int(arch["heads"]), int(arch["head_dim"])
    unfused, fused = _passes_up_to_bloom(tiny_bloom, False), _passes_up_to_bloom(tiny_bloom, True)
    assert _ops(unfused)["MultiHeadAttention"] == 0 and _ops(unfused)["Softmax"] == layers
    ops = _ops(fused)
    assert ops["MultiHeadAttention"] == layers and ops["Softmax"] == 0
    for i, node in enumerate(n for n in fused.graph.node if n.op_type == "MultiHeadAttention"):
        assert list(node.input[6:8]) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert list(node.output[1:]) == [f"present.{i}.key", f"present.{i}.value"]

    feeds, real = _decoder_feeds(*CASES[case], layers, heads, head_dim)
    before, after = _run(unfused, feeds), _run(fused, feeds)
    assert np.abs(before[0][real]).max() > 1e-3  # the logits are not flat
    np.testing.assert_allclose(after[0][real], before[0][real], rtol=0, atol=1e-5)  # positions of real tokens
    for b, a in zip(before[1:], after[1:]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_optimize_and_verify_tiny_bloom(tiny_bloom: Path, tmp_path: Path) -> None:
    """``optimize`` reports MultiHeadAttention fused in every layer; ``verify`` passes (fp32 and
    fp16 — the CPU provider has an fp16 MultiHeadAttention kernel), batch parity included."""
    from parity.prompts import smoke_prompts_path
    from parity.verify import verify_artifact

    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        report = optimize_artifact(tiny_bloom, out, "cpu", precision, check=True, force=precision == "fp16",
                                   progress=False)
        assert report.ops.get("MultiHeadAttention") == 2 and "MultiHeadAttention" not in report.missing
        assert {"name": "bloom-attention", "count": 2} in report.passes
        assert "MultiHeadAttention" in report.render() and "not fused" not in report.render()
        result = verify_artifact(out, smoke_prompts_path(), max_new_tokens=16, progress=False, batch_size=4)
        assert result.passed, result.verdict.reasons
        assert result.batch_mismatches == ()
        assert all(c.max_logit_diff is not None and c.max_logit_diff < (1e-4 if precision == "fp32" else 1e-2)
                   for c in result.comparisons)
