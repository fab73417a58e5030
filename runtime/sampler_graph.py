"""Sampling as ONNX nodes: one row per request, greedy and sampled rows in one batch, no host work.

:func:`add_sampling` appends the nodes to a graph being built with :mod:`runtime._onnx_proto`
(no ``onnx`` dependency). Two graphs use it: the slots step model (:mod:`runtime.step_graph`,
decoder + sampling + next inputs, one CUDA-graph replay a step) and the standalone sampler that
the concat backend runs after its decoder (:func:`build_sampler_model`). Every shape is fixed by
the batch and the vocabulary and every parameter is a per-row tensor, so a captured step serves
any mix of requests: nothing is read on the host, nothing is uploaded per step.

Per row (``[b]`` unless noted): ``temperature``, ``top_k`` (int64), ``top_p``, ``min_p``,
``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``min_new_tokens`` (int64),
``stop_mask [b, vocab]`` (EOS and stop ids), ``uniforms [b, steps]`` (the row's seeded draws),
and the state the step updates: ``seen [b, vocab]`` (prompt and generated tokens, for the
repetition penalty), ``counts [b, vocab]`` (generated tokens, for presence/frequency), ``step``
(int64, tokens generated so far).

The order follows transformers' ``generate`` (processors, then warpers):

1. repetition penalty (HF: a seen token's logit divided by the penalty when positive, multiplied
   when not); presence / frequency penalties (OpenAI: ``− presence·[count > 0] − frequency·count``
   over generated tokens); EOS and stop ids at −inf while ``step < min_new_tokens``.
2. Greedy rows (``temperature == 0`` or ``top_k == 1``) take ``ArgMax`` — first index on ties,
   bit-for-bit the argmax of the processed logits.
3. Sampled rows: ``s = (x − max x) / temperature``. Top-k keeps ``s ≥`` the k-th largest value
   (ties kept, as transformers' ``TopKLogitsWarper``). Top-p renormalizes over the top-k
   survivors and keeps a token when the mass strictly before it, in descending order, is
   ``< top_p`` (transformers' ``TopPLogitsWarper``: it removes the ascending prefix whose
   cumulative mass is ``≤ 1 − top_p``; so with probabilities [0.5, 0.25, 0.25] and top_p = 0.5
   only the first token stays). Min-p keeps ``p ≥ min_p · p_max``, i.e. ``s ≥ log(min_p)``.
   The three filters become one threshold on ``s`` over the whole vocabulary, and the token is
   drawn by inverse CDF with the row's uniform for this step.

Where a sort is needed and where not: temperature and min-p need none (a max, an exp, a sum).
Top-k and top-p read the ``K`` largest values from one ``TopK``, where ``K`` is the
``candidates`` input ([1] int64 in host memory): the engine passes 1 when no row of the step
uses top-k or top-p (greedy, temperature and min-p rows pay for no sort), 64 or 256 when every
such row sets top-k (:data:`runtime.sampling.TOP_K_CANDIDATES`), and its candidate bound
(:data:`BOUNDED_CANDIDATES` by default, at most :data:`MAX_CANDIDATES`) otherwise; under CUDA
graphs each value is its own captured graph (and so is ``parted_rows``, below). Top-k is exact
for ``top_k ≤ K`` (the engine refuses a larger top-k), and top-p is exact whenever its nucleus
lies within the K candidates —
when their mass is below ``top_p`` the nucleus is cut at the last candidate (every token ``≥``
its value kept).

No ``ReduceMax`` anywhere: onnxruntime's CUDA ReduceMax goes through cuDNN, which is slow over a
row of logits (and reduces int64 in double; docs/benchmarks.md, "GPU: what sampling costs"); the
row maximum is gathered at the ``ArgMax`` instead, and the last kept token is the ``ArgMax`` of the
CDF (its first maximum).

Cumulative sums: onnxruntime's CUDA ``CumSum`` computes each output element from scratch
(quadratic in the axis length), so the draw runs in two levels (:func:`_draw`): a block of
:data:`_BLOCK` tokens by the cumulative block totals, then the token within that block; no
cumulative sum spans the vocabulary. Counts are summed in float32 (:func:`_count`): cuDNN
reduces int64 in double.

A branch that a host input switches off launches nothing. Selecting the candidates: onnxruntime's
CUDA ``TopK`` takes its fast path up to K = 256 and beyond it a radix select with one thread
block a row. A CUDA step model therefore selects more than 256 candidates in parts of the row
(:func:`_largest`, switched on per run by the ``parted_rows`` host input; the same values), which
is faster for top-p's 1,024 candidates, while for 64 or 256 one ``TopK`` stays faster. What each
sampling plan costs a step is in docs/benchmarks.md, "GPU: what sampling costs"; the node count
hardly matters (a variant with ~20 fewer nodes and no device-to-device copies replayed no faster).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from runtime._onnx_proto import GraphBuilder

__all__ = ["ALL_ROWS", "BOUNDED_CANDIDATES", "HOST_INPUTS", "MAX_CANDIDATES", "ROWS", "ROW_CONSTANTS", "ROW_INPUTS",
           "ROW_STATE", "RowInput",
           "STEP_HOST_INPUTS", "SAMPLER_FORMAT", "SAMPLER_NAME", "add_fused_sampling", "add_sampling",
           "declare_row_inputs",
           "build_sampler_model", "candidate_segments", "write_sampler"]

SAMPLER_NAME = "sampler.onnx"  # the concat contract's sampler, in the artifact beside model.onnx
SAMPLER_FORMAT = 1  # bumped whenever the sampler's inputs or semantics change; the runtime refuses another

ALL_ROWS = int(np.iinfo(np.int64).max)  # a row bound meaning "every row" (Slice clamps it)
BOUNDED_CANDIDATES = 1024
MAX_CANDIDATES = 4096  # the candidates' cumulative sum is one-level (quadratic in K)
_PARTS_SORTED = 0  # whether :func:`_largest`'s first stage sorts each part (the second sorts anyway)
SEGMENTS_MAX = 8  # the most parts a CUDA step's candidate selection splits a row into (:func:`candidate_segments`)
_BLOCK = 256
_FLOAT, _INT64 = 1, 7

@dataclasses.dataclass(frozen=True)
class RowInput:
    """One per-row sampling input: the graph declares it ``[batch, *width]``, the backends keep
    a buffer of it per slot, :func:`runtime.sampling.row_arrays` fills a request's row, and a row
    of ``neutral`` values samples greedily with no penalties.

    A new sampling option is one row here (and its field in
    :class:`runtime.sampling.SamplingParams`, named by ``param``) plus its nodes in
    :func:`add_sampling`; bump :data:`SAMPLER_FORMAT` and :data:`runtime.step_graph.FORMAT`.
    """

    name: str
    dtype: str
    width: str = ""  # "": one value per row; "vocab": one per token; "steps": one per decode step
    state_output: str | None = None  # state the sampling updates: the output that becomes it next step
    param: str | None = None  # the SamplingParams field a request's value comes from
    neutral: float = 0.0

    def dims(self, vocab: int, steps: int | str) -> list[int | str]:
        """One row's shape (without the batch axis)."""
        if self.width == "vocab":
            return [vocab]
        return [steps] if self.width == "steps" else []


