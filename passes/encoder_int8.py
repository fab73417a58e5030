"""CPU int8 for encoders (BERT family): every weight matrix through one int8 GEMM, attention in fp32.

The fused encoder graph carries each layer's Q/K/V projection inside ``com.microsoft.Attention``
(packed weight ``[hidden, 3·hidden]``, built by a ``Concat`` of the three projections), which
neither of onnxruntime's int8 paths can quantize: ``MatMulNBitsQuantizer`` only takes ``MatMul``,
and ``quantize_dynamic``'s ``QAttention`` refuses ``qkv_hidden_sizes`` and has no
``attention_bias`` input (the additive padding mask our export feeds). Left in fp32, that
projection is a quarter of the weights and keeps int8 at ~1.1× the fused fp32 graph on MiniLM.

:func:`split_attention_projection` rewrites each such ``Attention`` into the equivalent

``MatMul(x, W_qkv) → Split(3, last axis) → MultiHeadAttention(q, k, v, bias_qkv, attention_bias)``

(one packed GEMM, ORT's CPU ``MultiHeadAttention`` adds the bias and runs the same kernel), so the
projection becomes a plain ``MatMul`` that the quantizer converts with the others.
:func:`quantize_encoder_int8` then applies ``quantize_dynamic`` (int8 weights per output channel,
activations quantized per tensor on each call → ``MatMulInteger``, VNNI kernels) — the classic
BERT-on-CPU recipe. Why per-tensor activations are acceptable here but not for decoders
(``passes.precision``'s docstring): an embedding is judged by cosine and retrieval rank, and
``parity.encoder_verify``'s int8 policy measures both on every ``verify``; the numbers are in
``docs/encoders.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["is_encoder_graph", "fold_constant_concats", "split_attention_projection", "quantize_encoder_int8"]

log = logging.getLogger(__name__)


def is_encoder_graph(model: onnx.ModelProto) -> bool:
    """An encoder graph (``last_hidden_state`` out, no ``logits``), per the IO contract."""
    names = {o.name for o in model.graph.output}
    return "last_hidden_state" in names and "logits" not in names


def fold_constant_concats(model: onnx.ModelProto) -> int:
    """Replace each ``Concat`` whose inputs are all initializers by one initializer; return the count."""
    inits = {t.name: t for t in model.graph.initializer}
    keep: list[onnx.NodeProto] = []
    folded = 0
    for node in model.graph.node:
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx") and node.input \
                and all(i in inits for i in node.input):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            arr = np.concatenate([numpy_helper.to_array(inits[i]) for i in node.input], axis=axis)
            tensor = numpy_helper.from_array(arr, node.output[0])
            model.graph.initializer.append(tensor)
            inits[tensor.name] = tensor
            folded += 1
        else:
            keep.append(node)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        _drop_unused_initializers(model)
    return folded


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def split_attention_projection(model: onnx.ModelProto) -> int:
    """Rewrite ``Attention`` with a constant packed weight into MatMul → Split → MultiHeadAttention.

    Matches ``com.microsoft.Attention(x, W, b, [mask_index=''], [past=''], [attention_bias])`` with
    ``W`` an initializer ``[hidden, 3·hidden]``, equal ``qkv_hidden_sizes`` (or none), no past and
    no mask_index; anything else is left as it is (and stays fp32). Returns the rewrites.
    """
    fold_constant_concats(model)
    inits = {t.name: t for t in model.graph.initializer}
    out_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in model.graph.node:
        attrs = _attrs(node) if node.op_type == "Attention" and node.domain == "com.microsoft" else {}
        inputs = list(node.input) + [""] * (6 - len(node.input))
        weight = inits.get(inputs[1]) if attrs else None
        sizes = attrs.get("qkv_hidden_sizes")
        ok = (weight is not None and len(weight.dims) == 2 and weight.dims[1] % 3 == 0
              and (sizes is None or len(set(sizes)) == 1) and not inputs[3] and not inputs[4]
              and not attrs.get("unidirectional") and not attrs.get("do_rotary"))
        if not ok:
            out_nodes.append(node)
            continue
        name = node.name or f"attention_{count}"
        packed = f"{name}/qkv"
        q, k, v = (f"{name}/{p}" for p in "qkv")
        out_nodes.append(helper.make_node("MatMul", [inputs[0], inputs[1]], [packed], name=f"{name}/qkv_matmul"))
        out_nodes.append(helper.make_node("Split", [packed], [q, k, v], name=f"{name}/qkv_split", axis=-1,
                                          num_outputs=3))
        mha_attrs = {k2: v2 for k2, v2 in attrs.items() if k2 in ("num_heads", "scale", "mask_filter_value")}
        out_nodes.append(helper.make_node("MultiHeadAttention", [q, k, v, inputs[2], "", inputs[5]],
                                          list(node.output[:1]), name=f"{name}/mha", domain="com.microsoft",
                                          **mha_attrs))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(out_nodes)
        _drop_unused_initializers(model)
        opsets = {o.domain: o.version for o in model.opset_import}
        if opsets.get("", opsets.get("ai.onnx", 0)) < 18:
            raise ValueError("Split with num_outputs needs opset 18; re-export the artifact")
    return count


def quantize_encoder_int8(model: onnx.ModelProto, dst: Path, per_channel: bool = True) -> dict[str, Any]:
    """Split the attention projections, then ``quantize_dynamic`` every weight ``MatMul``; write ``dst``.

    Returns the manifest's ``quantization`` settings and counts (the caller wraps them).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    split = split_attention_projection(model)
    tmp = dst.with_name(dst.stem + ".split.onnx")
    onnx.save(model, str(tmp), save_as_external_data=True, location=tmp.name + ".data")
    try:
        quantize_dynamic(tmp, dst, op_types_to_quantize=["MatMul"], per_channel=per_channel, reduce_range=False,
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        tmp.unlink(missing_ok=True)
        (tmp.parent / (tmp.name + ".data")).unlink(missing_ok=True)
    out = onnx.load(str(dst), load_external_data=False)
    converted = sum(1 for n in out.graph.node if n.op_type == "MatMulInteger")
    log.info("encoder int8: %d attention projection(s) split out, %d MatMul → MatMulInteger", split, converted)
    return {
        "settings": {"weights": f"int8 symmetric, one scale per {'output channel' if per_channel else 'tensor'}",
                     "activations": "uint8, one scale per tensor, quantized on each call (DynamicQuantizeLinear)",
                     "attention_projections_split": split, "attention": "fp32 (MultiHeadAttention)"},
        "converted_nodes": converted,
    }
