"""onnxscript's ``MultiHeadAttention`` rules, keeping a partial rotary's ``rotary_embedding_dim``.

onnxscript's ``ort_fusions.mha`` rewrite re-creates the query and key ``RotaryEmbedding`` nodes on
the 3-D ``[B, S, H·Dh]`` inputs with no attributes ("TODO: forward other attributes"). For a full
rotary that is the same computation; for a partial one (Phi-2's ``partial_rotary_factor`` 0.5,
fused to ``RotaryEmbedding(rotary_embedding_dim=d)`` by the partial-rotary pass) the rebuilt node
rotates the whole head and the logits drift (0.06 on tiny:phi, caught by ``optimize --check``).
This subclass runs the same pattern, check and rewrite, then gives the rebuilt nodes the matched
nodes' ``interleaved`` and ``rotary_embedding_dim`` and the ``num_heads`` a 3-D input needs.
"""

from __future__ import annotations

from typing import Any

from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.mha import MultiHeadAttention

__all__ = ["mha_rules"]


class _RotaryAttrsMHA(MultiHeadAttention):
    def check(self, context, query_BSHDh, **kwargs):
        result = super().check(context, query_BSHDh=query_BSHDh, **kwargs)
        self._rotary_attrs: dict[str, int] = {}
        if not result:
            return result
        ropes = [n for n in context.nodes if n.op_type == "RotaryEmbedding"]
        dims = {n.attributes.get_int("rotary_embedding_dim", 0) for n in ropes}
        interleaved = {n.attributes.get_int("interleaved", 0) for n in ropes}
        if len(dims) > 1 or len(interleaved) > 1:
            return result.fail("query and key rotary attributes differ", ropes)
        dim, inter = (dims.pop() if dims else 0), (interleaved.pop() if interleaved else 0)
        if dim or inter:
            heads = _ir_utils.get_dim(query_BSHDh, 2)
            if not isinstance(heads, int):
                return result.fail("a partial rotary needs a static head count", query_BSHDh)
            self._rotary_attrs = {"num_heads": heads, "interleaved": inter}
            if dim:
                self._rotary_attrs["rotary_embedding_dim"] = dim
        return result

    def rewrite(self, op, **kwargs: Any):  # type: ignore[override]
        out = super().rewrite(op, **kwargs)
        if out is None or not self._rotary_attrs:
            return out
        first = out[0] if isinstance(out, tuple) else out
        mha = first.producer()
        for index in (0, 1):
            value = mha.inputs[index] if mha is not None and len(mha.inputs) > index else None
            node = value.producer() if value is not None else None
            if node is not None and node.op_type == "RotaryEmbedding":
                for name, number in self._rotary_attrs.items():
                    node.attributes[name] = _ir_attr(name, number)
        return out


def _ir_attr(name: str, value: int) -> Any:
    import onnx_ir as ir

    return ir.AttrInt64(name, value)


def _rule_set(has_past_present: bool) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([
        _RotaryAttrsMHA.rule(
            "MHA" + ("_Rotary" if rotary else "") + ("_Past" if has_past_present else "")
            + ("_CrossAttention" if cross else ""),
            is_rotary=rotary, has_past_present=has_past_present, is_cross_attention=cross,
        )
        for rotary in (False, True)
        for cross in ((False,) if has_past_present else (False, True))
    ])


def mha_rules() -> list[pattern.RewriteRuleSet]:
    """onnxscript's MHA rule sets (with past first, then without), forwarding rotary attributes."""
    return [_rule_set(True), _rule_set(False)]
