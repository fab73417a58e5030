"""The slots step model: decoder + sampling (:mod:`runtime.sampler_graph`) + next inputs, one model.

A decode step of the slots backend is *one* ``run_with_iobinding`` (one CUDA-graph replay on
CUDA): the shared-buffer decoder, then per-row sampling with each request's own parameters
(greedy and sampled rows together), then the next step's inputs. The host reads the new ids
back once per block of steps from a ``[rows, window]`` history.

How the model is built without the ``onnx`` package (``runtime`` must not depend on it): a
serialized ``ModelProto`` followed by a second serialized ``ModelProto`` fragment parses as the
*merge* of the two (protobuf's documented semantics: repeated fields are appended, embedded
messages merged). :func:`step_fragment` encodes a graph holding only the extra nodes, inputs,
outputs and initializers; :func:`compose_step_model` appends it to the decoder's bytes. The
decoder's weights stay in its external-data file (the session is pointed at the artifact
folder).

The appended inputs and outputs (every name under :data:`PREFIX`), for ``b`` rows:

state (ping-ponged: :data:`STATE` pairs an input with the output that replaces it)
    ``input_ids [b, 1]``, ``position_ids [b, 1]``, ``seqlens_k [b]`` (the decoder's own inputs),
    ``seen``, ``counts``, ``step`` (sampling state) and ``history [b, window]``.
constants (written once per request into its row)
    the sampling parameters of :data:`runtime.sampler_graph.ROW_CONSTANTS`.
``candidates [1]``
    host memory: how many sorted candidates the step's top-k / top-p read (1 when no row uses
    them); each value is its own captured graph.

The next position is the current last position + 1 (also GroupQueryAttention's next
``seqlens_k``), clamped to ``capacity − 1``: a row that finished inside a block, or a free slot
inside the bucket, keeps writing its own last KV position and never past its buffer row. The
new id is written into ``history`` at column ``step mod window``.
"""

from __future__ import annotations

import numpy as np

from runtime._onnx_proto import GraphBuilder, fragment_bytes
from runtime.sampler_graph import ROW_CONSTANTS, add_sampling, declare_row_inputs

__all__ = ["PREFIX", "STATE", "CONSTANTS", "step_fragment", "compose_step_model"]

PREFIX = "lmforge_step."
# (input, the output that becomes it next step, dtype, row shape key)
STATE = (
    ("input_ids", PREFIX + "next_input_ids", "int64"),
    ("position_ids", PREFIX + "next_position_ids", "int64"),
    ("seqlens_k", PREFIX + "next_seqlens_k", "int32"),
    (PREFIX + "seen", PREFIX + "seen_out", "bool"),
    (PREFIX + "counts", PREFIX + "counts_out", "float32"),
    (PREFIX + "step", PREFIX + "step_out", "int64"),
    (PREFIX + "history", PREFIX + "history_out", "int64"),
)
CONSTANTS = tuple((PREFIX + name, dtype) for name, dtype in ROW_CONSTANTS)
_INT32 = 6


def step_fragment(vocab: int, window: int, capacity: int, steps: int) -> bytes:
    """The graph fragment to append to a shared-buffer decoder (see the module docstring).

    ``capacity`` is the KV buffer length the engine allocates, ``steps`` the length of the
    per-row ``uniforms`` (the most tokens a request may generate).
    """
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    g = GraphBuilder("lmforge_step", prefix=PREFIX)
    p = PREFIX
    names = declare_row_inputs(g, vocab, steps, prefix=p)
    history = g.input(p + "history", "int64", ["batch", window])
    axis1 = g.const(np.array([1], np.int64))
    last = g.op("Gather", ["logits", g.const(-1, "int64")], {"axis": 1})
    out = add_sampling(g, last, vocab, steps, names)
    nxt = g.op("Identity", [out["next_ids"]], outputs=[p + "next_input_ids"])
    g.op("Identity", [out["seen"]], outputs=[p + "seen_out"])
    g.op("Identity", [out["counts"]], outputs=[p + "counts_out"])
    g.op("Identity", [out["step"]], outputs=[p + "step_out"])
    last_pos = g.op("Gather", ["position_ids", g.const(np.array([-1], np.int64))], {"axis": 1})  # [b, 1]
    pos = g.op("Min", [g.op("Add", [last_pos, g.const(1, "int64")]), g.const(capacity - 1, "int64")])
    g.op("Identity", [pos], outputs=[p + "next_position_ids"])
    g.op("Cast", [g.op("Squeeze", [pos, axis1])], {"to": _INT32}, outputs=[p + "next_seqlens_k"])
    column = g.op("Unsqueeze", [g.op("Mod", [names["step"], g.const(window, "int64")]), axis1])
    g.op("ScatterElements", [history, column, nxt], {"axis": 1}, outputs=[p + "history_out"])

    g.output(p + "next_input_ids", "int64", ["batch", 1])
    g.output(p + "next_position_ids", "int64", ["batch", 1])
    g.output(p + "next_seqlens_k", "int32", ["batch"])
    g.output(p + "seen_out", "bool", ["batch", vocab])
    g.output(p + "counts_out", "float32", ["batch", vocab])
    g.output(p + "step_out", "int64", ["batch"])
    g.output(p + "history_out", "int64", ["batch", window])
    return fragment_bytes(g)


def compose_step_model(decoder: bytes, vocab: int, window: int, capacity: int, steps: int) -> bytes:
    """The decoder's ``ModelProto`` bytes with the step fragment merged in."""
    return decoder + step_fragment(vocab, window, capacity, steps)
