"""Precision passes on a saved ONNX file: ``int8`` / ``int4`` weight quantization and ``fp16``.

These wrap ``onnxruntime.quantization`` and ``onnxruntime.transformers.float16``; nothing here is
lmforge's own arithmetic. Each returns a :class:`Quantized` record for the manifest: what was
converted, with what settings, and what was left in higher precision.

* ``int8`` on CPU: ``MatMulNBitsQuantizer`` with ``bits=8``, symmetric blocks of
  :data:`INT8_CPU_BLOCK_SIZE` (16) along K with fp32 scales, ``accuracy_level=4``: inside each
  ``MatMulNBits`` call the activations are quantized to int8 with one scale per *row* and block
  (MLAS ``CompInt8``), so a row's result never depends on the other rows of the batch. On CUDA,
  weight-only 8-bit ``MatMulNBits`` on an fp16 graph (CUDA has no fast ``MatMulInteger``).
* ``int4``: ``MatMulNBitsQuantizer``, blocks of 32; on CPU ``accuracy_level=4`` (the same int8
  activations inside the kernel — the fast path of ORT's MLAS NBits GEMM).
* ``fp16``: ``convert_float_to_float16`` with graph IO kept as it was (int64 ids, fp32 KV and
  logits; the casts sit inside the graph) and normalizations / softmax kept in fp32.

The lm head (the ``MatMul``/``Gemm`` producing ``logits``) stays in the base precision when
``keep_lm_head`` is set (the CUDA default). ``optimize --device cpu`` quantizes it (a tied head
through its own copy, :mod:`passes.lm_head`) to 8 bits in blocks of 32 at int8 *and* int4: in
fp32 it was the largest single node of a CPU decode step, and at 8 bits the int8 artifact still
passes the int8 policy on the 61 default prompts (docs/benchmarks.md, "CPU: decode against the
peers"). There, projections that read the same input are fused first
(:mod:`passes.fuse_projections`), and int4 weights already on a Q4_1 grid keep it exactly
(:func:`passes.grid_int4.grid_quantize_cpu`).

Why this int8 recipe on CPU (8-bit ``MatMulNBits``, blocks of 16, accuracy level 4: int8
activations per row and block): of the variants measured on SmolLM2-135M — their error against
the reference, smoke verify and speed are in docs/benchmarks.md, "CPU: fused, shared-buffer, int8
and int4 artifacts" — it is the one that passes the int8 policy at a speed-up over fp32:

* ``quantize_dynamic`` quantizes each activation tensor with *one* uint8 scale per call, so the
  largest value anywhere in the tensor sets the step for every channel and token (12× the error
  of per-row blocks of 16), and the scale spans the whole batch, so a row's tokens change with
  what it is batched with.
* Keeping one projection type fp32 (q, k, v, o, gate, up or down, each over all 30 layers) moves
  the b32 error only from 0.119 to 0.10–0.117: no projection is the sensitive one, the error is
  spread evenly, so excluding layers costs speed without buying parity.
* Weight-only 8-bit (accuracy level 0–2) is the most accurate but MLAS has no fast kernel for it
  on x64: it dequantizes the weights on every call, slower than fp32.
* Blocks of 16 instead of 32 halve the span of each activation (and weight) scale; that costs
  some speed and cuts the error by a quarter. On the 61 default prompts: b16 39 exact,
  22 near-ties, 0 drift; b32 34 / 27 / 0 (``docs/benchmarks.md`` has both runs).
* Quantizing the lm head too (8-bit, after untying it from the embedding) raises the error a
  little; it is the CPU default since the step's profile showed the fp32 head as its largest
  node, and the artifact still passes verify's default set (a 4-bit head does not).
* Blocks of 32 for the body (with the 8-bit head) have a larger logit error and real
  batch-parity mismatches, which fail verify; blocks of 16 stay. (Numbers: docs/benchmarks.md,
  "CPU: decode against the peers".)

Activation quantization is a discontinuous function, so even a row-independent kernel does not
make the *model* batch-independent: the fp32 ``GroupQueryAttention`` result of a left-padded row
differs from the same row alone by ~1e-7 (summation order), and wherever that moves an activation
across an int8 rounding boundary the difference grows to ~0.5 logits. ``verify``'s batch-parity
check therefore sees near-tie flips between a batch and one-by-one for any activation-quantized
graph (dynamic or MatMulNBits); only the weight-only kernels avoid it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import onnx

from passes.encoder_int8 import is_encoder_graph, quantize_encoder_int8
from passes.fuse_projections import fuse_shared_input_matmuls, name_silu_gates
from passes.grid_int4 import grid_quantize, grid_quantize_cpu
from passes.lm_head import untie_lm_head

__all__ = ["Quantized", "PRECISIONS", "INT8_CPU_METHODS", "INT8_CPU_BLOCK_SIZE", "CPU_HEAD_BITS",
           "CPU_HEAD_BLOCK_SIZE", "quantize_file", "lm_head_nodes", "drop_duplicate_nodes"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
# A MatMul whose constant operand has fewer rows than this is arithmetic (the rotary
# positions × inv_freq[1, E] product), not a layer: never quantized.
_MIN_WEIGHT_ROWS = 16
INT8_CPU_METHODS = ("nbits", "dynamic")
INT8_CPU_BLOCK_SIZE = 16
CPU_HEAD_BITS = 8
CPU_HEAD_BLOCK_SIZE = 32

# Ops kept in fp32 by the fp16 conversion: statistics of norms, softmax, and rotary/attention
# kernels whose fp16 CPU variants do not exist.
_FP16_KEEP_FP32 = [
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
    "SkipLayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Range",
    "CumSum", "Cos", "Sin",
]
# On CUDA the fused norms run in fp16 with their statistics accumulated in fp32 inside ORT's
# kernels (LayerNorm's U type is float), so blocking them would only add two Casts per norm on the
# hot path; the unfused pieces and the rotary/position arithmetic still stay fp32.
_FP16_KEEP_FP32_CUDA = [op for op in _FP16_KEEP_FP32 if "LayerNormalization" not in op]


@dataclasses.dataclass(frozen=True)
class Quantized:
    """What a precision pass did, for the manifest's ``quantization`` entry."""

    method: str
    settings: dict[str, Any]
    converted_nodes: int
    kept: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lm_head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm/FusedMatMul(/MatMulNBits) nodes whose output (through reshapes) becomes ``logits``.

    With tied embeddings the head is a ``FusedMatMul`` (``transB``) of the embedding table, which
    neither quantizer touches; it is listed so the manifest says it stayed fp32.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    found: list[str] = []
    frontier = [o.name for o in model.graph.output if o.name == "logits"]
    seen: set[str] = set()
    while frontier:
        name = frontier.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits"):
            found.append(node.name)
        elif node.op_type in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Transpose", "Add"):
            frontier.extend(i for i in node.input[:1] if i)
    return found


