"""CPU int8 for encoders (BERT family): every weight matrix through an int8 GEMM, attention in fp32.

The fused encoder graph carries each layer's Q/K/V projection inside ``com.microsoft.Attention``
(packed weight ``[hidden, 3·hidden]``, built by a ``Concat`` of the three projections), which
neither of onnxruntime's int8 paths takes as it is: ``MatMulNBitsQuantizer`` only converts
``MatMul``, and ``quantize_dynamic``'s ``QAttention`` refuses ``qkv_hidden_sizes`` and has no
``attention_bias`` input (the additive padding mask our export feeds). Left in fp32, that
projection is a quarter of the weights and keeps int8 at ~1.1× the fused fp32 graph on MiniLM.
Two rewrites make it quantizable, tried in this order per ``Attention`` node:

1. :func:`mask_bias_to_mask_index` — when the additive bias is computed from ``attention_mask``
   alone (a key padding mask), feed the raw mask as ``mask_index`` instead and drop equal
   ``qkv_hidden_sizes``; ``quantize_dynamic`` then makes the node a ``QAttention`` (int8
   projection, the fused fp32 attention kernel).
2. :func:`split_attention_projection` — otherwise, ``MatMul(x, W_qkv) → Split →
   MultiHeadAttention(q, k, v, bias, attention_bias)``, so the projection is a plain ``MatMul``
   (slower than 1 on MiniLM, docs/encoders.md: the split copies and MHA's bias/transpose steps).

:func:`quantize_encoder_int8` then applies ``quantize_dynamic``: int8 weights per output channel,
activations quantized per tensor on each call (``MatMulInteger`` / ``DynamicQuantizeMatMul``,
VNNI kernels) — the classic BERT-on-CPU recipe. Per-tensor activation scales are what
``passes.precision``'s docstring rejects for decoders (one outlier sets the step for a whole
tensor; greedy tokens flip); for an embedding, judged by cosine and retrieval rank, the loss is
small and ``parity.encoder_verify``'s int8 policy measures it on every ``verify``. The numbers
(MiniLM: min cosine 0.980, mean 0.993, every top-1 passage kept; speed) are in ``docs/encoders.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["is_encoder_graph", "fold_constant_concats", "mask_bias_to_mask_index", "split_attention_projection",
           "classifier_head_matmuls", "quantize_encoder_int8"]

log = logging.getLogger(__name__)


def is_encoder_graph(model: onnx.ModelProto) -> bool:
    """An encoder graph, per the IO contract: ``last_hidden_state`` out (an embedding model), or
    ``logits`` out with no KV inputs (a sequence classifier: a re-ranker's or classifier's head)."""
    names = {o.name for o in model.graph.output}
    if "last_hidden_state" in names and "logits" not in names:
        return True
    return "logits" in names and not any(i.name.startswith("past_key_values") for i in model.graph.input)


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


def _depends_only_on(model: onnx.ModelProto, value: str, allowed_input: str) -> bool:
    """Whether ``value``'s *values* are computed from graph input ``allowed_input`` and scalar constants
    alone (other inputs may contribute their shapes). A float table on the way (a learned relative
    position bias gathered by distance, as MPNet adds to its mask) makes it more than a padding mask."""
    producer = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    stack, seen = [value], set()
    while stack:
        name = stack.pop()
        if name in constants:
            tensor = constants[name]
            size = int(np.prod(tensor.dims)) if tensor.dims else 1
            if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and size > 1:
                return False  # a learned table (MPNet's relative position bias), not a mask constant
            continue
        if name in seen or not name or name == allowed_input:
            continue
        seen.add(name)
        if name in graph_inputs:
            return False
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type != "Shape":  # a shape is not the values: the mask's [b, 1, s, s] expansion reads it
            stack.extend(node.input)
    return True


def mask_bias_to_mask_index(model: onnx.ModelProto, mask_input: str = "attention_mask") -> int:
    """Give each ``Attention`` the raw ``[batch, seq]`` mask as ``mask_index`` instead of an additive bias.

    Our BERT export feeds ``Attention`` an ``attention_bias`` (input 5) built from
    ``attention_mask`` alone (``Where(mask == 0, -inf, 0)``, broadcast over heads and queries): a
    key padding mask. ``QAttention`` has no ``attention_bias`` input but takes the same mask as a
    2-D ``mask_index`` (masked keys get ``mask_filter_value``; exp of it is 0 either way), so the
    rewrite lets ``quantize_dynamic`` make the fused attention's QKV projection int8, which is
    faster on MiniLM than splitting the projection out (docs/encoders.md). Only nodes whose bias depends on
    ``attention_mask`` and constants alone, with no ``mask_index`` and no past, are rewritten;
    equal ``qkv_hidden_sizes`` (which ``QAttention`` refuses) are dropped. Returns the count.
    """
    if mask_input not in {i.name for i in model.graph.input}:
        return 0
    fold_constant_concats(model)
    cast_name = f"{mask_input}/int32"
    count = 0
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            continue
        attrs = _attrs(node)
        inputs = list(node.input) + [""] * (6 - len(node.input))
        sizes = attrs.get("qkv_hidden_sizes")
        if (not inputs[5] or inputs[3] or inputs[4] or len(node.input) > 6 or attrs.get("unidirectional")
                or (sizes is not None and len(set(sizes)) != 1)
                or not _depends_only_on(model, inputs[5], mask_input)):
            continue
        inputs[3], inputs[5] = cast_name, ""
        while inputs and not inputs[-1]:
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
        kept = [a for a in node.attribute if a.name != "qkv_hidden_sizes"]
        del node.attribute[:]
        node.attribute.extend(kept)
        count += 1
    if count:
        model.graph.node.insert(0, helper.make_node("Cast", [mask_input], [cast_name], name=f"{mask_input}/cast",
                                                    to=onnx.TensorProto.INT32))
        _drop_dead_nodes(model)
    return count


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads (the now unused bias computation)."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        keep = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(keep) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(keep)
    _drop_unused_initializers(model)


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


_POOLING_OPS = {"Gather", "GatherElements", "GatherND", "Slice", "ReduceMean", "ReduceSum"}
_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "QAttention", "Softmax"}
_DATA_FIRST = {"Reshape", "Expand", "Squeeze", "Unsqueeze", "Transpose", "Tile"}  # the rest is shape


def classifier_head_matmuls(model: onnx.ModelProto, output: str = "logits", limit: int = 64) -> list[str]:
    """Names of the ``MatMul``/``Gemm`` nodes of a sequence classifier's head (pooler, dense, classifier).

    Walks back from ``output`` to the pooling step (the ``Gather``/``Slice`` that picks the CLS row,
    or the ``Reduce*`` of a mean); the matrix products met on the way are the head. They run once
    per row on one pooled vector, so int8 saves nothing there, and one activation scale for that
    vector moves every score: on the tiny ModernBERT re-ranker the int8 head alone moved logits of
    ~10 by up to 0.7. An attention op on the way, or more than ``limit`` nodes, means no clear
    head: nothing is returned. A ``Gemm`` is named as ``quantize_dynamic`` renames it when it turns
    it into a ``MatMul`` (``<name>_MatMul``); nodes without a name get one.
    """
    if output not in {o.name for o in model.graph.output}:
        return []
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    found: list[onnx.NodeProto] = []
    stack, seen = [output], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > limit or node.op_type in _ATTENTION_OPS:
            return []
        if node.op_type in _POOLING_OPS or node.op_type in ("Shape", "Size"):
            continue
        if node.op_type in ("MatMul", "Gemm"):
            found.append(node)
        data = node.input[:1] if node.op_type in _DATA_FIRST else node.input
        stack.extend(i for i in data if i and i not in inits)
    names = []
    for index, node in enumerate(found):
        if not node.name:
            node.name = f"lmforge_head_{index}"
        names += [node.name, node.name + "_MatMul"] if node.op_type == "Gemm" else [node.name]
    return names


def quantize_encoder_int8(model: onnx.ModelProto, dst: Path, per_channel: bool = True) -> dict[str, Any]:
    """Split the attention projections, then ``quantize_dynamic`` every weight ``MatMul``; write ``dst``.

    Returns the manifest's ``quantization`` settings and counts (the caller wraps them).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    masked = mask_bias_to_mask_index(model)  # → QAttention (int8 projection inside the fused attention)
    split = split_attention_projection(model)  # the Attention nodes that could not take a mask index
    # onnxruntime.quantization re-runs onnx's shape inference, which refuses a value_info the fusions
    # left stale (a classifier head's [hidden] → [labels] Gemm rewritten to MatMul): drop them all.
    del model.graph.value_info[:]
    head = classifier_head_matmuls(model)  # a classifier's head stays fp32 (see its docstring)
    tmp = dst.with_name(dst.stem + ".split.onnx")
    onnx.save(model, str(tmp), save_as_external_data=True, location=tmp.name + ".data")
    try:
        quantize_dynamic(tmp, dst, op_types_to_quantize=["MatMul", "Attention"], per_channel=per_channel,
                         reduce_range=False, weight_type=QuantType.QInt8, use_external_data_format=True,
                         nodes_to_exclude=head,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        tmp.unlink(missing_ok=True)
        (tmp.parent / (tmp.name + ".data")).unlink(missing_ok=True)
    out = onnx.load(str(dst), load_external_data=False)
    ops = [n.op_type for n in out.graph.node]
    converted = ops.count("MatMulInteger") + ops.count("QAttention")
    log.info("encoder int8: %d Attention → QAttention, %d projection(s) split out, %d MatMul → MatMulInteger",
             ops.count("QAttention"), split, ops.count("MatMulInteger"))
    return {
        "settings": {"weights": f"int8 symmetric, one scale per {'output channel' if per_channel else 'tensor'}",
                     "activations": "uint8, one scale per tensor, quantized on each call (DynamicQuantizeLinear)",
                     "attention_mask_index": masked, "attention_projections_split": split,
                     "attention": (f"{ops.count('QAttention')} QAttention (int8 QKV projection, fp32 attention), "
                                   f"{split} MultiHeadAttention after an int8 projection"),
                     "classifier_head": "fp32 (one pooled vector a row; int8 would only move the scores)"
                                        if head else "none"},
        "converted_nodes": converted,
    }
