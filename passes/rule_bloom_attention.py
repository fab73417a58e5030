"""BLOOM's ALiBi attention (fused QKV, ``baddbmm`` scores) → ``com.microsoft.MultiHeadAttention``.

Written because onnxscript's attention rules (``ort_fusions.sdpa``, ``mha``) start from a 4-D
``[B, H, S, Dh]`` score computation; BLOOM computes its scores in 3-D, per ``batch·head``, as
``alibi.baddbmm(q, kᵀ, beta=1, alpha=1/√Dh)`` on a packed ``[B, S, H, 3, Dh]`` projection, so the
SDPA rule never matches (its ``MatMul`` has 3-D operands and its bias is added before the 4-D
view) and nothing downstream of it can fire. Matched, as ``torch.onnx.export(dynamo=True)`` writes
transformers' ``BloomAttention`` with the ``concat`` KV contract::

    q      = Transpose(Gather(qkv[B,S,H,3,Dh], 0, axis=3), perm=[0,2,1,3])     [B,H,S,Dh]
    k      = Concat(past_k, Transpose(Gather(qkv, 1, axis=3)), axis=-2)      present.{i}.key
    v      = Concat(past_v, Transpose(Gather(qkv, 2, axis=3)), axis=-2)      present.{i}.value
    scores = Add(Mul(MatMul(Reshape(q)[B·H,S,Dh], Transpose(Reshape(k), [0,2,1])), α),
                 alibi[B·H,1,T])                                              (the baddbmm)
    probs  = Softmax(Add(Reshape(scores)[B,H,S,T], mask[B,1,S,T]), axis=-1)
    y      = Reshape(Transpose(Reshape(MatMul(Reshape(probs), Reshape(v)))[B,H,S,Dh]))[B,S,H·Dh]

Rewritten to ``MultiHeadAttention(q, k, v, attention_bias=alibi⁴ᴰ + mask, past_key, past_value,
num_heads=H, scale=α)`` with ``q``/``k``/``v`` the three ``[B, S, H·Dh]`` slices of the packed
projection and ``alibi⁴ᴰ = Reshape(alibi, [B, H, 1, T])``: the bias input carries ALiBi and the
padding/causal mask together (a left-padded row's positions are in ALiBi already, so nothing is
derived from lengths). ``present_key``/``present_value`` stand in for the two ``Concat`` outputs,
so the ``concat`` contract's names, shapes (``[B, H, T, Dh]``) and dtypes are unchanged. onnxruntime
has CPU and CUDA kernels for the op (fp32 and fp16) and, unlike GroupQueryAttention, no restriction
on batch, past and sequence length together (batched chunked prefill included).

Refused (``MatchResult.fail`` says which): a projection not split as ``[…, H, 3, Dh]`` with
indices 0/1/2 on axis 3, a non-constant or non-scalar ``α``, a bias that is not ``[B·H, 1 or S, T]``,
a mask that is not ``[B or 1, 1 or H, S, T]``, a past KV that is not ``[B, H, past, Dh]``, or
dtypes that differ from the query's.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

__all__ = ["bloom_attention_rules"]


def _unknown(dim: object) -> bool:
    return dim is None or (isinstance(dim, ir.SymbolicDim) and dim.value is None)


def _same(got: object, want: object) -> bool:
    """A dim agrees with the expected one: equal, or one of them symbolic and unknown. A static
    expected size (heads, head size) must be there statically: those decide how heads are laid out."""
    if isinstance(want, int):
        return got == want
    return _unknown(got) or _unknown(want) or got == want


class _BloomAlibiAttention(pattern.RewriteRuleClassBase):
    def pattern(self, op, qkv, q_index, k_index, v_index,
                past_key, past_value, scale, alibi, mask):
        query = op.Transpose(op.Gather(qkv, q_index, axis=3), perm=[0, 2, 1, 3])
        key = op.Transpose(op.Gather(qkv, k_index, axis=3), perm=[0, 2, 1, 3])
        value = op.Transpose(op.Gather(qkv, v_index, axis=3), perm=[0, 2, 1, 3])
        present_key = op.Concat(past_key, key, axis=-2)
        present_value = op.Concat(past_value, value, axis=-2)
        query_3d = op.Reshape(query, pattern.ANY_VALUE, _outputs=["query_3d"])
        key_3d = op.Reshape(present_key, pattern.ANY_VALUE, _outputs=["key_3d"])
        key_3d_t = op.Transpose(key_3d, perm=[0, 2, 1])
        value_3d = op.Reshape(present_value, pattern.ANY_VALUE, _outputs=["value_3d"])
        # alibi.baddbmm(q, kᵀ, beta=1, alpha=scale)
        scores = op.Add(op.Mul(op.MatMul(query_3d, key_3d_t), scale), alibi)
        scores_4d = op.Reshape(scores, pattern.ANY_VALUE, _outputs=["scores_4d"])
        probs = op.Softmax(op.Add(scores_4d, mask), axis=-1)
        context = op.MatMul(op.Reshape(probs, pattern.ANY_VALUE, _outputs=["probs_3d"]), value_3d)
        context_4d = op.Reshape(context, pattern.ANY_VALUE, _outputs=["context_4d"])
        attention = op.Reshape(op.Transpose(context_4d, perm=[0, 2, 1, 3]), pattern.ANY_VALUE,
                               _outputs=["attention"])
        return attention, present_key, present_value

    def check(self, context, qkv, q_index, k_index, v_index,
              past_key, past_value, scale, alibi, mask,
              query_3d, key_3d, value_3d, scores_4d, probs_3d, context_4d, attention, **_):
        result = pattern.MatchResult()
        if qkv.shape is None or qkv.shape.rank() != 5 or qkv.shape[3] != 3:
            return result.fail("the projection is not a packed [B, S, H, 3, Dh] tensor", qkv)
        batch, seq, heads, _, head_dim = qkv.shape
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            return result.fail("head count or head size of the packed projection is not static", qkv)
        for index, want in ((q_index, 0), (k_index, 1), (v_index, 2)):
            got = _ir_utils.get_singleton_value(index)
            if got != want or index.shape is None or index.shape.rank() != 0:
                return result.fail(f"the query/key/value slices are not Gather({want}) on axis 3 "
                                   f"(got index {got!r})", index)
        dtype = qkv.dtype
        for value in (past_key, past_value):
            if value.shape is None or value.shape.rank() != 4 or not all(
                    _same(got, want) for got, want in zip(value.shape, (batch, heads, None, head_dim))):
                return result.fail("past KV is not [B, H, past, Dh] (the concat contract)", value)
        alpha = _ir_utils.get_singleton_value(scale)
        if not isinstance(alpha, float):
            return result.fail("the score scale (baddbmm's alpha) is not a constant scalar", scale)
        if alibi.shape is None or alibi.shape.rank() != 3 or not (
                _same(alibi.shape[1], 1) or _same(alibi.shape[1], seq)):
            return result.fail("the baddbmm bias is not an ALiBi tensor [B·H, 1 or S, T]", alibi)
        if mask.shape is None or mask.shape.rank() != 4 or mask.shape[1] not in (1, heads) or not (
                _same(mask.shape[2], seq) and (mask.shape[0] == 1 or _same(mask.shape[0], batch))):
            return result.fail("the attention mask is not an additive [B or 1, 1 or H, S, T] tensor", mask)
        for value in (past_key, past_value, alibi, mask):
            if value.dtype != dtype:
                return result.fail(f"{value.name} has dtype {value.dtype}, the projection {dtype}", value)
        # The views between the nodes must be the ones BLOOM writes; anything else mixes heads or batch rows.
        views = ((query_3d, (None, seq, head_dim)), (key_3d, (None, None, head_dim)),
                 (value_3d, (None, None, head_dim)), (scores_4d, (batch, heads, seq, None)),
                 (probs_3d, (None, seq, None)), (context_4d, (batch, heads, seq, head_dim)),
                 (attention, (batch, seq, heads * head_dim)))
        for value, dims in views:
            if value.shape is None or value.shape.rank() != len(dims) or not all(
                    _same(got, want) for got, want in zip(value.shape, dims)):
                return result.fail(f"{value.name} has shape {value.shape}, expected {list(dims)} "
                                   "(None: any)", value)
        self._heads, self._head_dim, self._scale = heads, head_dim, alpha
        return result

    def rewrite(self, op, qkv, q_index, k_index, v_index,
                past_key, past_value, alibi, mask, **_):
        flat = op.Constant(value=ir.tensor([0, 0, self._heads * self._head_dim], dtype=ir.DataType.INT64))
        query = op.Reshape(op.Gather(qkv, q_index, axis=3), flat)
        key = op.Reshape(op.Gather(qkv, k_index, axis=3), flat)
        value = op.Reshape(op.Gather(qkv, v_index, axis=3), flat)
        # [B·H, 1 or S, T] → [B·H, 1, 1 or S, T] → [B, H, 1 or S, T] (a 0 copies the input's dim)
        axis_1 = op.Constant(value=ir.tensor([1], dtype=ir.DataType.INT64))
        heads_4d = op.Constant(value=ir.tensor([-1, self._heads, 0, 0], dtype=ir.DataType.INT64))
        alibi_4d = op.Reshape(op.Unsqueeze(alibi, axis_1), heads_4d)
        bias = op.Add(alibi_4d, mask)  # [B, H, S, T]
        return op.MultiHeadAttention(
            query, key, value, None, None, bias, past_key, past_value,
            num_heads=self._heads, scale=self._scale, _domain="com.microsoft", _outputs=3,
        )


def bloom_attention_rules() -> pattern.RewriteRuleSet:
    """The rule, with both operand orders of its ``Mul`` and two ``Add`` nodes."""
    return pattern.RewriteRuleSet(_BloomAlibiAttention.rule("BloomAlibiAttention").commute())
