"""Two rules for encoder graphs that onnxscript's ``ort_fusions`` miss, run before the fusions.

**Two additive biases before a Softmax** (MPNet's relative position bias, then the padding mask).
transformers' MPNet writes ``scores = q·kᵀ / √d; scores += position_bias; scores += mask``; the
SDPA rule (``ort_fusions.sdpa``) takes one additive mask, so the attention stayed unfused::

    MatMul ── Div ── Add(·, position_bias) ── Add(·, mask) ── Softmax
                 ⟶  MatMul ── Div ── Add(·, Add(position_bias, mask)) ── Softmax

Both biases are added to every score in the same order of magnitude as before; the only change
is that ``position_bias + mask`` is rounded once (a mask of ``finfo.min`` absorbs the bias either
way, so padded keys still get a zero weight). The summed bias becomes MultiHeadAttention's
``attention_bias`` ``[batch, heads, seq, seq]``.

**Skip + LayerNorm without a bias** (ModernBERT's ``norm_bias=False``). onnxscript's
``SkipLayerNormFusion`` binds LayerNormalization's ``beta``, so a two-input LayerNormalization never
matches; ``com.microsoft.SkipLayerNormalization`` takes ``beta`` as optional, so::

    LayerNormalization(Add(x, skip), gamma)  ⟶  SkipLayerNormalization(x, skip, gamma)

with the residual sum (output 3) replacing the ``Add`` for the next block.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

__all__ = ["encoder_prefusion_rules", "two_bias_softmax_rules", "skip_layer_norm_no_bias_rules"]


class _TwoBiasSoftmax(pattern.RewriteRuleClassBase):
    def pattern(self, op, scores, bias, mask):
        return op.Softmax(op.Add(op.Add(scores, bias), mask), _allow_other_attributes=True, _outputs=["probs"])

    def check(self, op, scores, bias, mask, probs, **_):
        result = pattern.MatchResult()
        producer = scores.producer()
        # the scores are a q·kᵀ product, optionally scaled: not a bias that happens to sit first
        if producer is None or producer.op_type not in ("MatMul", "Div", "Mul"):
            return result.fail("the first Add's left operand is not a (scaled) q·kᵀ MatMul", scores)
        rank = scores.shape.rank() if scores.shape is not None else None
        if rank != 4:
            return result.fail(f"scores of rank {rank}, expected [batch, heads, seq, seq]", scores)
        return result

    def rewrite(self, op, scores, bias, mask, probs, **_):
        axis = probs.producer().attributes.get_int("axis", -1)
        return op.Softmax(op.Add(scores, op.Add(bias, mask)), axis=axis)


class _SkipLayerNormNoBias(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, skip, gamma):
        skip_sum = op.Add(x, skip)
        normalized = op.LayerNormalization(skip_sum, gamma, axis=-1, _allow_other_attributes=True,
                                           _outputs=["layer_norm"])
        return normalized, skip_sum

    def check(self, op, x, skip, gamma, layer_norm, **_):
        result = pattern.MatchResult()
        for value in (x, skip):
            if value.shape is None or value.shape.rank() != 3:
                return result.fail(f"{value.name} is not [batch, seq, hidden]", value)
        if x.shape != skip.shape and not (x.shape[-1] == skip.shape[-1]):
            return result.fail("the residual and the block output differ in width", skip)
        if gamma.shape is None or gamma.shape.rank() != 1:
            return result.fail("gamma is not one [hidden] vector", gamma)
        if layer_norm.producer().attributes.get_int("stash_type", 1) != 1:
            return result.fail("stash_type other than 1 is not supported by SkipLayerNormalization")
        return result

    def rewrite(self, op, x, skip, gamma, layer_norm, **_):
        epsilon = layer_norm.producer().attributes.get_float("epsilon", 1e-5)
        normalized, _mean, _inv_std, skip_sum = op.SkipLayerNormalization(
            x, skip, gamma, epsilon=epsilon, _outputs=4, _domain="com.microsoft")
        return normalized, skip_sum


def two_bias_softmax_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([_TwoBiasSoftmax.rule("TwoBiasSoftmax")])


def skip_layer_norm_no_bias_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(_SkipLayerNormNoBias.rule("SkipLayerNormNoBias").commute())


def encoder_prefusion_rules() -> list[pattern.RewriteRuleSet]:
    return [two_bias_softmax_rules(), skip_layer_norm_no_bias_rules()]
