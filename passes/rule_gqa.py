"""Llama-family attention with a left-padding mask → ``com.microsoft.GroupQueryAttention``.

Reuses the subgraph pattern of onnxscript's ``GroupQueryAttention`` rule (``ort_fusions.gqa``)
and replaces its check and rewrite. That rule fires only when the mask is onnxruntime-genai's
causal-mask construction and then *drops* the mask, deriving ``seqlens_k`` from
``max(position_ids)``: right padding only. Our graphs build the mask from ``attention_mask`` with
transformers' vmap'd mask functions (``GatherND`` over ``attention_mask``) and serve left-padded
batches, so that rule never fires on them and, if it did, padded rows would be wrong.

Matched (after onnxscript's RotaryEmbedding, cos/sin-cache and SDPA fusions)::

    q[B,S,H·Dh] ── Reshape ── Transpose ── RotaryEmbedding(pos, cos, sin) ──────────────┐
    k[B,S,Hkv·Dh] ── Reshape ── Transpose ── RotaryEmbedding ── Concat(past_k, ·) ─┬── Unsqueeze ── Expand ── Reshape ─┤
    v[B,S,Hkv·Dh] ── Reshape ── Transpose ─────────────────── Concat(past_v, ·) ─┤── Unsqueeze ── Expand ── Reshape ─┤
                                                                   present.{i}.*  ◀┘                       mask[B,1,S,T] ─┤
                                                      SDPA (_fusion) ── Transpose ── Reshape ── y[B,S,H·Dh]

Rewritten to ``RotaryEmbedding`` on the 3-D ``q``/``k`` (positions still from ``position_ids``),
then ``GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len, attention_bias=mask)``
with ``seqlens_k = T - 1`` for every row (the additive mask carries the padding) and its
``present_key/value`` outputs standing in for the ``Concat`` outputs: the ``concat`` KV contract's
names, shapes and dtypes are unchanged.

One restriction comes with the op (onnxruntime's CPU kernel): a call with batch > 1 *and*
seq > 1 must have past length 0 (batched prefill and batched one-token decode are fine;
batched chunked prefill is not). The pipeline records it in the manifest (``constraints``).
"""  # noqa: E501 - the ASCII diagram of the matched subgraph cannot be wrapped

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.gqa import GroupQueryAttention

__all__ = ["gqa_rules", "GQA_CONSTRAINT"]

GQA_CONSTRAINT = "GroupQueryAttention: a batch > 1 with seq > 1 requires past length 0"


