"""Patterns the GQA, rotary-cache and FastGelu rules must refuse (the Gemm rule's are in
test_rules_refuse.py, BLOOM attention's in test_bloom_attention.py).

GQA's checks are called on the values a match binds (its pattern needs the whole fused attention
subgraph); the rotary-cache and FastGelu rules run on small graphs. Each refusal has a control: the
same input with the offending piece put right is accepted.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from passes.rule_fast_gelu import fast_gelu_rules
from passes.rule_gqa import _LeftPaddedGQA
from passes.rule_rotary_cache import rotary_cache_rules
from tests.passes.test_rules import _apply, _const, _model, _ops, _run

# --------------------------------------------------------------------------------------------
# GroupQueryAttention: the check on a match's bindings

F = ir.DataType.FLOAT


def _val(name: str, shape: list[Any], dtype: ir.DataType = F) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))


def _gqa_bindings(mask_dtype: ir.DataType = F, shared_caches: bool = True, k_interleaved: int = 0,
                  past_rank: int = 4) -> dict[str, Any]:
    """What the GQA pattern binds on tiny llama's layer (6 heads, 2 KV heads, head dim 16)."""
    pos = _val("pos", ["B", "S"], ir.DataType.INT64)
    cos, sin = _val("cos", [512, 8]), _val("sin", [512, 8])
    k_cos, k_sin = (cos, sin) if shared_caches else (_val("cos_k", [512, 8]), _val("sin_k", [512, 8]))
    q_rope = ir.Node("ai.onnxruntime._fusion", "RotaryEmbedding", [_val("q4", ["B", 6, "S", 16]), pos, cos, sin],
                     attributes=[ir.AttrInt64("interleaved", 0)])
    k_rope = ir.Node("ai.onnxruntime._fusion", "RotaryEmbedding", [_val("k4", ["B", 2, "S", 16]), pos, k_cos, k_sin],
                     attributes=[ir.AttrInt64("interleaved", k_interleaved)])
    past = ["B", 2, "P", 16] if past_rank == 4 else ["B", "P", 32]
    return dict(
        query_BSD=_val("q", ["B", "S", 96]), key_BSDkv=_val("k", ["B", "S", 32]), value_BSDkv=_val("v", ["B", "S", 32]),
        past_key=_val("past_k", past), past_value=_val("past_v", past),
        query_BHSDh_rope=q_rope.outputs[0], key_BHkvSDh_rope=k_rope.outputs[0],
        query_BSHDh=_val("q_heads", ["B", "S", 6, 16]), key_BSHkvDh=_val("k_heads", ["B", "S", 2, 16]),
        mask=_val("mask", ["B", 1, "S", "T"], mask_dtype),
    )


def _gqa_check(**bindings: Any) -> Any:
    return _LeftPaddedGQA().check(SimpleNamespace(nodes=[]), **bindings)


def test_gqa_check_accepts_the_llama_bindings() -> None:
    result = _gqa_check(**_gqa_bindings())
    assert result, result.reason


@pytest.mark.parametrize(
    "bindings,reason",
    [
        (dict(mask_dtype=ir.DataType.FLOAT16), "attention mask dtype differs"),  # an fp16 mask on an fp32 query
        (dict(mask_dtype=ir.DataType.BOOL), "attention mask dtype differs"),  # a boolean mask is not additive
        (dict(shared_caches=False), "different cos/sin caches"),
        (dict(k_interleaved=1), "rotary attributes differ"),
        (dict(past_rank=3), "past KV"),
    ],
    ids=["fp16-mask", "bool-mask", "unshared-cos-sin", "interleaved-differs", "past-not-4d"],
)
def test_gqa_check_refuses(bindings: dict[str, Any], reason: str) -> None:
    result = _gqa_check(**_gqa_bindings(**bindings))
    assert not result
    assert reason in result.reason


def test_gqa_check_refuses_a_mask_that_is_not_b1st() -> None:
    bindings = _gqa_bindings()
    bindings["mask"] = _val("mask", ["B", 6, "S", "T"])  # per-head bias: GQA's attention_bias broadcasts heads only
    result = _gqa_check(**bindings)
    assert not result and "[B, 1, S, T]" in result.reason


def test_gqa_check_takes_one_query_key_normalisation_and_refuses_two() -> None:
    """Qwen3 normalises q/k per head before the transpose, Gemma 3 after it: either is fused (the
    rewrite re-applies the norm on [B, S, H, Dh]); both at once is not a graph the rule knows."""
    assert _gqa_check(**_gqa_bindings(), query_BSHDh_normalized=_val("qn", ["B", "S", 6, 16]))
    result = _gqa_check(**_gqa_bindings(), query_BSHDh_normalized=_val("qn", ["B", "S", 6, 16]),
                        query_BHSDh_normalized=_val("qn2", ["B", 6, "S", 16]))
    assert not result and "normalised twice" in result.reason