def drop_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes that repeat an earlier node exactly (op, domain, inputs, outputs, attributes).

    ``convert_float_to_float16`` inserts one ``Cast`` per blocked consumer under the same output
    name when a value feeds two blocked ops (Llama: the embedding feeds the first RMSNorm and the
    first SkipRMSNorm); onnx-ir and the checker rightly refuse a value produced twice. Two
    *different* producers of one value are a real bug and raise.
    """

    def key(node: onnx.NodeProto) -> bytes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = ""
        return copy.SerializeToString()

    seen: dict[str, bytes] = {}
    keep: list[onnx.NodeProto] = []
    for node in model.graph.node:
        k = key(node)
        outputs = [o for o in node.output if o]
        if outputs and all(o in seen for o in outputs):
            if all(seen[o] == k for o in outputs):
                continue
            raise ValueError(f"value {outputs[0]!r} is produced by two different nodes")
        for o in outputs:
            seen[o] = k
        keep.append(node)
    dropped = len(model.graph.node) - len(keep)
    if dropped:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        log.info("dropped %d duplicate node(s) written by the fp16 conversion", dropped)
    return dropped


def _count(model: onnx.ModelProto, op_types: tuple[str, ...]) -> int:
    return sum(1 for n in model.graph.node if n.op_type in op_types)


def _ensure_names(model: onnx.ModelProto) -> None:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def _quantize_dynamic_int8(model: onnx.ModelProto, dst: Path, head: list[str]) -> Quantized:
    """The former CPU int8 default, kept for measurements (``int8_cpu_method="dynamic"``): see the
    module docstring for why it is no longer the default."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    before = _count(model, ("MatMul", "Gemm"))
    tmp = dst.with_name(dst.stem + ".named.onnx")
    onnx.save(model, str(tmp), save_as_external_data=True, location=tmp.name + ".data")
    quantize_dynamic(
        tmp, dst, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=False,
        weight_type=QuantType.QInt8, nodes_to_exclude=head, use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )
    tmp.unlink()
    (tmp.parent / (tmp.name + ".data")).unlink()
    out = onnx.load(str(dst), load_external_data=False)
    converted = before - _count(out, ("MatMul", "Gemm"))
    return Quantized("onnxruntime.quantization.quantize_dynamic",
                     {"weight_type": "QInt8", "per_channel": True, "op_types": ["MatMul", "Gemm"],
                      "activations": "dynamic uint8, one scale per tensor per call"}, converted, head)


