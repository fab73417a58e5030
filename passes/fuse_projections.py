"""One ``MatMul`` for the projections that read the same input (q/k/v, gate/up), then a ``Split``.

In a decoder layer three projections read the attention norm's output (q, k, v) and two the MLP
norm's (gate, up). At batch 1 on the CPU each weight ``MatMul`` is a GEMV whose cost is largely
per call: a thread-pool dispatch and, for an int8-activation ``MatMulNBits`` (accuracy level 4),
quantizing the same input row again. :func:`fuse_shared_input_matmuls` rewrites, on the fp32
graph before the weight quantizer runs::

    x ── MatMul(·, W1) ── y1          x ── MatMul(·, [W1 | W2 | W3]) ── Split(axis=-1) ── y1, y2, y3
    x ── MatMul(·, W2) ── y2    →
    x ── MatMul(·, W3) ── y3

so the quantizer turns one weight into one ``MatMulNBits``. ``MatMulNBits`` quantizes each output
column on its own (blocks run along ``K``), so the fused weight quantizes to exactly the columns
the separate ones would, and each output is the same function of ``x``. Unlike the packed-QKV
form of the shared-buffer contract (:func:`passes.shared_buffer._pack_qkv`, where
GroupQueryAttention applies rotary itself), this keeps q, k and v as separate tensors, so it
fits the ``concat`` contract, whose rotary runs before attention on positions from the mask; the
shared-buffer rewrite, run after it, gives GroupQueryAttention the fused output before its
``Split`` (:func:`passes.shared_buffer._split_qkv`).

onnxscript's ``ort_fusions`` has no such rule for plain ``MatMul`` siblings (its packed-QKV rules
target attention ops). Matched: ``MatMul`` nodes of the default domain whose ``A`` is the same
value and whose ``B`` is a 2-D fp32/fp16 initializer with the same ``K``, not in ``exclude``
(the lm head, arithmetic such as rotary frequencies). Each group becomes one node pair; returns
how many groups were fused.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["fuse_shared_input_matmuls"]

log = logging.getLogger(__name__)

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def fuse_shared_input_matmuls(model: onnx.ModelProto, exclude: set[str] | None = None) -> int:
    """Fuse every group of ≥ 2 weight ``MatMul`` nodes that read one input; see the module docstring."""
    exclude = exclude or set()
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    groups: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2 \
                or node.name in exclude:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or weight.data_type not in _FLOAT_TYPES:
            continue
        groups[(node.input[0], int(weight.dims[0]), weight.data_type)].append(index)

    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    dropped_weights: set[str] = set()
    fused = 0
    for (x, _, _), members in groups.items():
        if len(members) < 2:
            continue
        nodes = [graph.node[i] for i in members]
        arrays = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        joined = np.ascontiguousarray(np.concatenate(arrays, axis=1))
        tag = f"{nodes[0].name or 'matmul'}__fused{len(nodes)}"
        graph.initializer.append(numpy_helper.from_array(joined, f"{tag}_weight"))
        sizes = numpy_helper.from_array(np.array([a.shape[1] for a in arrays], dtype=np.int64), f"{tag}_split")
        graph.initializer.append(sizes)
        matmul = helper.make_node("MatMul", [x, f"{tag}_weight"], [f"{tag}_out"], name=tag)
        split = helper.make_node("Split", [f"{tag}_out", sizes.name], [n.output[0] for n in nodes],
                                 name=f"{tag}_split", axis=-1)
        replace[members[0]] = [matmul, split]  # the first member's place: x exists there already
        drop.update(members[1:])
        dropped_weights.update(n.input[1] for n in nodes)
        fused += 1
    if not fused:
        return 0
    new_nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if index in replace:
            new_nodes.extend(replace[index])
        elif index not in drop:
            new_nodes.append(node)
    still_used = {name for node in new_nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name not in dropped_weights or t.name in still_used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    log.info("fused %d group(s) of projections that share an input into one MatMul + Split each", fused)
    return fused
