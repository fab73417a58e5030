"""The on-device sampler: one small ONNX graph run after every decoder step.

Built at load time with :mod:`runtime._onnx_proto` (no ``onnx`` dependency) and run on the
engine's device with IO binding, so on a GPU the logits never leave it. One run turns the
decoder's logits into the next step's decoder inputs:

inputs
    ``logits [batch, seq, vocab]`` (float32 or float16; the last position is taken and cast to
    float32 inside), ``attention_mask [batch, total]`` int64, per-row ``temperature [batch]``,
    ``top_k [batch]`` int64, ``top_p [batch]``, ``repetition_penalty [batch]``,
    ``min_new_tokens [batch]`` int64, ``stop_mask [batch, vocab]`` bool (EOS and stop ids, masked
    while ``step < min_new_tokens``), ``seen [batch, vocab]`` bool (tokens in the prompt or
    generated so far, for the repetition penalty), ``uniforms [steps, batch]`` float32,
    ``step []`` int64 (how many tokens each row has generated), ``k_cap [1]`` int64 (how many
    candidates the TopK keeps; ≥ every sampling row's top-k, the whole vocabulary when a row uses
    top-p without top-k).
outputs
    ``next_ids [batch, 1]`` int64, ``next_attention_mask [batch, total + 1]``,
    ``next_position_ids [batch, 1]`` (= sum(mask) − 1: left padding needs no host bookkeeping),
    ``seen_out [batch, vocab]``, ``step_out []`` (= step + 1). These feed the next decoder step
    and the next sampler run directly; the host reads only ``next_ids`` (8 bytes a row).

The order of logit processors follows transformers' ``generate``: repetition penalty (HF
semantics: a seen token's logit is divided by the penalty when positive, multiplied when not),
min-new-tokens suppression, then temperature → top-k → top-p, then one draw.

* Greedy rows (``temperature == 0``, or ``top_k == 1``) take ``ArgMax`` of the processed logits,
  selected per row with ``Where``: bit-for-bit argmax, first index on ties like ``np.argmax``.
  With ``repetition_penalty == 1`` the processing is the identity (×1, ÷1), so greedy equals
  argmax of the raw logits.
* Sampling rows: ``TopK(k_cap)`` sorts the candidates, logits are shifted by the row max then
  divided by the temperature (so a temperature near 0 gives exp(−huge) = 0, never inf/NaN),
  top-k keeps the first ``top_k`` positions, top-p keeps a candidate when the probability mass
  strictly before it is < ``top_p`` (transformers' rule; the first candidate is always kept),
  and the draw is an inverse-CDF lookup: the index is the number of kept candidates whose
  cumulative mass is ≤ ``u · total``, clipped to the last kept one.
* Randomness: the host draws every uniform a request needs once, before the loop, from numpy's
  seeded ``Generator`` (one stream per row, so a row's samples do not depend on which other
  rows share its batch), uploads them once as ``uniforms [steps, batch]``, and the graph picks
  row ``step``. Nothing random is generated per step and nothing is uploaded per step.
"""

from __future__ import annotations

import numpy as np

from runtime._onnx_proto import GraphBuilder

__all__ = ["SAMPLER_INPUTS", "SAMPLER_OUTPUTS", "build_sampler_model"]

SAMPLER_INPUTS = (
    "logits", "attention_mask", "temperature", "top_k", "top_p", "repetition_penalty",
    "min_new_tokens", "stop_mask", "seen", "uniforms", "step", "k_cap",
)
SAMPLER_OUTPUTS = ("next_ids", "next_attention_mask", "next_position_ids", "seen_out", "step_out")

_FLOAT = 1  # TensorProto.FLOAT, for Cast
_INT64 = 7


