"""Rotary angles computed with ``Mul`` → ``com.microsoft.RotaryEmbedding`` with a cos/sin cache.

Written because onnxscript's ``CosSinCacheFusion`` (``ort_fusions.cos_sin_cache``) expects the
angles as ``Transpose(MatMul(inv_freq[1, E, 1], position_ids[B, 1, S]))``; on our exports the
optimizer has already folded that product into a broadcast ``Mul`` of ``[B, S, 1] × [E]``, so
the rule never fires. This rule matches what is left after onnxscript's ``RotaryEmbeddingFusion``
has turned the rotate-half arithmetic into its temporary ``ai.onnxruntime._fusion`` op::

    position_ids[B,S] ── Unsqueeze(·, -1) ── Cast(float) ── Mul(·, inv_freq[E]) ── f[B,S,E]
    Concat(f, f, axis=-1) ──┬── Cos ── Unsqueeze(·, 1) ──┐
                            └── Sin ── Unsqueeze(·, 1) ──┤
    x[B,H,S,D] ──────────────────────────────────────── RotaryEmbedding (_fusion) ── y

and writes ``RotaryEmbedding(x, position_ids, cos_cache, sin_cache)`` (com.microsoft) with
``cos_cache``/``sin_cache`` of shape ``[max_context, E]`` computed once from ``inv_freq``, so the
per-token position comes from ``position_ids`` as before (left-padded rows stay correct).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

__all__ = ["rotary_cache_rules"]


class _MulFormRotaryCache(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, max_positions: int, freq_first: bool) -> None:
        super().__init__(name, remove_nodes=False)  # cos/sin are shared by q and k of a layer
        self._max_positions = max_positions
        self._freq_first = freq_first
        self._cache: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, x, position_ids, axes, inv_freq, interleaved, num_heads):
        pos = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)
        freqs = op.Mul(inv_freq, pos) if self._freq_first else op.Mul(pos, inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), [1])
        sin = op.Unsqueeze(op.Sin(emb), [1])
        return op.RotaryEmbedding(
            x, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain="ai.onnxruntime._fusion"
        )

    def check(self, context, x, position_ids, axes, inv_freq, **_):
        result = pattern.MatchResult()
        if not _ir_utils.has_rank(position_ids, 2):
            return result.fail("position_ids is not [batch, seq]", position_ids)
        axis = _ir_utils.get_singleton_value(axes)
        if axis not in (-1, 2):
            return result.fail("position_ids is not unsqueezed on its last axis", axes)
        if inv_freq.const_value is None:
            return result.fail("inv_freq is not a constant", inv_freq)
        freq = inv_freq.const_value.numpy()
        if freq.ndim != 1 and not (freq.ndim == 3 and freq.shape[0] == freq.shape[1] == 1):
            return result.fail(f"inv_freq has shape {freq.shape}, expected [E]", inv_freq)
        if x.shape is None or x.shape.rank() != 4 or x.shape[3] != 2 * freq.size:
            return result.fail("x is not [B, H, S, 2·E]", x)
        return result

    def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, **_):
        if inv_freq not in self._cache:
            freq = inv_freq.const_value.numpy().reshape(1, -1).astype(np.float64)
            angles = np.arange(self._max_positions, dtype=np.float64).reshape(-1, 1) @ freq
            cos = op.initializer(ir.tensor(np.cos(angles).astype(np.float32)), name=f"{inv_freq.name}_cos_cache")
            sin = op.initializer(ir.tensor(np.sin(angles).astype(np.float32)), name=f"{inv_freq.name}_sin_cache")
            self._cache[inv_freq] = (cos, sin)
        cos, sin = self._cache[inv_freq]
        return op.RotaryEmbedding(
            x, position_ids, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain="com.microsoft"
        )

    def cleanup(self) -> None:
        self._cache.clear()


def rotary_cache_rules(max_positions: int) -> pattern.RewriteRuleSet:
    """Rules for both operand orders of the angle ``Mul``; ``max_positions`` rows of cache."""
    return pattern.RewriteRuleSet(
        [
            _MulFormRotaryCache.rule("RotaryCacheMul", max_positions, False),
            _MulFormRotaryCache.rule("RotaryCacheMulFreqFirst", max_positions, True),
        ]
    )
