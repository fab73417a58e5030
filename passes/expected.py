"""Fusions each architecture should end with, by contrib op name.

The same data as ``exporters.specs.ArchSpec.expected_fusions`` (a test keeps the two equal);
copied because ``passes`` may not import ``exporters`` (DESIGN.md, layout), which would pull torch
into ``lmforge optimize``.
"""

from __future__ import annotations

__all__ = ["EXPECTED_FUSIONS", "expected_fusions"]

_LLAMA = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention")
_GPT = ("LayerNormalization", "SkipLayerNormalization", "FastGelu", "MultiHeadAttention")

EXPECTED_FUSIONS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": _GPT,
    "bloom": _GPT,
    "bert": ("LayerNormalization", "SkipLayerNormalization", "Gelu", "Attention"),
}


def expected_fusions(architecture: str) -> tuple[str, ...]:
    return EXPECTED_FUSIONS.get(architecture, ())