def build_sampler_model(logits_dtype: str = "float32") -> bytes:
    """ModelProto bytes of the sampler for decoder logits of ``logits_dtype``."""
    if logits_dtype not in ("float32", "float16"):
        raise ValueError(f"sampler: logits dtype {logits_dtype!r} is not float32 or float16")
    g = GraphBuilder("lmforge_sampler")
    logits = g.input("logits", logits_dtype, ["batch", "seq", "vocab"])
    mask = g.input("attention_mask", "int64", ["batch", "total"])
    temperature = g.input("temperature", "float32", ["batch"])
    top_k = g.input("top_k", "int64", ["batch"])
    top_p = g.input("top_p", "float32", ["batch"])
    penalty = g.input("repetition_penalty", "float32", ["batch"])
    min_new = g.input("min_new_tokens", "int64", ["batch"])
    stop_mask = g.input("stop_mask", "bool", ["batch", "vocab"])
    seen = g.input("seen", "bool", ["batch", "vocab"])
    uniforms = g.input("uniforms", "float32", ["steps", "batch"])
    step = g.input("step", "int64", [])
    k_cap = g.input("k_cap", "int64", [1])

    axis1 = g.const(np.array([1], dtype=np.int64))

    def col(x: str) -> str:  # [batch] → [batch, 1]
        return g.op("Unsqueeze", [x, axis1])

    zero_f, one_f = g.const(0.0, "float32"), g.const(1.0, "float32")
    zero_i, one_i = g.const(0, "int64"), g.const(1, "int64")

    # last position, in float32
    last = g.op("Gather", [logits, g.const(-1, "int64")], {"axis": 1})
    x = g.op("Cast", [last], {"to": _FLOAT})

    # repetition penalty (transformers' RepetitionPenaltyLogitsProcessor)
    pen = col(penalty)
    penalized = g.op("Where", [g.op("Greater", [x, zero_f]), g.op("Div", [x, pen]), g.op("Mul", [x, pen])])
    x = g.op("Where", [seen, penalized, x])

    # min_new_tokens: EOS and stop ids are impossible while step < min_new_tokens
    early = col(g.op("Less", [step, min_new]))
    suppress = g.op("And", [stop_mask, early])
    x = g.op("Where", [suppress, g.const(-np.inf, "float32"), x])

    greedy_id = g.op("ArgMax", [x], {"axis": 1, "keepdims": 1, "select_last_index": 0})

    # candidates, sorted descending (ties: lower index first)
    vals, idx = g.op("TopK", [x, k_cap], {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    t = col(temperature)
    t_pos = g.op("Greater", [t, zero_f])
    safe_t = g.op("Where", [t_pos, t, one_f])
    row_max = g.op("Slice", [vals, g.const(np.array([0], np.int64)), axis1, axis1])
    weights = g.op("Exp", [g.op("Div", [g.op("Sub", [vals, row_max]), safe_t])])

    # top-k: keep the first top_k positions (top_k == 0: all k_cap candidates)
    positions = g.op("Range", [zero_i, g.op("Squeeze", [k_cap]), one_i])
    tk = col(top_k)
    eff_k = g.op("Where", [g.op("Greater", [tk, zero_i]), tk, g.op("Unsqueeze", [k_cap, axis1])])
    keep_k = g.op("Less", [g.op("Unsqueeze", [positions, g.const(np.array([0], np.int64))]), eff_k])
    w_k = g.op("Where", [keep_k, weights, zero_f])
    probs = g.op("Div", [w_k, g.op("ReduceSum", [w_k, axis1], {"keepdims": 1})])

    # top-p: keep a candidate when the mass strictly before it is < top_p
    before = g.op("Sub", [g.op("CumSum", [probs, one_i]), probs])
    keep = g.op("And", [keep_k, g.op("Less", [before, col(top_p)])])
    w = g.op("Where", [keep, weights, zero_f])

    # inverse-CDF draw with this step's uniform
    cdf = g.op("CumSum", [w, one_i])
    total = g.op("ReduceSum", [w, axis1], {"keepdims": 1})
    u = col(g.op("Gather", [uniforms, step], {"axis": 0}))
    below = g.op("Cast", [g.op("LessOrEqual", [cdf, g.op("Mul", [u, total])])], {"to": _INT64})
    count = g.op("ReduceSum", [below, axis1], {"keepdims": 1})
    n_keep = g.op("ReduceSum", [g.op("Cast", [keep], {"to": _INT64}), axis1], {"keepdims": 1})
    pick = g.op("Min", [count, g.op("Sub", [n_keep, one_i])])
    sampled_id = g.op("GatherElements", [idx, pick], {"axis": 1})

    greedy_row = g.op("Or", [g.op("Not", [t_pos]), g.op("Equal", [tk, one_i])])
    next_ids = g.op("Where", [greedy_row, greedy_id, sampled_id], outputs=["next_ids"])

    # state for the next step
    vocab = g.op("Gather", [g.op("Shape", [x]), one_i], {"axis": 0})
    vocab_pos = g.op("Unsqueeze", [g.op("Range", [zero_i, vocab, one_i]), g.const(np.array([0], np.int64))])
    g.op("Or", [seen, g.op("Equal", [vocab_pos, next_ids])], outputs=["seen_out"])
    ones = g.op("Expand", [g.const(np.ones((1, 1), np.int64)), g.op("Shape", [next_ids])])
    next_mask = g.op("Concat", [mask, ones], {"axis": 1}, outputs=["next_attention_mask"])
    g.op("Sub", [g.op("ReduceSum", [next_mask, axis1], {"keepdims": 1}), one_i], outputs=["next_position_ids"])
    g.op("Add", [step, one_i], outputs=["step_out"])

    g.output("next_ids", "int64", ["batch", 1])
    g.output("next_attention_mask", "int64", ["batch", "total_next"])
    g.output("next_position_ids", "int64", ["batch", 1])
    g.output("seen_out", "bool", ["batch", "vocab"])
    g.output("step_out", "int64", [])
    return g.to_bytes()
