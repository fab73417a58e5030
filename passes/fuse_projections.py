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

from runtime.kernels.graph import SILU_GATE_PREFIX

__all__ = ["fuse_shared_input_matmuls", "name_silu_gates"]

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

    infos = {v.name: v for v in (*graph.value_info, *graph.output)}
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
        fused_info = _joined_value_info([infos.get(n.output[0]) for n in nodes], f"{tag}_out")
        if fused_info is not None:  # the packed output's shape, for passes that read it (shared buffer)
            graph.value_info.append(fused_info)
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


def _joined_value_info(parts: list[onnx.ValueInfoProto | None], name: str) -> onnx.ValueInfoProto | None:
    """The value info of ``parts`` concatenated on the last axis, when each is known with the same
    element type and leading dimensions and a fixed last one; else None."""
    if not parts or any(p is None or not p.type.tensor_type.HasField("shape") for p in parts):
        return None
    dims = [list(p.type.tensor_type.shape.dim) for p in parts if p is not None]
    types = {p.type.tensor_type.elem_type for p in parts if p is not None}
    if len(types) != 1 or any(not d or not d[-1].HasField("dim_value") for d in dims) \
            or any([x.SerializeToString() for x in d[:-1]] != [x.SerializeToString() for x in dims[0][:-1]]
                   for d in dims):
        return None
    leading = [x.dim_value if x.HasField("dim_value") else x.dim_param for x in dims[0][:-1]]
    return helper.make_tensor_value_info(name, types.pop(), [*leading, sum(d[-1].dim_value for d in dims)])


def name_silu_gates(model: onnx.ModelProto) -> int:
    """Name each SwiGLU gate that reads a fused gate|up projection, so a runtime can find it.

    Matched, after :func:`fuse_shared_input_matmuls`::

        h ── Split(axis=-1, [I, I]) ── a ── Sigmoid ── s
                                   │   a, s ── Mul ── silu
                                   └── b, silu ── Mul ── y      (y = silu(a) · b)

    where every intermediate value has no other reader. The four nodes are renamed
    ``SILU_GATE_PREFIX + "<k>.split" / ".sigmoid" / ".silu" / ".gate"`` and nothing else changes:
    the graph computes what it computed. With lmforge's CUDA kernels built, the runtime replaces
    each named group by one ``lmforge.SiluMul`` node from ``h`` to ``y``
    (:func:`runtime.kernels.graph.fuse_silu_gates`), where onnxruntime runs a GEMV, a Split, a
    Sigmoid (fused with its Mul into ``QuickGelu`` by its own optimizer) and a Mul. Returns how many
    gates were named.
    """
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    initializers = {t.name: t for t in graph.initializer}

    def only(value: str, op: str) -> list[onnx.NodeProto]:
        users = readers.get(value, [])
        return users if value not in outputs and users and all(u.op_type == op for u in users) else []

    named = 0
    for split in list(graph.node):
        if split.op_type != "Split" or split.domain not in ("", "ai.onnx") or len(split.output) != 2 \
                or len(split.input) != 2 or split.input[1] not in initializers:
            continue
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        sizes = numpy_helper.to_array(initializers[split.input[1]]).tolist()
        if axis != -1 or len(sizes) != 2 or sizes[0] != sizes[1]:
            continue
        a, b = split.output
        users = readers.get(a, [])
        sigmoids = [u for u in users if u.op_type == "Sigmoid"]
        silus = [u for u in users if u.op_type == "Mul"]
        if a in outputs or len(users) != 2 or len(sigmoids) != 1 or len(silus) != 1:
            continue
        sigmoid, silu = sigmoids[0], silus[0]
        if sorted(silu.input) != sorted([a, sigmoid.output[0]]) or len(only(sigmoid.output[0], "Mul")) != 1:
            continue
        gates = only(silu.output[0], "Mul")
        if len(gates) != 1 or sorted(gates[0].input) != sorted([silu.output[0], b]) or len(only(b, "Mul")) != 1:
            continue
        for node, part in ((split, "split"), (sigmoid, "sigmoid"), (silu, "silu"), (gates[0], "gate")):
            node.name = f"{SILU_GATE_PREFIX}{named}.{part}"
        named += 1
    if named:
        log.info("named %d SwiGLU gate(s) over a fused gate|up projection", named)
    return named
