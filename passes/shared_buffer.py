"""The ``shared-buffer`` KV contract: rewrite a GQA-fused decoder so past and present share one buffer.

Runs after the fusions *and* after the precision pass (:func:`share_kv_buffers` works on the final
model file), because ``convert_float_to_float16(keep_io_types=True)`` wraps every graph input and
output in a ``Cast``: a ``Cast`` between ``past_key_values.{i}.*`` and ``GroupQueryAttention``
would hand the op a copy, and in-place updates need the op to see the caller's buffer. Running
last lets this pass drop those KV casts (the KV IO becomes fp16 for an fp16 graph; ``logits``
keeps the precision pass's dtype).

The rewrite (every attention of the graph must already be ``com.microsoft.GroupQueryAttention``,
one per layer, each reading ``past_key_values.{i}.key|value`` and producing
``present.{i}.key|value``; else :class:`PassError`)::

    inputs   input_ids [batch, seq] int64, position_ids [batch, seq] int64,
             seqlens_k [batch] int32              (per row: valid KV length after this call − 1)
             total_sequence_length [] int32       (see below; a CPU input of the CUDA kernel)
             past_key_values.{i}.key|value [batch, kv_heads, max_context, head_dim]
    outputs  logits [batch, seq, vocab],
             present.{i}.key|value [batch, kv_heads, max_context, head_dim]   (same buffers)

* GQA's ``seqlens_k`` / ``total_sequence_length`` inputs (which :mod:`passes.rule_gqa` derived
  from the mask's shape, with the padding in ``attention_bias``) become graph inputs and the
  ``attention_bias`` input is dropped. Every GQA sees the same two tensors.
* ``attention_mask`` leaves the graph once nothing reads it (the mask construction goes dead
  with ``attention_bias``); if anything still reads it, or reads the past KV tensors other than
  the GQA (e.g. a ``Shape`` feeding positions), the pass refuses: those would see the buffer
  length instead of the past length.
* ``max_context`` is a symbolic axis: the runtime chooses the buffer length (≤ the manifest's
  ``kv.max_context``). With ``past`` and ``present`` bound to the same memory, GQA writes the new
  K/V at row offset ``seqlens_k − seq + 1`` and reads ``[0, seqlens_k]``; nothing is copied.

Two more rewrites ride on the contract (both CUDA-graph friendly, both what onnxruntime-genai
builds): q/k rotary folded into GQA (:func:`_fold_rotary_into_gqa`) and q/k/v computed by one
packed projection (:func:`_pack_qkv`). The manifest's ``passes`` records how many of each fired.

GQA length semantics (onnxruntime ``group_query_attention_helper.h``): ``seqlens_k[b]`` is the
row's total valid length − 1; a call with ``seq == total_sequence_length`` is a first prompt
(past ignored); a call with ``seq == 1`` and ``total_sequence_length != 1`` is a decode step whose
past length per row is ``seqlens_k[b]``; ``seq > 1`` with past needs batch 1. So rows are
right-aligned at position 0 of their buffer row, prompts are prefilled with
``total_sequence_length == seq`` (rows of equal length together), and decode steps pass a
constant ``total_sequence_length`` (the buffer length, as onnxruntime-genai does under CUDA
graphs, where it is ``Shape(attention_mask)[1]`` of a max-length mask): the CUDA kernel reads it
on the host, so it must not change between CUDA-graph replays; the per-row lengths live in
``seqlens_k`` on the device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from runtime.artifact import Artifact, TensorSpec
from runtime.decoder_io import SEQLENS_K, TOTAL_SEQUENCE_LENGTH, DecoderIO
from runtime.errors import PassError

__all__ = ["SharedBuffer", "SEQLENS_K", "TOTAL_SEQUENCE_LENGTH", "shared_buffer_blockers", "share_kv_buffers",
           "rewrite_shared_buffer", "compare_shared"]

log = logging.getLogger(__name__)

_ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedAttention",
                  "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention")
_GQA_SEQLENS, _GQA_TOTAL, _GQA_BIAS = 5, 6, 10
_DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.INT64: "int64",
                ir.DataType.INT32: "int32", ir.DataType.BFLOAT16: "bfloat16"}


@dataclasses.dataclass(frozen=True)
class SharedBuffer:
    """What :func:`rewrite_shared_buffer` did, for the manifest."""

    layers: int
    kv_dtype: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    casts_removed: int
    rotary_folded: int = 0
    qkv_packed: int = 0

    def io_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    def reference_io(self) -> dict[str, list[tuple[str, str, int]]]:
        """In the shape of :func:`passes.pipeline.graph_io` (name, onnx-ir dtype name, rank)."""
        names = {v: k.name.lower() for k, v in _DTYPE_NAMES.items()}
        return {side: [(t.name, names[t.dtype], len(t.shape)) for t in specs]
                for side, specs in (("inputs", self.inputs), ("outputs", self.outputs))}


def _attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph.all_nodes() if n.domain == "com.microsoft" and n.op_type in _ATTENTION_OPS]


def shared_buffer_blockers(model: ir.Model, layers: int) -> list[str]:
    """Why this graph cannot take the shared-buffer contract (empty: it can)."""
    nodes = _attention_nodes(model)
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    reasons = []
    other = sorted({n.op_type for n in nodes if n.op_type != "GroupQueryAttention"})
    if other:
        reasons.append(f"attention fused to {', '.join(other)}, not GroupQueryAttention")
    if len(gqa) != layers:
        reasons.append(f"{len(gqa)} GroupQueryAttention node(s) for {layers} layers")
    names = {v.name for v in model.graph.inputs}
    if "position_ids" not in names:
        reasons.append("no position_ids input (rotary positions must come from the caller)")
    return reasons


def _local_window(arch: dict[str, Any], layer: int) -> int | None:
    """GroupQueryAttention's ``local_window_size`` for ``layer``, or None for a global layer.

    With the concat contract the window lives in ``attention_bias`` (the model's own mask); the
    shared-buffer contract drops that input, so the window must move into the op, as
    ``local_window_size = sliding_window`` (what onnxruntime-genai's builder writes too; the test
    of greedy ids against transformers past the window fails with ``sliding_window − 1``). A layer
    is windowed when the manifest records ``sliding_window`` and its ``layer_types`` entry (if any)
    is ``sliding_attention``.
    """
    window = arch.get("sliding_window")
    layer_types = arch.get("layer_types")
    if not window or (layer_types and layer_types[layer] != "sliding_attention"):
        return None
    return int(window)


def _batch_from_input_ids(past: ir.Value, input_ids: ir.Value) -> int:
    """Point ``Shape(past)[0:1]`` readers (of the past, or of its fp16 ``Cast``) at ``input_ids``
    instead; returns how many.

    torch.export materialises the symbolic batch size from whichever input carries it, and for
    some families (Mixtral, Qwen3, Gemma 3) that is a past KV tensor. Its batch axis is the call's
    batch in both contracts, but the past must have no reader besides its GroupQueryAttention
    (the checks below), so the batch is read from ``input_ids``, which has the same batch axis.
    """
    moved = 0
    for use in list(past.uses()):
        node = use.node
        if node.op_type == "Shape" and node.domain == "" and node.attributes.get_int("start", 0) == 0 \
                and node.attributes.get_int("end", -1) == 1:
            node.replace_input_with(use.idx, input_ids)
            moved += 1
    return moved


def _cast_between(value: ir.Value) -> ir.Node | None:
    """The Cast node that is ``value``'s only consumer (fp16 keep_io_types wrapping), if any."""
    uses = list(value.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Cast" and uses[0].node.domain == "":
        return uses[0].node
    return None


def _inv_freq(value: ir.Value) -> np.ndarray | None:
    """The constant inverse frequencies behind a cos/sin cache: walk up ``Cast``/``Cos``/``Sin``
    to the ``MatMul``/``Mul`` of positions × ``inv_freq`` and return ``inv_freq`` as ``[E]``."""
    node = value.producer()
    for _ in range(8):
        if node is None or node.op_type not in ("Cast", "Cos", "Sin"):
            break
        upstream = node.inputs[0]
        node = upstream.producer() if upstream is not None else None
    if node is None or node.op_type not in ("MatMul", "Mul"):
        return None
    for operand in node.inputs:
        if operand is not None and operand.const_value is not None:
            freq = operand.const_value.numpy().astype(np.float64).reshape(-1)
            if freq.size > 1:
                return freq
    return None


def _constant_rotary_cache(graph: ir.Graph, cos: ir.Value | None, sin: ir.Value | None, rows: int,
                           made: dict[int, tuple[ir.Value, ir.Value]]) -> tuple[ir.Value, ir.Value] | None:
    """cos/sin caches with at least ``rows`` positions as initializers.

    Already-constant caches of enough rows are kept. A cache computed at run time — onnxscript's
    ``CosSinCacheFusion`` builds ``Cos(Range(0, max(position_ids) + 1) × inv_freq)``, sized by the
    largest position *of this call* — is replaced by a table of ``rows`` positions: GQA checks
    ``cos_cache`` rows ≥ ``total_sequence_length`` (the buffer length in decode), and the Range /
    ReduceMax on int64 would also pin nodes to the CPU and rule out CUDA-graph capture.
    """
    if cos is None or sin is None:
        return None
    if cos.const_value is not None and sin.const_value is not None and cos.shape is not None \
            and isinstance(cos.shape[0], int) and cos.shape[0] >= rows:
        return cos, sin
    if id(cos) in made:
        return made[id(cos)]
    freq = _inv_freq(cos)
    if rows <= 0 or freq is None or _inv_freq(sin) is None:
        return None
    dtype = cos.dtype.numpy() if cos.dtype is not None else np.float32
    angles = np.arange(rows, dtype=np.float64).reshape(-1, 1) * freq.reshape(1, -1)
    out = []
    for name, fn in (("cos", np.cos), ("sin", np.sin)):
        table = fn(angles).astype(dtype)
        value = ir.Value(name=f"rotary_{name}_cache_{len(made)}", shape=ir.Shape(table.shape),
                         type=ir.TensorType(cos.dtype or ir.DataType.FLOAT), const_value=ir.tensor(table))
        graph.register_initializer(value)
        out.append(value)
    made[id(cos)] = (out[0], out[1])
    return made[id(cos)]


def _fold_rotary_into_gqa(graph: ir.Graph, gqa_nodes: list[ir.Node], position_ids: ir.Value | None,
                          max_context: int) -> int:
    """Move the rotary embedding of q and k into GroupQueryAttention (``do_rotary=1``).

    Matches, for each GQA::

        linear_q ── RotaryEmbedding(·, position_ids, cos[P, D/2], sin[P, D/2]) ── GQA.query
        linear_k ── RotaryEmbedding(·, position_ids, cos,         sin        ) ── GQA.key

    and rewrites it to ``GQA(linear_q, linear_k, …, cos_cache=cos, sin_cache=sin, do_rotary=1)``,
    the graph onnxruntime-genai builds. In the shared-buffer contract rows start at position 0 of
    their buffer, so GQA's own positions (0…S−1 for a prompt, ``seqlens_k`` for a decode step)
    are the rows' positions and ``position_ids`` is no longer needed by attention. This is what
    makes the decode step CUDA-graph friendly (one kernel instead of two rotary launches a layer)
    and what the CUDA kernel's cache checks expect (``cos_cache`` rows ≥ ``total_sequence_length``,
    the buffer length). Returns how many GQA nodes were folded; a GQA whose inputs do not match
    stays as it is (rotary applied outside, still correct).
    """
    folded = 0
    made: dict[int, tuple[ir.Value, ir.Value]] = {}
    for node in gqa_nodes:
        q_rot = node.inputs[0].producer() if node.inputs[0] is not None else None
        k_rot = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
        rots = [
            r
            for r in (q_rot, k_rot)
            if r is not None and r.op_type == "RotaryEmbedding" and r.domain == "com.microsoft"
        ]
        if len(rots) != 2:
            continue
        q_rot, k_rot = rots
        same_cache = q_rot.inputs[2] is k_rot.inputs[2] and q_rot.inputs[3] is k_rot.inputs[3]
        plain = all(r.attributes.get_int("interleaved", 0) == 0 and r.attributes.get_int("rotary_embedding_dim", 0) == 0
                    and r.inputs[1] is position_ids for r in rots)
        if not (same_cache and plain) or any(len(list(r.outputs[0].uses())) != 1 for r in rots):
            continue
        cache = _constant_rotary_cache(graph, q_rot.inputs[2], q_rot.inputs[3], max_context, made)
        if cache is None:
            continue
        cos_cache, sin_cache = cache
        half = cos_cache.shape[1] if cos_cache.shape is not None and cos_cache.shape.rank() == 2 else None
        if not isinstance(half, int) or (2 * half) % 16:
            continue  # GQA's rotary needs head_size % 16 == 0
        if len(node.inputs) < 9:
            node.resize_inputs(9)
        node.replace_input_with(0, q_rot.inputs[0])
        node.replace_input_with(1, k_rot.inputs[0])
        node.replace_input_with(7, cos_cache)
        node.replace_input_with(8, sin_cache)
        node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)
        node.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", 0)
        folded += 1
    return folded


def _projection(value: ir.Value | None, node: ir.Node) -> tuple[ir.Node, ir.Node | None] | None:
    """``value``'s producer as a weight projection read only by ``node``: ``MatMul(x, W)`` or
    ``MatMulNBits(x, B, scales[, zero_points])`` with constant weights, optionally followed by
    ``Add(·, bias)`` with a constant bias. Returns (projection, bias Add or None)."""
    if value is None or len(list(value.uses())) != 1:
        return None
    bias_add = None
    producer = value.producer()
    if producer is not None and producer.op_type == "Add" and producer.domain == "":
        bias = [v for v in producer.inputs if v is not None and v.const_value is not None]
        inner = [v for v in producer.inputs if v is not None and v.const_value is None]
        if len(bias) != 1 or len(inner) != 1 or len(list(inner[0].uses())) != 1:
            return None
        bias_add, producer = producer, inner[0].producer()
    if producer is None:
        return None
    if producer.op_type == "MatMul" and producer.domain == "" and producer.inputs[1] is not None \
            and producer.inputs[1].const_value is not None and producer.inputs[1].shape is not None \
            and producer.inputs[1].shape.rank() == 2:
        return producer, bias_add
    if producer.op_type == "MatMulNBits" and producer.domain == "com.microsoft" \
            and all(v is not None and v.const_value is not None for v in producer.inputs[1:]) \
            and len(producer.inputs) <= 4:
        return producer, bias_add
    return None


def _concat_rows(graph: ir.Graph, values: list[ir.Value], counts: list[int], name: str) -> ir.Value:
    """Initializers whose leading ``counts[i]`` rows (N-major) are concatenated, same layout."""
    arrays = [v.const_value.numpy() for v in values]  # type: ignore[union-attr]
    flat = [a.reshape(n, -1) for a, n in zip(arrays, counts)]
    joined = np.concatenate(flat, axis=0)
    first = arrays[0]
    joined = joined.reshape(-1) if first.ndim == 1 else joined.reshape((sum(counts), *first.shape[1:]))
    out = ir.Value(name=name, shape=ir.Shape(joined.shape), type=ir.TensorType(values[0].dtype),  # type: ignore[arg-type]
                   const_value=ir.tensor(joined))
    graph.register_initializer(out)
    return out


def _split_qkv(node: ir.Node) -> ir.Value | None:
    """The packed q|k|v a GQA's three inputs were split from: they are outputs 0, 1, 2 of one
    ``Split`` on the last axis with three outputs (the CPU's fused projection,
    :mod:`passes.fuse_projections`, with the int4 grid's offsets added before the split)."""
    values = list(node.inputs[:3])
    split = values[0].producer() if values[0] is not None else None
    if split is None or split.op_type != "Split" or split.domain != "" or len(split.outputs) != 3 \
            or any(v is None or v.producer() is not split or v.index() != i or len(list(v.uses())) != 1
                   for i, v in enumerate(values)):
        return None
    packed = split.inputs[0]
    shapes = [v.shape for v in (packed, *values) if v is not None and v.shape is not None]
    axis = split.attributes.get_int("axis", 0)
    if packed is None or not (axis == -1 or (shapes and axis == shapes[0].rank() - 1)):
        return None
    return packed


def _pack_qkv(graph: ir.Graph, gqa_nodes: list[ir.Node]) -> int:
    """One projection for q, k and v of each rotary-folded GroupQueryAttention (packed QKV).

    Matches, for a GQA that already applies its own rotary (``do_rotary=1``)::

        x ── MatMul(·, Wq) [── Add(·, bq)] ── GQA.query
        x ── MatMul(·, Wk) [── Add(·, bk)] ── GQA.key
        x ── MatMul(·, Wv) [── Add(·, bv)] ── GQA.value

    (or the same with ``MatMulNBits``, equal ``K``/``bits``/``block_size``/``accuracy_level``), and
    rewrites it to ``GQA(MatMul(x, [Wq | Wk | Wv]) [+ [bq | bk | bv]], key=∅, value=∅)``: GQA's
    packed-QKV form, the one onnxruntime-genai builds. Inputs already split from one projection
    (:func:`_split_qkv`) are replaced by what was split. Two fewer GEMM launches a layer, which at
    batch 1 are launch-bound (a small GEMV costs a launch, not its arithmetic). MatMulNBits
    stores ``B``, ``scales`` and packed ``zero_points`` N-major, so they concatenate by rows.
    onnxscript's ``ort_fusions`` has no such rule for GQA (its packed-QKV handling is for
    ``MultiHeadAttention`` inputs); the columns are computed exactly as before.
    Returns how many GQA nodes were packed.
    """
    packed = 0
    for node in gqa_nodes:
        if node.attributes.get_int("do_rotary", 0) != 1 or len(node.inputs) < 3:
            continue
        split = _split_qkv(node)
        if split is not None:  # already one projection: GQA reads what the Split split
            node.replace_input_with(0, split)
            node.replace_input_with(1, None)
            node.replace_input_with(2, None)
            packed += 1
            continue
        found = [_projection(node.inputs[i], node) for i in range(3)]
        if any(f is None for f in found):
            continue
        projections = [f[0] for f in found]  # type: ignore[index]
        biases = [f[1] for f in found]  # type: ignore[index]
        x = projections[0].inputs[0]
        if x is None:
            continue
        kinds = {(p.op_type, tuple(sorted((k, str(a.value)) for k, a in p.attributes.items() if k != "N")))
                 for p in projections}
        if len(kinds) != 1 or any(p.inputs[0] is not x for p in projections) \
                or (any(b is None for b in biases) and any(b is not None for b in biases)):
            continue
        tag = f"qkv_{packed}_{node.name}"
        if projections[0].op_type == "MatMul":
            weights = [p.inputs[1] for p in projections]
            if any(w is None or w.const_value is None or w.dtype is None for w in weights):
                continue
            arrays = [w.const_value.numpy() for w in weights if w is not None and w.const_value is not None]
            counts = [int(a.shape[1]) for a in arrays]
            joined = np.concatenate(arrays, axis=1)
            w_value = ir.Value(name=f"{tag}_weight", shape=ir.Shape(joined.shape),
                               type=ir.TensorType(ir.DataType.from_numpy(joined.dtype)), const_value=ir.tensor(joined))
            graph.register_initializer(w_value)
            fused = ir.node("MatMul", [x, w_value], name=f"{tag}_matmul")
        else:
            counts = [p.attributes.get_int("N") for p in projections]
            operands = [x] + [_concat_rows(graph, [p.inputs[i] for p in projections], counts, f"{tag}_{i}")  # type: ignore[misc]
                              for i in range(1, len(projections[0].inputs))]
            attrs = {k: a for k, a in projections[0].attributes.items()}
            attrs["N"] = ir.AttrInt64("N", sum(counts))
            fused = ir.node(
                "MatMulNBits", operands, attributes=attrs, domain="com.microsoft", name=f"{tag}_matmulnbits"
            )
        graph.insert_before(projections[0], fused)
        out = fused.outputs[0]
        out.dtype = projections[0].outputs[0].dtype  # type: ignore[assignment]  # onnx-ir's setter takes None
        if x.shape is not None:
            out.shape = ir.Shape([*list(x.shape)[:-1], sum(counts)])
        if biases[0] is not None:
            consts = [next(v for v in b.inputs if v is not None and v.const_value is not None) for b in biases]  # type: ignore[union-attr]
            bias = _concat_rows(graph, consts, counts, f"{tag}_bias")
            add = ir.node("Add", [out, bias], name=f"{tag}_bias_add")
            graph.insert_before(projections[0], add)
            add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape  # type: ignore[assignment]
            out = add.outputs[0]
        node.replace_input_with(0, out)
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        packed += 1
    return packed


def rewrite_shared_buffer(model: ir.Model, arch: dict[str, Any], kv: dict[str, str]) -> SharedBuffer:
    """Rewrite ``model`` (in place) to the shared-buffer contract; see the module docstring."""
    layers = int(arch["layers"])
    blockers = shared_buffer_blockers(model, layers)
    if blockers:
        raise PassError(
            f"kv_mode 'shared-buffer' needs every attention fused to com.microsoft.GroupQueryAttention "
            f"({'; '.join(blockers)})",
            expected=f"{layers} GroupQueryAttention nodes (Llama family: llama, mistral, qwen2, smollm2)",
            fix="optimize with --kv-mode concat (or for --device cpu) for this architecture",
        )
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    kv_heads, head_dim = int(arch["kv_heads"]), int(arch["head_dim"])

    seqlens = ir.Value(name=SEQLENS_K, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(["batch"]))
    total = ir.Value(name=TOTAL_SEQUENCE_LENGTH, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([]))
    gqa_nodes = [n for n in graph.all_nodes() if n.op_type == "GroupQueryAttention"]
    for node in gqa_nodes:
        node.replace_input_with(_GQA_SEQLENS, seqlens)
        node.replace_input_with(_GQA_TOTAL, total)
        if len(node.inputs) > _GQA_BIAS and node.inputs[_GQA_BIAS] is not None:
            node.replace_input_with(_GQA_BIAS, None)
    rotary_folded = _fold_rotary_into_gqa(
        graph, gqa_nodes, inputs.get("position_ids"), int(arch.get("max_context") or 0)
    )
    common_passes.RemoveUnusedNodesPass()(model)  # the folded RotaryEmbedding nodes still read q and k
    qkv_packed = _pack_qkv(graph, gqa_nodes)

    casts_removed = 0
    kv_dtype: ir.DataType | None = None
    past_names, present_names = [], []
    for i in range(layers):
        for slot, (past_t, present_t) in enumerate(((kv["past_key"], kv["present_key"]),
                                                     (kv["past_value"], kv["present_value"]))):
            past_name, present_name = past_t.format(i=i), present_t.format(i=i)
            past, present = inputs.get(past_name), outputs.get(present_name)
            if past is None or present is None:
                raise PassError(f"shared-buffer: graph lacks {past_name} or {present_name}",
                                fix="optimize the artifact `lmforge convert` wrote")
            # present: GQA output (1 or 2), possibly through one Cast
            producer = present.producer()
            gqa_out: ir.Value | None = present
            if producer is not None and producer.op_type == "Cast":
                gqa_out = producer.inputs[0]
                producer = gqa_out.producer() if gqa_out is not None else None
            if (
                producer is None
                or gqa_out is None
                or producer.op_type != "GroupQueryAttention"
                or gqa_out is not producer.outputs[1 + slot]
            ):
                raise PassError(f"shared-buffer: {present_name} is not produced by a GroupQueryAttention",
                                fix="this graph's attention is not fused; optimize with --kv-mode concat")
            node = producer
            window = _local_window(arch, i)
            if window is not None:
                node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", window)
            # past: GQA input (3 or 4), possibly through one Cast; nothing else may read it
            common_passes.RemoveUnusedNodesPass()(model)
            _batch_from_input_ids(past, inputs["input_ids"])
            cast = _cast_between(past)
            fed = cast.outputs[0] if cast is not None else past
            _batch_from_input_ids(fed, inputs["input_ids"])  # fp16: the batch may be read after the Cast
            uses = list(fed.uses())
            if len(uses) != 1 or uses[0].node is not node or uses[0].idx != 3 + slot or len(list(past.uses())) != 1:
                readers = sorted({f"{u.node.op_type}" for u in past.uses()})
                raise PassError(
                    f"shared-buffer: {past_name} is read by more than its GroupQueryAttention ({readers})",
                    expected="the past KV read by GroupQueryAttention only "
                    "(its length is the buffer's, not the past's)",
                    fix="optimize with --kv-mode concat; report the graph",
                )
            dtype = gqa_out.dtype
            if cast is not None:
                node.replace_input_with(3 + slot, past)
                casts_removed += 1
            if gqa_out is not present:
                present.name = f"{present_name}__cast_unused"
                idx = [o.name for o in graph.outputs].index(present.name)
                graph.outputs[idx] = gqa_out
                gqa_out.name = present_name
                casts_removed += 1
            past.dtype = dtype  # type: ignore[assignment]  # onnx-ir's setter takes None
            shape = ir.Shape(["batch", kv_heads, "max_context", head_dim])
            past.shape = shape
            gqa_out.shape = ir.Shape(["batch", kv_heads, "max_context", head_dim])
            if kv_dtype is not None and dtype != kv_dtype:
                raise PassError("shared-buffer: KV dtypes differ across layers", got=f"{kv_dtype} and {dtype}",
                                fix="report the graph")
            kv_dtype = dtype
            past_names.append(past_name)
            present_names.append(present_name)

    common_passes.RemoveUnusedNodesPass()(model)
    mask = inputs.get("attention_mask")
    if mask is not None and list(mask.uses()):
        readers = sorted({u.node.op_type for u in mask.uses()})
        raise PassError(
            "shared-buffer: attention_mask is still read after GroupQueryAttention took over the lengths",
            expected="attention_mask read only by the mask construction for attention_bias",
            got=f"read by {readers}",
            fix="optimize with --kv-mode concat for this graph",
        )
    new_inputs = [inputs["input_ids"], inputs["position_ids"], seqlens, total] + [inputs[n] for n in past_names]
    extra = [v for v in graph.inputs if v.name not in {"attention_mask", *(v.name for v in new_inputs)}]
    if extra:
        raise PassError("shared-buffer: unexpected graph inputs", got=str([v.name for v in extra]),
                        fix="optimize the artifact `lmforge convert` wrote")
    graph.inputs.clear()
    graph.inputs.extend(new_inputs)
    common_passes.RemoveUnusedNodesPass()(model)

    def spec(v: ir.Value) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) else str(d) for d in (v.shape or ir.Shape([])))
        return TensorSpec(str(v.name), _DTYPE_NAMES[v.dtype], dims)  # type: ignore[index]

    result = SharedBuffer(layers=layers, kv_dtype=_DTYPE_NAMES[kv_dtype],  # type: ignore[index]
                          inputs=[spec(v) for v in graph.inputs], outputs=[spec(v) for v in graph.outputs],
                          casts_removed=casts_removed, rotary_folded=rotary_folded, qkv_packed=qkv_packed)
    log.info("shared-buffer KV: %d layers, KV %s, %d casts removed, rotary folded into %d GQA, QKV packed in %d",
             layers, result.kv_dtype, casts_removed, rotary_folded, qkv_packed)
    return result


