"""``Reshape → Gemm → Reshape`` around a 3-D activation → ``MatMul + Add``.

Written because onnxscript's ``gemm_to_matmul_add_rule`` checks the reshape targets as constants,
and our exports compute them from ``Shape`` (symbolic batch and sequence), so it does not fire on
GPT-2's ``Conv1D`` projections. Left as ``Gemm``, the 2-D reshape in front of the attention output
projection is swallowed by onnxscript's MHA rewrite (its pattern's final ``Reshape`` matches the
``[B·S, D]`` one) and the ``Gemm`` is then fed 3-D. Matched::

    x[B, S, K] ── Reshape(·, [B·S, K]) ── Gemm(·, W[K, N], b[N]?) ── Reshape(·, [B, S, N]) ── y
    x[B, S, H, Dh] ── Reshape(·, [B·S, H·Dh]) ── Gemm ── Reshape(·, [B, S, N]) ── y   (attention output)

with ``alpha = beta = 1``, no transposes, and ``y``'s leading dims equal to ``x``'s; rewritten to
``Add(MatMul(x, W), b)`` (``x`` first reshaped to ``[B, S, H·Dh]`` in the second form) — the form
every later fusion (MHA, BiasGelu, quantization) expects.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

__all__ = ["gemm_matmul_rules"]


class _ReshapeGemmReshape(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, has_bias: bool) -> None:
        super().__init__(name)
        self._has_bias = has_bias

    def pattern(self, op, x, w, b, shape_in, shape_out):
        flat = op.Reshape(x, shape_in, _allow_other_attributes=True)
        args = (flat, w, b) if self._has_bias else (flat, w)
        gemm = op.Gemm(*args, _allow_other_attributes=True, _outputs=["gemm"])
        return op.Reshape(gemm, shape_out, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, w, gemm, y, b=None, **_):
        result = pattern.MatchResult()
        attrs = gemm.producer().attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return result.fail("Gemm has alpha/beta ≠ 1", gemm)
        if attrs.get_int("transA", 0) or attrs.get_int("transB", 0):
            return result.fail("Gemm transposes an operand", gemm)
        if w.shape is None or w.shape.rank() != 2 or (b is not None and b.shape is not None and b.shape.rank() != 1):
            return result.fail("W is not [K, N] or b is not [N]", w)
        if x.shape is None or y.shape is None or y.shape.rank() < 3 or x.shape.rank() < y.shape.rank():
            return result.fail("x and y are not activations of rank ≥ 3", x)
        lead = y.shape.rank() - 1
        if list(x.shape)[:lead] != list(y.shape)[:lead]:
            return result.fail("y's leading dims differ from x's", y)
        self._merge = x.shape.rank() - y.shape.rank()
        return result

    def rewrite(self, op, x, w, b=None, **_):
        if self._merge:
            x = op.Reshape(x, op.Constant(value_ints=[0] * (x.shape.rank() - self._merge - 1) + [-1]))
        y = op.MatMul(x, w)
        return op.Add(y, b) if self._has_bias else y


def gemm_matmul_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([_ReshapeGemmReshape.rule("ReshapeGemmBiasReshape", True),
                                   _ReshapeGemmReshape.rule("ReshapeGemmReshape", False)])