# Every per-row input, in the graphs' declaration order: constants written once at admission,
# then the state the sampling updates each step.
ROW_INPUTS: tuple[RowInput, ...] = (
    RowInput("temperature", "float32", param="temperature"),
    RowInput("top_k", "int64", param="top_k"),
    RowInput("top_p", "float32", param="top_p", neutral=1.0),
    RowInput("min_p", "float32", param="min_p"),
    RowInput("repetition_penalty", "float32", param="repetition_penalty", neutral=1.0),
    RowInput("presence_penalty", "float32", param="presence_penalty"),
    RowInput("frequency_penalty", "float32", param="frequency_penalty"),
    RowInput("min_new_tokens", "int64", param="min_new_tokens"),
    RowInput("stop_mask", "bool", "vocab"),  # EOS and stop ids, masked while step < min_new_tokens
    RowInput("uniforms", "float32", "steps"),  # the row's seeded draws, one per step
    RowInput("last_step", "int64"),  # the last column of uniforms
    RowInput("seen", "bool", "vocab", state_output="seen_out"),  # prompt + generated (repetition penalty)
    RowInput("counts", "float32", "vocab", state_output="counts_out"),  # generated (presence/frequency)
    RowInput("step", "int64", state_output="step_out"),  # tokens generated so far
)
ROWS = {row.name: row for row in ROW_INPUTS}
# per-row inputs written once at admission: (name, dtype)
ROW_CONSTANTS = tuple((row.name, row.dtype) for row in ROW_INPUTS if row.state_output is None)
# per-row state the sampling updates: (input, output, dtype)
ROW_STATE = tuple((row.name, row.state_output, row.dtype) for row in ROW_INPUTS if row.state_output is not None)
# [1] int64 inputs in host memory, one value per run (each value its own captured graph on CUDA)
HOST_INPUTS = ("candidates", "sampled_rows", "penalized_rows")
# the step model's (:mod:`runtime.step_graph`) add two: rows 0:filtered_rows run the top-k /
# top-p / min-p threshold (0: no row of the run filters; never more than sampled_rows), and of
# those, rows 0:parted_rows select their candidates in parts of the row (:func:`_largest`;
# ignored by a step built with one part)
STEP_HOST_INPUTS = (*HOST_INPUTS, "filtered_rows", "parted_rows")


