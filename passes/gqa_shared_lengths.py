"""One ``seqlens_k`` for every GroupQueryAttention of a decoder, instead of one per layer.

:mod:`passes.rule_gqa` builds each layer's ``seqlens_k`` as ``Expand(total − 1, Shape(query)[0:1])``
from *that layer's* query, so common-subexpression elimination cannot merge the 30 copies (their
``Shape`` inputs differ) and a step runs a ``Shape`` and an ``Expand`` per layer for the same
``[batch]`` vector. Every layer's query has the same batch dimension, so
:func:`share_gqa_lengths` points every GroupQueryAttention whose ``seqlens_k`` is such an
``Expand`` of the same ``total − 1`` at the first one's, and the copies go dead. The values each
layer sees are unchanged. Returns how many GroupQueryAttention inputs were re-pointed.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["share_gqa_lengths"]

_SEQLENS_K = 5


def _batch_expand(value: ir.Value | None) -> ir.Value | None:
    """The ``total − 1`` operand of ``value = Expand(total − 1, Shape(x, start=0, end=1))``, else None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Expand" or node.domain != "" or len(node.inputs) != 2:
        return None
    shape = node.inputs[1].producer() if node.inputs[1] is not None else None
    if shape is None or shape.op_type != "Shape" or shape.attributes.get_int("start", 0) != 0 \
            or shape.attributes.get_int("end", -1) != 1:
        return None
    return node.inputs[0]


def share_gqa_lengths(model: ir.Model) -> int:
    """Re-point every layer's per-batch ``seqlens_k`` at the first layer's; see the module docstring."""
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"
           and len(n.inputs) > _SEQLENS_K]
    if len(gqa) < 2:
        return 0
    first = gqa[0].inputs[_SEQLENS_K]
    lengths = _batch_expand(first)
    if lengths is None:
        return 0
    shared = 0
    for node in gqa[1:]:
        value = node.inputs[_SEQLENS_K]
        if value is not first and _batch_expand(value) is lengths:
            node.replace_input_with(_SEQLENS_K, first)
            shared += 1
    return shared
