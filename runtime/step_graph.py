"""The fused decode step: decoder + greedy sampler + next-input arithmetic in one ONNX model.

:class:`runtime.shared_kv.SharedBufferEngine` runs greedy batches through this model, so that a
decode step is *one* ``run_with_iobinding`` (one CUDA-graph replay on CUDA) instead of three
(decoder, sampler, advance), and the host reads the generated ids once per block of steps rather
than after every step. Profiling the three-session step on an H200 showed ~1.9 ms a token for both
a 135M and a 1B model: per-step overhead, not the decoder, was the cost.

How the model is built, without the ``onnx`` package (``runtime`` must not depend on it): a
serialized ``ModelProto`` followed by a second serialized ``ModelProto`` fragment parses as the
*merge* of the two (protobuf's documented semantics: repeated fields are appended, embedded
singular messages merged). :func:`step_fragment` encodes a ``graph`` holding only the extra nodes,
inputs, outputs and initializers, and :func:`compose_step_model` appends it to the decoder's
bytes. The decoder's weights stay in its external-data file; the session is pointed at the
artifact folder with ``session.model_external_initializers_file_folder_path``.

The appended nodes (every name under the ``lmforge_step.`` prefix), for ``b`` rows:

inputs
    ``seen [b, vocab]`` bool, ``stop_mask [b, vocab]`` bool, ``min_new_tokens [b]`` int64,
    ``repetition_penalty [b]`` float32, ``prompt_lens [b]`` int64, ``step []`` int64 (tokens
    generated so far), ``history [b, window]`` int64.
outputs
    ``next_input_ids [b, 1]`` (the greedy token), ``next_position_ids [b, 1]`` and
    ``next_seqlens_k [b]`` int32 (both ``prompt_len + step``: the new token's position),
    ``seen_out``, ``step_out`` (``step + 1``) and ``history_out`` (``history`` with the new token
    written at column ``step mod window``).

The outputs have the same shapes as the inputs they replace, so two sets of buffers serve every
step: step *n* reads set A and writes set B, step *n + 1* reads B and writes A (no tensor is read
and written by one run; that would depend on kernel internals). On CUDA each direction is its
own captured graph. ``history`` lets the host fetch up to ``window`` tokens with one copy.

The logit processing is exactly the sampler's greedy path (:mod:`runtime.sampler_graph`):
repetition penalty (transformers' semantics), then EOS/stop ids suppressed while
``step < min_new_tokens``, then ``ArgMax`` (first index on ties). Rows that sample (temperature,
top-k, top-p) use the three-session step instead: the sampler's ``TopK``/``Range`` read their
sizes on the host, which a CUDA graph cannot capture. Every op here runs on the CUDA provider and
none reads a shape, so nothing falls back to the CPU.
"""

from __future__ import annotations

import numpy as np

from runtime._onnx_proto import GraphBuilder, fragment_bytes

__all__ = ["PREFIX", "STATE", "CONSTANTS", "step_fragment", "compose_step_model"]

PREFIX = "lmforge_step."
# (input, output it becomes next step, dtype) — the ping-ponged state
STATE = (
    ("input_ids", PREFIX + "next_input_ids", "int64"),
    ("position_ids", PREFIX + "next_position_ids", "int64"),
    ("seqlens_k", PREFIX + "next_seqlens_k", "int32"),
    (PREFIX + "seen", PREFIX + "seen_out", "bool"),
    (PREFIX + "step", PREFIX + "step_out", "int64"),
    (PREFIX + "history", PREFIX + "history_out", "int64"),
)
# per-request inputs that do not change between steps
CONSTANTS = (
    (PREFIX + "stop_mask", "bool"),
    (PREFIX + "min_new_tokens", "int64"),
    (PREFIX + "repetition_penalty", "float32"),
    (PREFIX + "prompt_lens", "int64"),
)
_FLOAT, _INT32 = 1, 6


def step_fragment(vocab: int, window: int) -> bytes:
    """The ``graph`` fragment to append to a shared-buffer decoder (see the module docstring)."""
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    g = GraphBuilder("lmforge_step", prefix=PREFIX)
    p = PREFIX
    seen = g.input(p + "seen", "bool", ["batch", vocab])
    stop_mask = g.input(p + "stop_mask", "bool", ["batch", vocab])
    min_new = g.input(p + "min_new_tokens", "int64", ["batch"])
    penalty = g.input(p + "repetition_penalty", "float32", ["batch"])
    prompt_lens = g.input(p + "prompt_lens", "int64", ["batch"])
    step = g.input(p + "step", "int64", [])
    history = g.input(p + "history", "int64", ["batch", window])
    axis1 = g.const(np.array([1], np.int64))
    zero_f, one_i = g.const(0.0, "float32"), g.const(1, "int64")

    # the last position (decode: the only one; a prefill through this model ignores the step
    # outputs), in float32 as the sampler does
    x = g.op("Cast", [g.op("Gather", ["logits", g.const(-1, "int64")], {"axis": 1})], {"to": _FLOAT})
    pen = g.op("Unsqueeze", [penalty, axis1])
    penalized = g.op("Where", [g.op("Greater", [x, zero_f]), g.op("Div", [x, pen]), g.op("Mul", [x, pen])])
    x = g.op("Where", [seen, penalized, x])
    early = g.op("Unsqueeze", [g.op("Less", [step, min_new]), axis1])
    x = g.op("Where", [g.op("And", [stop_mask, early]), g.const(-np.inf, "float32"), x])
    nxt = g.op("ArgMax", [x], {"axis": 1, "keepdims": 1, "select_last_index": 0}, outputs=[p + "next_input_ids"])

    vocab_ids = g.const(np.arange(vocab, dtype=np.int64)[None, :])
    g.op("Or", [seen, g.op("Equal", [vocab_ids, nxt])], outputs=[p + "seen_out"])
    step_out = g.op("Add", [step, one_i], outputs=[p + "step_out"])
    pos = g.op("Sub", [g.op("Add", [prompt_lens, step_out]), one_i])  # the new token's position
    g.op("Unsqueeze", [pos, axis1], outputs=[p + "next_position_ids"])
    g.op("Cast", [pos], {"to": _INT32}, outputs=[p + "next_seqlens_k"])
    # column step mod window, as a [b, 1] index (nxt·0 + column broadcasts without a Shape op)
    column = g.op("Add", [g.op("Mul", [nxt, g.const(0, "int64")]), g.op("Mod", [step, g.const(window, "int64")])])
    g.op("ScatterElements", [history, column, nxt], {"axis": 1}, outputs=[p + "history_out"])

    g.output(p + "next_input_ids", "int64", ["batch", 1])
    g.output(p + "next_position_ids", "int64", ["batch", 1])
    g.output(p + "next_seqlens_k", "int32", ["batch"])
    g.output(p + "seen_out", "bool", ["batch", vocab])
    g.output(p + "step_out", "int64", [])
    g.output(p + "history_out", "int64", ["batch", window])
    return fragment_bytes(g)


def compose_step_model(decoder: bytes, vocab: int, window: int) -> bytes:
    """The decoder's ``ModelProto`` bytes with the step fragment merged in."""
    return decoder + step_fragment(vocab, window)