def _load_deduplicated(model_path: Path) -> ir.Model:
    """``ir.load``, first dropping exact duplicate nodes.

    ``onnxruntime.transformers.float16.convert_float_to_float16`` inserts one ``Cast`` per
    blocked consumer under the same output name when a value feeds two blocked ops (Llama: the
    embedding feeds the first RMSNorm and the first SkipRMSNorm), which onnx-ir rightly refuses
    as a redeclared value. The duplicates are identical (same op, inputs, output, attributes).
    """
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    seen: dict[str, bytes] = {}
    keep = []
    for node in proto.graph.node:
        key = node.SerializeToString()
        if node.output and all(o in seen for o in node.output if o):
            if all(seen[o] == key for o in node.output if o):
                continue  # an exact duplicate
            raise PassError(f"{model_path.name}: value {node.output[0]!r} is produced by two different nodes",
                            fix="report the graph")
        for o in node.output:
            if o:
                seen[o] = key
        keep.append(node)
    if len(keep) != len(proto.graph.node):
        log.info("dropped %d duplicate node(s) from %s", len(proto.graph.node) - len(keep), model_path.name)
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    model = ir.serde.deserialize_model(proto)
    from onnx_ir import external_data as _external_data

    _external_data.set_base_dir(model.graph, str(model_path.parent))  # as ir.load does
    return model