class _LeftPaddedGQA(GroupQueryAttention):
    def __init__(self) -> None:
        super().__init__()
        self.name = "LeftPaddedGQA"

    def check(self, context, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value,
              query_BHSDh_rope, key_BHkvSDh_rope, query_BSHDh, key_BSHkvDh, mask,
              query_BSHDh_normalized=None, query_BHSDh_normalized=None,
              key_BSHkvDh_normalized=None, key_BHkvSDh_normalized=None, **_):
        result = pattern.MatchResult()
        if query_BSHDh_normalized is not None and query_BHSDh_normalized is not None:
            return result.fail("query normalised twice", [query_BSHDh_normalized, query_BHSDh_normalized])
        if key_BSHkvDh_normalized is not None and key_BHkvSDh_normalized is not None:
            return result.fail("key normalised twice", [key_BSHkvDh_normalized, key_BHkvSDh_normalized])
        bindings: dict[str, object] = {}
        for value, dims in ((query_BSD, ["B", "S", "D"]), (key_BSDkv, ["B", "S", "Dkv"]),
                            (value_BSDkv, ["B", "S", "Dkv"])):
            if not _fusion_utils.check_shape_bool(bindings, value, dims):
                return result.fail(f"{value.name} is not [B, S, hidden]", value)
        for value in (past_key, past_value):
            if value is None or not _fusion_utils.check_shape_bool(bindings, value, ["B", "Hkv", "P", "Dh"]):
                return result.fail("no [B, Hkv, past, Dh] past KV (the concat contract)", value)
        if mask is None or mask.shape is None or mask.shape.rank() != 4 or mask.shape[1] != 1:
            return result.fail("attention mask is not an additive [B, 1, S, T] tensor", mask)
        if mask.dtype != query_BSD.dtype:
            return result.fail("attention mask dtype differs from the query's", mask)
        num_heads = _ir_utils.get_dim(query_BSHDh, 2)
        kv_heads = _ir_utils.get_dim(key_BSHkvDh, 2)
        if not isinstance(num_heads, int) or not isinstance(kv_heads, int):
            return result.fail("head counts are not static", query_BSHDh)
        self.num_heads, self.kv_num_heads = num_heads, kv_heads
        q_rope, k_rope = query_BHSDh_rope.producer(), key_BHkvSDh_rope.producer()
        for attr in ("interleaved", "rotary_embedding_dim"):
            if q_rope.attributes.get_int(attr, 0) != k_rope.attributes.get_int(attr, 0):
                return result.fail("query/key rotary attributes differ", [q_rope, k_rope])
        if q_rope.inputs[2] is not k_rope.inputs[2] or q_rope.inputs[3] is not k_rope.inputs[3]:
            return result.fail("query and key use different cos/sin caches", [q_rope, k_rope])
        self._interleaved = q_rope.attributes.get_int("interleaved", 0)
        self._rotary_dim = q_rope.attributes.get_int("rotary_embedding_dim", 0)  # partial rotary: > 0
        if self._rotary_dim % 16:
            # onnxruntime's CUDA session folds a RotaryEmbedding into the GroupQueryAttention it feeds
            # and then requires cos/sin caches of a multiple of 8 columns (group_query_attention_helper.h):
            # a 4-wide partial rotary failed there at run time ("cos_cache dimension 1 must be … a
            # multiple of 8"), so such a graph keeps unfused attention on every device.
            return result.fail(f"partial rotary of {self._rotary_dim} dims (GQA on CUDA needs a multiple of 16)",
                               q_rope)
        sdpa = [n for n in context.nodes if n.op_type == "SDPA"]
        self._scale = sdpa[0].attributes.get_float("scale", None) if sdpa else None
        return result

    def rewrite(self, op, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value,
                position_ids, cos, sin, mask, query_BSHDh, key_BSHkvDh,
                query_BSHDh_normalized=None, query_BHSDh_normalized=None,
                key_BSHkvDh_normalized=None, key_BHkvSDh_normalized=None, **_):
        # q/k norms (Qwen3, Gemma 3, OLMo 2): the per-head RMSNorm runs on [B, S, H, Dh], before
        # the transpose GQA absorbs, and its output is flattened back to the [B, S, H·Dh] GQA reads.
        query_BSD = _renormed(op, query_BSD, query_BSHDh, query_BHSDh_normalized or query_BSHDh_normalized)
        key_BSDkv = _renormed(op, key_BSDkv, key_BSHkvDh, key_BHkvSDh_normalized or key_BSHkvDh_normalized)
        rotary: dict[str, object] = dict(interleaved=self._interleaved, _domain="com.microsoft")
        if self._rotary_dim:
            rotary["rotary_embedding_dim"] = self._rotary_dim
        query = op.RotaryEmbedding(query_BSD, position_ids, cos, sin, num_heads=self.num_heads, **rotary)
        key = op.RotaryEmbedding(key_BSDkv, position_ids, cos, sin, num_heads=self.kv_num_heads, **rotary)
        total = op.Shape(mask, start=3, end=4)  # [1] int64: past + seq
        total_i32 = op.Cast(total, to=ir.DataType.INT32)
        one = op.Constant(value=ir.tensor([1], dtype=ir.DataType.INT32))
        seqlens_k = op.Expand(op.Sub(total_i32, one), op.Shape(query_BSD, start=0, end=1))
        total_len = op.Squeeze(total_i32, op.Constant(value_ints=[0]))
        attrs: dict[str, object] = dict(num_heads=self.num_heads, kv_num_heads=self.kv_num_heads, do_rotary=0)
        if self._scale is not None:
            attrs["scale"] = float(self._scale)
        return op.GroupQueryAttention(
            query, key, value_BSDkv, past_key, past_value, seqlens_k, total_len,
            None, None, None, mask, **attrs, _domain="com.microsoft", _outputs=3,
        )


def _renormed(op, flat, per_head, normalized):
    """``flat`` as it was, or the norm that produced ``normalized`` applied to ``per_head`` [B, S, H, Dh]
    and reshaped to [B, S, H·Dh] (the norm is over the last axis, so the transpose may go)."""
    if normalized is None:
        return flat
    norm = normalized.producer()
    again = op.SimplifiedLayerNormalization(per_head, norm.inputs[1], **norm.attributes)
    out = op.Reshape(again, op.Constant(value_ints=[0, 0, -1]))
    # Typed, so the fp16 pass (run without shape inference) sees a float tensor leave a norm it
    # keeps in fp32 and casts it back for the RotaryEmbedding; untyped, the cast was missing.
    again.dtype, again.shape = per_head.dtype, per_head.shape
    out.dtype, out.shape = flat.dtype, flat.shape
    return out


