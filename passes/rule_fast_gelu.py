"""Tanh GELU as the exporter writes it → ``com.microsoft.FastGelu``.

Written because onnxscript's ``GeluTanhFusion`` (``ort_fusions.gelu``) expects
``x * (0.5 * (1 + tanh(...)))`` with ``Mul(0.044715, Pow(x, 3))``; ``torch.onnx.export(dynamo=True)``
of transformers' ``gelu_new`` / ``gelu_pytorch_tanh`` (GPT-2, BLOOM) writes the halving on ``x``
first instead, so that rule never fires on our graphs::

    x ──┬──────────────────────────────── Mul(·, 0.5) ───────────────────────┐
        ├── Pow(·, 3) ── Mul(·, 0.044715) ──┐                                 │
        └─────────────────────────────── Add ── Mul(·, √(2/π)) ── Tanh ── Add(·, 1) ── Mul ── y

BLOOM's ``bloom_gelu_forward`` writes ``x·0.5·(1 + tanh(0.79788456·x·(1 + 0.044715·x·x)))``::

    x ── Mul(·, 0.5) ─────────────────────────────────────────────────────────┐
    x ── Mul(·, 0.79788456) ──┐                                                │
    x ── Mul(·, 0.044715) ── Mul(·, x) ── Add(·, 1) ── Mul ── Tanh ── Add(·, 1) ── Mul ── y

Both rules are registered in every commuted form of their ``Mul``/``Add`` nodes.
"""

from __future__ import annotations

import math

from onnxscript.rewriter import pattern

__all__ = ["fast_gelu_rules"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class _ExportedTanhGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, x):
        half_x = op.Mul(x, 0.5)
        cube = op.Pow(x, 3.0)
        inner = op.Add(x, op.Mul(cube, 0.044715))
        tanh = op.Tanh(op.Mul(inner, _SQRT_2_OVER_PI))
        return op.Mul(half_x, op.Add(tanh, 1.0))

    def rewrite(self, op, x):
        return op.FastGelu(x, _domain="com.microsoft")


class _BloomTanhGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, x):
        half_x = op.Mul(x, 0.5)
        inner = op.Add(op.Mul(op.Mul(x, 0.044715), x), 1.0)
        tanh = op.Tanh(op.Mul(op.Mul(x, _SQRT_2_OVER_PI), inner))
        return op.Mul(half_x, op.Add(tanh, 1.0))

    def rewrite(self, op, x):
        return op.FastGelu(x, _domain="com.microsoft")


def fast_gelu_rules() -> pattern.RewriteRuleSet:
    """The rule set, with every commuted operand order of its Mul/Add nodes."""
    return pattern.RewriteRuleSet(
        [*_ExportedTanhGelu.rule("ExportedTanhGelu").commute(), *_BloomTanhGelu.rule("BloomTanhGelu").commute()]
    )