def quantize_file(src: Path, dst: Path, precision: str, device: str, keep_lm_head: bool = True,
                  block_size: int | None = None, symmetric: bool = True,
                  int8_cpu_method: str = "nbits", fuse_projections: bool = False) -> Quantized | None:
    """Write ``dst`` (+ ``dst.name + '.data'``) from ``src`` at ``precision``; ``None`` for fp32.

    ``block_size`` defaults to :data:`INT8_CPU_BLOCK_SIZE` for int8 on CPU and to 32 otherwise;
    ``int8_cpu_method="dynamic"`` builds the former ``quantize_dynamic`` int8 (for comparisons).
    ``fuse_projections`` (int8/int4, and fp16 on CUDA): projections that read one input become one
    weight and a ``Split`` before quantizing (:mod:`passes.fuse_projections`; the shared-buffer
    rewrite then hands GroupQueryAttention the q|k|v before their split, its packed input); on
    CUDA fp16 each SwiGLU gate over the fused gate|up is named for the runtime's fused kernel
    (:func:`passes.fuse_projections.name_silu_gates`).
    A quantized lm head on the CPU is 8-bit in blocks of :data:`CPU_HEAD_BLOCK_SIZE` whatever the
    precision (:data:`CPU_HEAD_BITS`).
    """
    if precision == "fp32":
        return None
    model = onnx.load(str(src), load_external_data=True)
    _ensure_names(model)
    head = lm_head_nodes(model)
    untied = 0
    if not keep_lm_head:
        untied = untie_lm_head(model, head)  # a tied head gets its own copy, so a quantizer can take it
        head = []
    if precision == "int8" and device == "cpu" and int8_cpu_method == "nbits" and is_encoder_graph(model):
        if block_size is not None:
            log.warning("block size %d is ignored: encoder int8 quantizes per output channel", block_size)
        done = quantize_encoder_int8(model, dst)  # encoders: every projection int8, see its docstring
        return Quantized("passes.encoder_int8 + onnxruntime.quantization.quantize_dynamic", done["settings"],
                         done["converted_nodes"], [])
    if precision == "int8" and device == "cpu" and int8_cpu_method == "dynamic":
        return _quantize_dynamic_int8(model, dst, head)
    if int8_cpu_method not in INT8_CPU_METHODS:
        raise ValueError(f"int8_cpu_method {int8_cpu_method!r} is not one of {INT8_CPU_METHODS}")
    if precision in ("int4", "int8"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        bits = 4 if precision == "int4" else 8
        if block_size is None:
            block_size = INT8_CPU_BLOCK_SIZE if (bits == 8 and device == "cpu") else 32
        # CPU: int8 activations inside the kernel (MLAS CompInt8, one scale per row and block: the
        # fast path; each row's result is independent of the others); accuracy levels 0-2
        # dequantize to fp32 on every call there (6x slower than the fp32 graph on the dev
        # machine). CUDA: the weight-only kernel.
        accuracy_level = 4 if device == "cpu" else None
        base = "fp32"
        source_weights: dict[str, Any] = {}
        if bits == 4 and device == "cuda":  # for grid_int4: the fp32 weights, before fp16 rounds them
            from onnx import numpy_helper

            weight_names = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2}
            source_weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                              if t.name in weight_names and len(t.dims) == 2}
        if device == "cuda":
            # CUDA: weight-only quantization on an fp16 graph, as onnxruntime-genai builds it —
            # GroupQueryAttention has fp16/bf16 CUDA kernels only, and the unquantized lm head and
            # embeddings should be read as fp16, not fp32.
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(model, keep_io_types=True, op_block_list=_FP16_KEEP_FP32_CUDA,
                                             disable_shape_infer=True)
            drop_duplicate_nodes(model)
            base = "fp16"
        # Only weight matrices: a MatMul whose constant operand has under _MIN_WEIGHT_ROWS rows (the
        # rotary ``positions × inv_freq[1, E]`` product) is arithmetic, not a layer — quantizing
        # inv_freq to 4 bits would corrupt every position. (K below the block size is padded.)
        initializers = {t.name: tuple(t.dims) for t in model.graph.initializer}
        small = [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
                 and len(initializers.get(n.input[1], (block_size,))) == 2
                 and initializers.get(n.input[1], (block_size,))[0] < _MIN_WEIGHT_ROWS]
        # The head quantized on the CPU: 8-bit whatever the precision (its error goes straight to
        # the logits, and a tied head is on no source grid), in blocks of 32 (the faster kernel for
        # the largest GEMV of the step).
        head_separately = not keep_lm_head and device == "cpu" \
            and (bits, block_size) != (CPU_HEAD_BITS, CPU_HEAD_BLOCK_SIZE)
        quantized_head = lm_head_nodes(model) if head_separately else []
        head = head + small + quantized_head
        fused = fuse_shared_input_matmuls(model, set(head)) if fuse_projections else 0
        # A 4-bit source (Q4_1 GGUF) keeps its own grid exactly (passes.grid_int4): on CUDA with
        # float zero points; on the CPU, whose fast kernel takes none, as a symmetric kernel plus
        # per-block offsets.
        offsets: list[str] = []
        if bits == 4 and device == "cpu":
            grid = grid_quantize_cpu(model, set(head), 32, accuracy_level)
            offsets = [f"{name}_{part}" for name in grid for part in ("offsets", "block_sums")]  # stay fp32
            head = head + offsets
        else:
            grid = grid_quantize(model, source_weights, set(head), block_size, accuracy_level) if source_weights else []
        source_weights.clear()
        quant = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=head,
                                     op_types_to_quantize=("MatMul",))
        quant.process()
        out = quant.model.model
        if quantized_head:
            others = [n.name for n in out.graph.node if n.op_type == "MatMul" and n.name not in quantized_head]
            quant = MatMulNBitsQuantizer(out, bits=CPU_HEAD_BITS, block_size=CPU_HEAD_BLOCK_SIZE, is_symmetric=True,
                                         accuracy_level=accuracy_level, nodes_to_exclude=others,
                                         op_types_to_quantize=("MatMul",))  # (nodes_to_include adds, not limits)
            quant.process()
            out = quant.model.model
        head_names = set(lm_head_nodes(out))
        head_ops = {n.op_type for n in out.graph.node if n.name in head_names}
        head_bits = CPU_HEAD_BITS if quantized_head else bits
        head_block = CPU_HEAD_BLOCK_SIZE if quantized_head else block_size
        tied_note = " (tied: its own transposed copy)" if untied else ""
        head_note = (f"quantized, {head_bits}-bit blocks of {head_block}{tied_note}" if head_ops == {"MatMulNBits"}
                     else f"kept in the base precision ({', '.join(sorted(head_ops))})")
        onnx.save(out, str(dst), save_as_external_data=True, location=dst.name + ".data")
        converted = _count(out, ("MatMulNBits",))
        settings: dict[str, Any] = {"bits": bits, "block_size": block_size, "symmetric": symmetric,
                                    "accuracy_level": accuracy_level, "base": base, "lm_head": head_note,
                                    "source_grid_nodes": len(grid), "fused_projection_groups": fused}
        settings["weights"] = (f"{bits}-bit {'symmetric' if symmetric else 'asymmetric (with zero points)'}, "
                               f"one {base} scale per block of {block_size} along K; the nodes in 'kept' stay {base}")
        if grid and device == "cpu":
            settings["weights"] += (f"; {len(grid)} weight(s) already on a 4-bit grid (a Q4_1 source) keep it "
                                    "exactly: the source's own scale per block of 32, symmetric, plus the block "
                                    "sums of the input times fp32 per-block offsets")
        elif grid:
            settings["weights"] += (f"; {len(grid)} weight(s) already on a 4-bit grid (a Q4_1 source) keep it "
                                    f"exactly: the source's own scale and a {base} zero point per block")
        if accuracy_level == 4:
            settings["activations"] = (f"int8, one scale per row and block of {block_size} along K, "
                                       "quantized inside MatMulNBits on each call (MLAS CompInt8)")
        else:
            settings["activations"] = f"{base}, not quantized (weight-only)"
        return Quantized("onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                         settings, converted, [name for name in head if name not in {*quantized_head, *offsets}])
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        fused = gates = 0
        if fuse_projections and device == "cuda" and not is_encoder_graph(model):
            # decoders: q|k|v and gate|up as one GEMV each, the SwiGLU gate named for the runtime
            small = [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
                     and _weight_rows(model, n.input[1]) < _MIN_WEIGHT_ROWS]
            fused = fuse_shared_input_matmuls(model, set(head) | set(small))
            gates = name_silu_gates(model)
        block = _FP16_KEEP_FP32_CUDA if device == "cuda" else _FP16_KEEP_FP32
        out = convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                       disable_shape_infer=True)
        drop_duplicate_nodes(out)
        onnx.save(out, str(dst), save_as_external_data=True, location=dst.name + ".data")
        kept = sorted({n.op_type for n in out.graph.node if n.op_type in block})
        settings = {"keep_io_types": True, "op_block_list": block}
        if fused:
            settings |= {"fused_projection_groups": fused, "named_silu_gates": gates}
        return Quantized("onnxruntime.transformers.float16.convert_float_to_float16", settings,
                         sum(1 for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16), kept)
    raise ValueError(precision)


def _weight_rows(model: onnx.ModelProto, name: str) -> int:
    """Rows of a 2-D initializer ``name`` (a weight's ``K``); a large number for anything else."""
    tensor = next((t for t in model.graph.initializer if t.name == name), None)
    return int(tensor.dims[0]) if tensor is not None and len(tensor.dims) == 2 else 1 << 30