class _LeftPaddedSharedHeadsGQA(_LeftPaddedGQA):
    """The same attention with as many KV heads as query heads (Phi-3-mini, Llama 2, OLMo …):
    transformers' ``repeat_kv`` is then the identity and leaves no ``Unsqueeze → Expand →
    Reshape`` on the keys and values, so onnxscript's pattern (and :class:`_LeftPaddedGQA`) does
    not match, and the attention would fuse to ``MultiHeadAttention`` — which has no shared-buffer
    form. ``GroupQueryAttention`` takes ``kv_num_heads == num_heads``, as onnxruntime-genai's
    builder emits for these models; the match and the rewrite are the parent's."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "LeftPaddedSharedHeadsGQA"

    def pattern(self, op, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value,
                position_ids, cos, sin, mask):
        def per_head(x, name):  # [B, S, H·Dh] → [B, S, H, Dh], optionally normalised there
            split = op.Reshape(x, pattern.ANY_VALUE, _outputs=[f"{name}_BSHDh"])
            normed = op.SimplifiedLayerNormalization(split, pattern.ANY_VALUE, axis=-1,
                                                     _outputs=[f"{name}_BSHDh_normalized"])
            return pattern.OrValue([split, normed])

        def heads_first(x, name):  # → [B, H, S, Dh], optionally normalised there
            moved = op.Transpose(x, perm=[0, 2, 1, 3])
            normed = op.SimplifiedLayerNormalization(moved, pattern.ANY_VALUE, axis=-1,
                                                     _outputs=[f"{name}_BHSDh_normalized"])
            return pattern.OrValue([moved, normed])

        query = heads_first(per_head(query_BSD, "query"), "query")
        key = op.Transpose(per_head(key_BSDkv, "key"), perm=[0, 2, 1, 3])
        key_normed = op.SimplifiedLayerNormalization(key, pattern.ANY_VALUE, axis=-1,
                                                     _outputs=["key_BHkvSDh_normalized"])
        key = pattern.OrValue([key, key_normed])
        value = op.Transpose(op.Reshape(value_BSDkv, pattern.ANY_VALUE), perm=[0, 2, 1, 3])
        query_rope = op.RotaryEmbedding(query, position_ids, cos, sin, _domain="com.microsoft",
                                        _outputs=["query_BHSDh_rope"])
        key_rope = op.RotaryEmbedding(key, position_ids, cos, sin, _domain="com.microsoft",
                                      _outputs=["key_BHkvSDh_rope"])
        key_all = pattern.OrValue([op.Concat(past_key, key_rope, axis=-2), key_rope])
        value_all = pattern.OrValue([op.Concat(past_value, value, axis=-2), value])
        attention = op.SDPA(query_rope, key_all, value_all, mask, key_format="BHSd",
                            _domain="ai.onnxruntime._fusion")
        out = op.Reshape(op.Transpose(attention, perm=[0, 2, 1, 3]), pattern.ANY_VALUE, _outputs=["attention_BSD"])
        return out, key_all, value_all

    def check(self, context, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value,
              query_BHSDh_rope, key_BHkvSDh_rope, query_BSHDh, mask, key_BSHDh=None, **rest):
        result = super().check(context, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value,
                               query_BHSDh_rope, key_BHkvSDh_rope, query_BSHDh, key_BSHDh, mask,
                               query_BSHDh_normalized=rest.get("query_BSHDh_normalized"),
                               query_BHSDh_normalized=rest.get("query_BHSDh_normalized"),
                               key_BSHkvDh_normalized=rest.get("key_BSHDh_normalized"),
                               key_BHkvSDh_normalized=rest.get("key_BHkvSDh_normalized"))
        if result and self.num_heads != self.kv_num_heads:
            return pattern.MatchResult().fail("fewer KV heads than query heads without repeat_kv", query_BSD)
        return result

    def rewrite(self, op, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value,
                position_ids, cos, sin, mask, query_BSHDh, key_BSHDh=None, **rest):
        return super().rewrite(op, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value, position_ids, cos, sin,
                               mask, query_BSHDh, key_BSHDh,
                               query_BSHDh_normalized=rest.get("query_BSHDh_normalized"),
                               query_BHSDh_normalized=rest.get("query_BHSDh_normalized"),
                               key_BSHkvDh_normalized=rest.get("key_BSHDh_normalized"),
                               key_BHkvSDh_normalized=rest.get("key_BHkvSDh_normalized"))


def gqa_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([_LeftPaddedGQA.rule(), _LeftPaddedSharedHeadsGQA.rule()])