# --------------------------------------------------------------------------------------------
# Rotary angles from a Mul → RotaryEmbedding with a cos/sin cache

FUSION = "ai.onnxruntime._fusion"


def _rotary_graph(axis: int = -1, const_freq: bool = True, head_dim: int = 16,
                  pos_shape: tuple[Any, ...] = ("B", "S")) -> onnx.ModelProto:
    """position_ids → Unsqueeze(axis) → Cast → Mul(inv_freq[E]) → Concat → Cos/Sin → Unsqueeze(1) →
    RotaryEmbedding(_fusion) on x[B, 2, S, head_dim], as onnxscript's rotary fusion leaves it."""
    e = 8
    inv_freq = (1.0 / (10000 ** (np.arange(e, dtype=np.float32) / e))).astype(np.float32)
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [axis]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2, "S", head_dim]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, list(pos_shape))]
    if const_freq:
        inits.append(helper.make_tensor("inv_freq", TensorProto.FLOAT, [e], inv_freq))
    else:
        inputs.append(helper.make_tensor_value_info("inv_freq", TensorProto.FLOAT, [e]))
    nodes = [
        helper.make_node("Unsqueeze", ["position_ids", "axes"], ["pos3"]),
        helper.make_node("Cast", ["pos3"], ["posf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["posf", "inv_freq"], ["freqs"]),
        helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
        helper.make_node("Cos", ["emb"], ["c"]),
        helper.make_node("Sin", ["emb"], ["s"]),
        helper.make_node("Unsqueeze", ["c", "one"], ["cos"]),
        helper.make_node("Unsqueeze", ["s", "one"], ["sin"]),
        helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], domain=FUSION, interleaved=0, num_heads=2),
    ]
    graph = helper.make_graph(nodes, "rotary", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2, "S", head_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(FUSION, 1)])
    model.ir_version = 10
    return model


def test_rotary_cache_rule_fires_on_the_mul_form() -> None:
    fused, count = _apply(_rotary_graph(), rotary_cache_rules(64))
    assert count == 1
    rotary = [n for n in fused.graph.node if n.op_type == "RotaryEmbedding"]
    assert [n.domain for n in rotary] == ["com.microsoft"] and rotary[0].input[1] == "position_ids"


@pytest.mark.parametrize(
    "kwargs",
    [dict(axis=1), dict(const_freq=False), dict(head_dim=12), dict(pos_shape=("B", "S", 1))],
    ids=["unsqueezed-on-axis-1", "inv-freq-not-constant", "x-not-2E", "position-ids-3d"],
)
def test_rotary_cache_rule_refuses(kwargs: dict[str, Any]) -> None:
    fused, count = _apply(_rotary_graph(**kwargs), rotary_cache_rules(64))
    assert count == 0
    assert [n.domain for n in fused.graph.node if n.op_type == "RotaryEmbedding"] == [FUSION]


# --------------------------------------------------------------------------------------------
# FastGelu: near-misses of the tanh GELU constants


def _gelu(c: float = 0.044715, k: float = math.sqrt(2 / math.pi), power: float = 3.0, half: float = 0.5,
          one: float = 1.0) -> onnx.ModelProto:
    """gelu_new as exported, with each constant replaceable."""
    nodes = [
        _const("half", half), _const("three", power), _const("c", c), _const("k", k), _const("one", one),
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


@pytest.mark.parametrize(
    "kwargs",
    [dict(c=0.05), dict(k=0.7), dict(power=2.0), dict(half=0.25), dict(one=2.0)],
    ids=["cubic-coefficient", "sqrt-2-over-pi", "square-not-cube", "not-halved", "tanh-plus-2"],
)
def test_fast_gelu_rule_refuses_other_constants(kwargs: dict[str, float]) -> None:
    model = _gelu(**kwargs)
    x = np.random.default_rng(4).standard_normal((2, 5, 32)).astype(np.float32) * 3
    (before,) = _run(model, {"x": x})
    fused, count = _apply(model, fast_gelu_rules())
    assert count == 0 and _ops(fused)["FastGelu"] == 0
    (after,) = _run(fused, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_fast_gelu_rule_control_fires() -> None:
    _, count = _apply(_gelu(), fast_gelu_rules())
    assert count == 1