def share_kv_buffers(model_path: Path, arch: dict[str, Any], kv: dict[str, str]) -> SharedBuffer:
    """Rewrite the model file at ``model_path`` (+ ``.data``) to the shared-buffer contract."""
    model = _load_deduplicated(model_path)
    result = rewrite_shared_buffer(model, arch, kv)
    data_name = model_path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".shared-", dir=model_path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / model_path.name
        ir.save(model, str(tmp), external_data=data_name)
        del model
        os.replace(tmp, model_path)
        os.replace(tmp.with_name(data_name), model_path.with_name(data_name))
    return result


# --------------------------------------------------------------------------------------------
# --check for a shared-buffer candidate


def _run_shared(art: Artifact, model: Path) -> dict[str, np.ndarray]:
    """The check cases of :mod:`passes.check`, run through the shared-buffer contract on CPU.

    Row 1 of the check batch is left-padded there; here it is its unpadded tokens, prefilled on
    its own; logits land at the positions the reference uses.
    """
    import onnxruntime as ort

    from passes.check import check_session, decoder_cases

    session: ort.InferenceSession = check_session(model)
    io = DecoderIO.from_artifact(art)
    (_, feeds, valid), = decoder_cases(art)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    batch, seq = ids.shape
    capacity = seq + 4
    outputs = [o.name for o in session.get_outputs()]
    prefill = np.zeros((batch, seq, io.vocab), dtype=np.float32)
    buffers = io.empty_kv(batch, capacity)
    lengths = mask.sum(axis=1)
    for b in range(batch):
        n = int(lengths[b])
        feed = io.shared_feeds(ids[b:b + 1, seq - n:], np.arange(n, dtype=np.int64)[None], np.array([n - 1]), n,
                               {k: v[b:b + 1] for k, v in buffers.items()}, capacity=capacity)
        out = dict(zip(outputs, session.run(None, feed)))
        prefill[b, seq - n:] = out["logits"][0].astype(np.float32)
        for p, q in io.kv_pairs:
            buffers[p][b] = out[q][0]
    next_ids = np.array([[7], [11]], dtype=np.int64)
    feed = io.shared_feeds(next_ids, lengths[:, None], lengths, capacity, buffers)
    out = dict(zip(outputs, session.run(None, feed)))
    return {"prefill": prefill, "decode": out["logits"].astype(np.float32)}


def compare_shared(reference: Artifact, candidate: Artifact, candidate_model: Path, precision: str) -> Any:
    """:func:`passes.check.compare_artifacts` for a shared-buffer candidate (same cases, same policy)."""
    from passes import check

    try:
        ref = check._run_decoder(reference, reference.model_path)
        got = _run_shared(candidate, candidate_model)
    except Exception as exc:  # any ORT failure means the optimized graph is unusable
        raise PassError(
            f"--check: the shared-buffer graph does not run in onnxruntime ({type(exc).__name__}: {exc})",
            fix="optimize with --kv-mode concat to isolate it, and report it; nothing was written",
        ) from exc
    return check.judge(reference, ref, got, precision)