def _count(g: GraphBuilder, mask: str, axis: str) -> str:
    """How many ``True`` along ``axis`` (keepdims), as int64: summed in float32 (exact below 2**24;
    onnxruntime's CUDA ``ReduceSum`` reduces int64 in double through cuDNN, far slower)."""
    total = g.op("ReduceSum", [g.op("Cast", [mask], {"to": _FLOAT}), axis], {"keepdims": 1})
    return g.op("Cast", [total], {"to": _INT64})


def candidate_segments(vocab: int) -> int:
    """How many segments :func:`_largest` splits a row of ``vocab`` logits into: the most, up to
    :data:`SEGMENTS_MAX`, that leave each at least :data:`MAX_CANDIDATES` wide, preferring a count
    that divides the vocabulary (no padding)."""
    most = max(1, min(SEGMENTS_MAX, vocab // MAX_CANDIDATES))
    return next((n for n in range(most, 0, -1) if vocab % n == 0 and n * 2 > most), most)


def _largest(g: GraphBuilder, s: str, k: str, vocab: int, segments: int) -> str:
    """The ``k`` largest values of each row of ``s [b, vocab]``, sorted descending (values only).

    With ``segments > 1`` in two stages that give the same values: the row split into
    ``segments`` equal parts (the last padded with −inf), the ``k`` largest of each part, then the
    ``k`` largest of those ``segments · k`` (every value of the row's top k is among its part's
    top k, since a part holds at most all of them). onnxruntime's CUDA ``TopK`` selects beyond
    K = 256 with one thread block a row; parts give it ``segments`` blocks a row over shorter
    rows. ``k`` is the host input: read by the two ``TopK`` nodes alone (see :func:`add_sampling`).
    """
    if segments <= 1:
        return g.ops("TopK", [s, k], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)[0]
    width = -(-vocab // segments)
    if width * segments != vocab:
        s = g.op("Pad", [s, g.const(np.array([0, 0, 0, width * segments - vocab], np.int64)),
                         g.const(-np.inf, "float32")])
    parts = g.op("Reshape", [s, g.const(np.array([-1, segments, width], np.int64))])
    best = g.ops("TopK", [parts, k], {"axis": 2, "largest": 1, "sorted": _PARTS_SORTED}, outputs=2)[0]
    return g.ops("TopK", [g.op("Flatten", [best], {"axis": 1}), k], {"axis": 1, "largest": 1, "sorted": 1},
                 outputs=2)[0]


def _draw(g: GraphBuilder, w: str, u: str, length: int) -> str:
    """Inverse-CDF draw: for ``w [b, length] ≥ 0`` and ``u [b, 1]`` in [0, 1), the first index
    ``i`` with ``cumsum(w)[i] > u · sum(w)`` (``[b, 1]`` int64), clamped to the last index with mass.

    In two levels, so that nothing over the whole axis is cumulative: a block of :data:`_BLOCK`
    entries by the cumulative sum of the block totals, then the entry inside it by the cumulative
    sum of that block alone (onnxruntime's CUDA ``CumSum`` is quadratic in the axis length).
    A one-level draw over a ``MatMul`` with a triangular matrix of ones (11 nodes against 27) was
    no faster on CUDA and slower on the CPU.
    """
    blocks = math.ceil(length / _BLOCK)
    pad = blocks * _BLOCK - length
    axis1, axis2 = g.const(np.array([1], np.int64)), g.const(np.array([2], np.int64))
    padded = g.op("Pad", [w, g.const(np.array([0, 0, 0, pad], np.int64)), g.const(0.0, "float32")]) if pad else w
    tiles = g.op("Reshape", [padded, g.const(np.array([0, blocks, _BLOCK], np.int64))])
    totals = g.op("ReduceSum", [tiles, axis2], {"keepdims": 0})  # [b, blocks]
    block_cdf = g.op("CumSum", [totals, g.const(np.array(1, np.int64))])
    target = g.op("Mul", [u, g.op("Gather", [block_cdf, g.const(np.array([blocks - 1], np.int64))], {"axis": 1})])
    last_block = g.op("ArgMax", [block_cdf], {"axis": 1, "keepdims": 1, "select_last_index": 0})
    block = g.op("Min", [_count(g, g.op("LessOrEqual", [block_cdf, target]), axis1), last_block])  # [b, 1]
    before = g.op("Sub", [g.op("GatherElements", [block_cdf, block], {"axis": 1}),
                          g.op("GatherElements", [totals, block], {"axis": 1})])
    rest = g.op("Sub", [target, before])
    index = g.op("Expand", [g.op("Unsqueeze", [block, axis2]), g.const(np.array([1, 1, _BLOCK], np.int64))])
    inner = g.op("Reshape", [g.op("GatherElements", [tiles, index], {"axis": 1}),
                             g.const(np.array([0, _BLOCK], np.int64))])
    inner_cdf = g.op("CumSum", [inner, g.const(np.array(1, np.int64))])
    last = g.op("ArgMax", [inner_cdf], {"axis": 1, "keepdims": 1, "select_last_index": 0})
    position = g.op("Min", [_count(g, g.op("LessOrEqual", [inner_cdf, rest]), axis1), last])
    return g.op("Add", [g.op("Mul", [block, g.const(_BLOCK, "int64")]), position])


def add_fused_sampling(g: GraphBuilder, logits_last: str, names: dict[str, str],
                       outputs: dict[str, str] | None = None) -> dict[str, str]:
    """The same contract as :func:`add_sampling` as one ``lmforge.FusedSample`` node (the CUDA
    kernel of :mod:`runtime.kernels`, ``runtime/kernels/sampling.cu``): ``logits_last`` (float16
    or float32) and every :data:`ROW_INPUTS` input in the table's order; ``next_ids`` and the
    state outputs. The host inputs are not read: the kernel decides per row what the ONNX nodes
    decide per run (greedy, penalized, filtered), with the same results."""
    outputs = outputs or {}
    keys = ("next_ids", *(row.name for row in ROW_INPUTS if row.state_output))
    names_out = g.ops("FusedSample", [logits_last, *(names[row.name] for row in ROW_INPUTS)],
                      outputs=[outputs.get(key) or f"{g.prefix}fused_{key}" for key in keys], domain="lmforge")
    return dict(zip(keys, names_out, strict=True))


def add_sampling(g: GraphBuilder, logits_last: str, vocab: int, names: dict[str, str],
                 outputs: dict[str, str] | None = None, segments: int = 1, fused: bool = False,
                 branch: bool = False) -> dict[str, str]:
    """Append the sampling nodes; return the names of ``next_ids [b, 1]`` and the state outputs.

    ``logits_last`` is ``[b, vocab]`` (any float dtype; cast to float32 here). ``names`` maps
    every :data:`ROW_CONSTANTS` and :data:`ROW_STATE` input and every :data:`HOST_INPUTS` input
    to its graph name (declared by the caller). ``outputs`` names the graph outputs that
    ``next_ids``, ``seen``, ``counts`` and ``step`` are written to by the node that computes
    them (an ``Identity`` in between would be one more device copy in every step). ``segments``:
    the candidates' selection in that many parts (:func:`_largest`; the same values) for rows
    ``0:parted_rows`` when ``names`` has that host input, for every row otherwise. ``fused``: the
    whole block as one custom node instead (:func:`add_fused_sampling`). ``branch``: the penalties
    and the draw in the ``else`` branch of an ``If`` whose ``then`` branch is the ``ArgMax``
    alone, taken when the run has no sampled and no penalized row (``sampled_rows`` and
    ``penalized_rows`` both 0): the same ids and state without the ~140 nodes that would run on
    no rows, each of which costs its dispatch on the CPU (:func:`_greedy_branch`; not under CUDA
    graphs, which capture no control flow).
    """
    if fused:
        return add_fused_sampling(g, logits_last, names, outputs)
    outputs = outputs or {}
    x = g.op("Cast", [logits_last], {"to": _FLOAT})
    early = g.op("Unsqueeze", [g.op("Less", [names["step"], names["min_new_tokens"]]),
                               g.const(np.array([1], np.int64))])
    x = g.op("Where", [g.op("And", [names["stop_mask"], early]), g.const(-np.inf, "float32"), x])
    if branch:
        return _greedy_branch(g, x, vocab, names, outputs, segments)
    return _penalize_and_draw(g, x, vocab, names, outputs, segments)


_KEYS = ("next_ids", "seen", "counts", "step")  # what the sampling writes, in this order


def _greedy_branch(g: GraphBuilder, x: str, vocab: int, names: dict[str, str], outputs: dict[str, str],
                   segments: int) -> dict[str, str]:
    """``If(no row sampled or penalized)``: ``ArgMax`` with the state carried over, else
    :func:`_penalize_and_draw` (see :func:`add_sampling`). Both branches read this graph's values
    by name; the ``If``'s outputs are the sampling's outputs."""
    zero = g.const(np.array([0], np.int64))
    cond = g.op("And", [g.op("Equal", [names["sampled_rows"], zero]), g.op("Equal", [names["penalized_rows"], zero])])
    types: dict[str, tuple[str, list[int | str]]] = {
        "next_ids": ("int64", ["batch", 1]), "seen": ("bool", ["batch", vocab]),
        "counts": ("float32", ["batch", vocab]), "step": ("int64", ["batch"])}
    greedy = GraphBuilder("greedy", prefix=g.prefix + "greedy.")
    carried = {"next_ids": greedy.op("ArgMax", [x], {"axis": 1, "keepdims": 1, "select_last_index": 0}),
               "seen": greedy.op("Identity", [names["seen"]]),
               "counts": greedy.op("Identity", [names["counts"]]),
               "step": greedy.op("Add", [names["step"], greedy.const(1, "int64")])}
    sampled = GraphBuilder("sampled", prefix=g.prefix + "sampled.")
    drawn = _penalize_and_draw(sampled, x, vocab, names, {}, segments)
    for branch, values in ((greedy, carried), (sampled, drawn)):
        for key in _KEYS:
            branch.output(values[key], *types[key])
    results = g.ops("If", [cond], {"then_branch": greedy, "else_branch": sampled},
                    outputs=[outputs.get(key) or f"{g.prefix}sampling_{key}" for key in _KEYS])
    return dict(zip(_KEYS, results, strict=True))


def _penalize_and_draw(g: GraphBuilder, x: str, vocab: int, names: dict[str, str], outputs: dict[str, str],
                       segments: int) -> dict[str, str]:
    """The penalties, the greedy ids and the draw over the masked float32 logits ``x``; the new ids
    and state (see :func:`add_sampling`)."""
    axis0, axis1 = g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))
    zero_f, one_f = g.const(0.0, "float32"), g.const(1.0, "float32")
    zero_i, one_i = g.const(0, "int64"), g.const(1, "int64")
    neg_inf = g.const(-np.inf, "float32")
    start, end = g.const(np.array([0], np.int64)), g.const(np.array([ALL_ROWS], np.int64))

    def col(x: str) -> str:  # [b] → [b, 1]
        return g.op("Unsqueeze", [x, axis1])

    def head(x: str, rows: str) -> str:  # rows 0:rows (``rows`` is a host input: 0 or ALL_ROWS)
        return g.op("Slice", [x, start, rows, axis0])

    def tail(x: str, rows: str) -> str:  # the other rows
        return g.op("Slice", [x, rows, end, axis0])

    def out(key: str, op_type: str, inputs: list[str], attrs: dict[str, Any] | None = None) -> str:
        return g.op(op_type, inputs, attrs, outputs=[outputs[key]] if key in outputs else None)

    n = names
    # penalties, on rows 0:penalized_rows
    pr = n["penalized_rows"]
    xp, seen, counts = head(x, pr), head(n["seen"], pr), head(n["counts"], pr)
    pen = col(head(n["repetition_penalty"], pr))
    xp = g.op("Where", [seen, g.op("Where", [g.op("Greater", [xp, zero_f]), g.op("Div", [xp, pen]),
                                            g.op("Mul", [xp, pen])]), xp])
    present = g.op("Cast", [g.op("Greater", [counts, zero_f])], {"to": _FLOAT})
    xp = g.op("Sub", [xp, g.op("Add", [g.op("Mul", [col(head(n["frequency_penalty"], pr)), counts]),
                                        g.op("Mul", [col(head(n["presence_penalty"], pr)), present])])])
    x = g.op("Concat", [xp, tail(x, pr)], {"axis": 0})
    greedy_id = g.op("ArgMax", [x], {"axis": 1, "keepdims": 1, "select_last_index": 0})

    # the draw, on rows 0:sampled_rows
    sr = n["sampled_rows"]
    xs, gs = head(x, sr), head(greedy_id, sr)
    t, k_s = col(head(n["temperature"], sr)), col(head(n["top_k"], sr))
    t_pos = g.op("Greater", [t, zero_f])
    row_max = g.op("GatherElements", [xs, gs], {"axis": 1})
    s = g.op("Div", [g.op("Sub", [xs, row_max]), g.op("Where", [t_pos, t, one_f])])  # ≤ 0, the best token at 0
    weights = g.op("Exp", [s])

    # top-k, top-p and min-p as one threshold on ``s``, on rows 0:filtered_rows (all or none of
    # the sampled rows; without that input, every sampled row): a run of temperature-only rows
    # launches none of these nodes and its rows keep every token.
    # ``candidates`` is read by TopK alone (a host-memory input of its kernel): a second, device
    # consumer would need a host-to-device copy node, which CUDA-graph capture refuses. The
    # engine guarantees top_k <= K whenever K > 1 (it refuses a top-k above its bound, and a row
    # with top-k makes the step sort at least top_k candidates), so the k-th value is at index
    # top_k - 1.
    fr = n.get("filtered_rows", sr)
    s_f, w_f, top_k = head(s, fr), head(weights, fr), head(k_s, fr)
    top_p, min_p = col(head(n["top_p"], fr)), col(head(n["min_p"], fr))
    if segments > 1 and "parted_rows" in n:  # one TopK is faster for K ≤ 256: the host picks per run
        parted = n["parted_rows"]
        vals = g.op("Concat", [_largest(g, head(s_f, parted), n["candidates"], vocab, segments),
                               _largest(g, tail(s_f, parted), n["candidates"], vocab, 1)], {"axis": 0})
    else:
        vals = _largest(g, s_f, n["candidates"], vocab, segments)
    has_k = g.op("Greater", [top_k, zero_i])
    k_pos = g.op("Max", [g.op("Sub", [top_k, one_i]), zero_i])
    thr_k = g.op("Where", [has_k, g.op("GatherElements", [vals, k_pos], {"axis": 1}), neg_inf])
    # top-p over the top-k survivors (ties at the k-th value included), unnormalized: a candidate
    # stays when the mass before it is < top_p × the survivors' mass
    e = g.op("Exp", [vals])
    mass = g.op("Where", [has_k, g.op("ReduceSum", [g.op("Where", [g.op("GreaterOrEqual", [vals, thr_k]), e, zero_f]),
                                                     axis1], {"keepdims": 1}),
                          g.op("ReduceSum", [w_f, axis1], {"keepdims": 1})])
    before = g.op("Sub", [g.op("CumSum", [e, g.const(np.array(1, np.int64))]), e])
    kept = _count(g, g.op("Less", [before, g.op("Mul", [top_p, mass])]), axis1)  # ≥ 1: before[0] = 0
    thr_p = g.op("Where", [g.op("Less", [top_p, one_f]),
                           g.op("GatherElements", [vals, g.op("Sub", [kept, one_i])], {"axis": 1}), neg_inf])
    thr_m = g.op("Where", [g.op("Greater", [min_p, zero_f]), g.op("Log", [min_p]), neg_inf])
    thr = g.op("Max", [g.op("Max", [thr_k, thr_p]), thr_m])  # binary: the variadic CUDA kernel fails on 0 rows
    w_kept = g.op("Where", [g.op("GreaterOrEqual", [s_f, thr]), w_f, zero_f])
    w = g.op("Concat", [w_kept, tail(weights, fr)], {"axis": 0})

    # inverse-CDF draw with this step's uniform; greedy rows among the sampled keep their argmax
    step_col = col(g.op("Min", [head(n["step"], sr), head(n["last_step"], sr)]))
    u = g.op("GatherElements", [head(n["uniforms"], sr), step_col], {"axis": 1})
    greedy_row = g.op("Or", [g.op("Not", [t_pos]), g.op("Equal", [k_s, one_i])])
    drawn = g.op("Where", [greedy_row, gs, _draw(g, w, u, vocab)])
    next_ids = out("next_ids", "Concat", [drawn, tail(greedy_id, sr)], {"axis": 0})

    # the penalties' state, on rows 0:penalized_rows (other rows carry theirs over)
    positions = g.const(np.arange(vocab, dtype=np.int64)[None, :])
    hit = g.op("Equal", [positions, head(next_ids, pr)])
    return {
        "next_ids": next_ids,
        "seen": out("seen", "Concat", [g.op("Or", [seen, hit]), tail(n["seen"], pr)], {"axis": 0}),
        "counts": out("counts", "Concat", [g.op("Add", [counts, g.op("Cast", [hit], {"to": _FLOAT})]),
                                           tail(n["counts"], pr)], {"axis": 0}),
        "step": out("step", "Add", [n["step"], one_i]),
    }


def declare_row_inputs(g: GraphBuilder, vocab: int, prefix: str = "",
                       host_inputs: tuple[str, ...] = HOST_INPUTS) -> dict[str, str]:
    """Declare every per-row sampling input, and the host inputs, as graph inputs ``prefix + name``."""
    names = {row.name: g.input(prefix + row.name, row.dtype, ["batch", *row.dims(vocab, "steps")])
             for row in ROW_INPUTS}
    for name in host_inputs:
        names[name] = g.input(prefix + name, "int64", [1])
    return names


def build_sampler_model(logits_dtype: str, vocab: int, segments: int = 1, fused: bool = False,
                        branch: bool = False) -> bytes:
    """The standalone sampler of the concat backend, ModelProto bytes.

    inputs: ``logits [b, seq, vocab]`` (the last position is used), ``attention_mask [b, total]``
    int64, and the per-row and host inputs of :func:`add_sampling`. outputs:
    ``next_ids [b, 1]``, ``next_attention_mask [b, total + 1]``, ``next_position_ids [b, 1]``
    (= row length − 1, so left padding needs no host bookkeeping), ``seen_out``, ``counts_out``,
    ``step_out``. ``fused``: the sampling as the ``lmforge.FusedSample`` node (a CUDA session
    with the kernels library registered runs it; :mod:`runtime.kernels`). ``branch``: a greedy run
    without penalties takes an ``If`` branch holding the ``ArgMax`` alone (:func:`add_sampling`).
    """
    if logits_dtype not in ("float32", "float16"):
        raise ValueError(f"sampler: logits dtype {logits_dtype!r} is not float32 or float16")
    g = GraphBuilder("lmforge_sampler")
    g.input("logits", logits_dtype, ["batch", "seq", vocab])
    mask = g.input("attention_mask", "int64", ["batch", "total"])
    names = declare_row_inputs(g, vocab)
    last = g.op("Gather", ["logits", g.const(-1, "int64")], {"axis": 1})
    add_sampling(g, last, vocab, names,
                 outputs={"next_ids": "next_ids", **{state: output for state, output, _ in ROW_STATE}},
                 segments=segments, fused=fused, branch=branch)
    ones = g.op("Expand", [g.const(np.ones((1, 1), np.int64)), g.op("Shape", ["next_ids"])])
    next_mask = g.op("Concat", [mask, ones], {"axis": 1}, outputs=["next_attention_mask"])
    axis1 = g.const(np.array([1], np.int64))
    g.op("Sub", [g.op("ReduceSum", [next_mask, axis1], {"keepdims": 1}), g.const(1, "int64")],
         outputs=["next_position_ids"])
    g.output("next_ids", "int64", ["batch", 1])
    g.output("next_attention_mask", "int64", ["batch", "total_next"])
    g.output("next_position_ids", "int64", ["batch", 1])
    for name, out_name, dtype in ROW_STATE:
        g.output(out_name, dtype, ["batch", *ROWS[name].dims(vocab, "steps")])
    return g.to_bytes()


def write_sampler(folder: Path, logits_dtype: str, vocab: int) -> dict[str, Any]:
    """Write the standalone sampler (:func:`build_sampler_model`) into an artifact folder being
    built; return the manifest's ``sampler`` record. ``convert`` and ``optimize`` call it for
    ``concat`` decoders, so the sampling a portable artifact serves with is the one it ships,
    hashed in its manifest (a ``shared-buffer`` artifact carries it inside its step model)."""
    (folder / SAMPLER_NAME).write_bytes(build_sampler_model(logits_dtype, vocab))
    return {"format": SAMPLER_FORMAT, "file": SAMPLER_NAME}
