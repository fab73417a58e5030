"""The slots step model: decoder + sampling (:mod:`runtime.sampler_graph`) + next inputs, one model.

A decode step of the slots backend is *one* ``run_with_iobinding`` (one CUDA-graph replay on
CUDA): the shared-buffer decoder, then per-row sampling with each request's own parameters
(greedy and sampled rows together), then the next step's inputs. The host reads the new ids
back once per block of steps from a ``[rows, window]`` history.

**It ships in the artifact.** ``lmforge optimize`` appends the step nodes to the shared-buffer
decoder it writes (:func:`append_step`), lists their inputs and outputs in the manifest's ``io``
and records ``step = {"format", "prefix", "window"}`` (:func:`manifest_entry`); the runtime
loads ``model.onnx`` as it is, so ``verify``, ``verify --layerwise`` and ``inspect`` see the graph
that serves, hashed like every other file. Nothing in the step depends on how the engine is
loaded: the KV capacity and the length of the uniforms are per-row inputs, not constants.

How the nodes are added without the ``onnx`` package (``runtime`` must not depend on it, and
this module is the single definition both ``optimize`` and the tests use): a serialized
``ModelProto`` followed by a second serialized ``ModelProto`` fragment parses as the *merge* of
the two (protobuf's documented semantics: repeated fields are appended, embedded messages
merged). :func:`step_fragment` encodes a graph holding only the extra nodes, inputs, outputs and
initializers; the decoder's weights stay in its external-data file.

The appended inputs and outputs (every name under :data:`PREFIX`), for ``b`` rows:

state (ping-ponged: :data:`STATE` pairs an input with the output that replaces it)
    ``input_ids [b, 1]``, ``position_ids [b, 1]``, ``seqlens_k [b]`` (the decoder's own inputs),
    ``seen``, ``counts``, ``step`` (sampling state) and ``history [b, window]``.
constants (written once per request into its row)
    the sampling parameters of :data:`runtime.sampler_graph.ROW_CONSTANTS` and
    ``last_position`` (the row's KV capacity − 1).
host inputs (``[1]`` int64 in host memory, :data:`runtime.sampler_graph.STEP_HOST_INPUTS`)
    ``candidates`` (how many sorted candidates top-k / top-p read), ``sampled_rows``,
    ``penalized_rows`` and ``filtered_rows`` (0: no row of the run samples / is penalized /
    reads top-k, top-p or min-p, and those nodes run on no rows), and ``parted_rows`` (the
    candidates selected in parts of the row, :func:`runtime.sampler_graph.candidate_segments`:
    on CUDA for more than 256 candidates); each value is its own captured graph.

Each row's last real token is its ``seqlens_k`` (GroupQueryAttention's "total length − 1"):
the step samples from that row's logits at column ``seqlens_k − position_ids[:, 0]``, which is
0 in decode and the prompt's end in a prefill whose rows are right-padded to a common length
(a batched prefill; GQA's first-prompt path masks keys past each row's ``seqlens_k``, so padding
changes nothing for the real positions). The next position is ``seqlens_k + 1`` (also the next
``seqlens_k``), clamped to ``last_position``: a row that finished inside a block, or a free slot
inside the bucket, keeps writing its own last KV position and never past its buffer row. The
new id is written into ``history`` at column ``step mod window``.

Format 3 (this one) adds ``parted_rows``; format 2 sampled at ``seqlens_k`` already; format 1
sampled the run's last column and could not prefill right-padded rows together.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime._onnx_proto import GraphBuilder, fragment_bytes
from runtime.sampler_graph import ROW_CONSTANTS, ROW_INPUTS, STEP_HOST_INPUTS, add_sampling, declare_row_inputs

__all__ = ["FORMAT", "PREFIX", "STATE", "CONSTANTS", "WINDOW", "append_step", "manifest_entry", "neutral_feeds",
           "step_fragment", "step_io"]

FORMAT = 3  # bumped whenever the step's inputs or semantics change; the runtime refuses another
WINDOW = 32  # columns of the id history: the most decode steps between two host reads
PREFIX = "lmforge_step."
# (input, the output that becomes it next step, dtype)
STATE = (
    ("input_ids", PREFIX + "next_input_ids", "int64"),
    ("position_ids", PREFIX + "next_position_ids", "int64"),
    ("seqlens_k", PREFIX + "next_seqlens_k", "int32"),
    (PREFIX + "seen", PREFIX + "seen_out", "bool"),
    (PREFIX + "counts", PREFIX + "counts_out", "float32"),
    (PREFIX + "step", PREFIX + "step_out", "int64"),
    (PREFIX + "history", PREFIX + "history_out", "int64"),
)
CONSTANTS = tuple((PREFIX + name, dtype) for name, dtype in (*ROW_CONSTANTS, ("last_position", "int64")))
_INT32, _INT64 = 6, 7


def _outputs(vocab: int, window: int) -> list[tuple[str, str, list[int | str]]]:
    p = PREFIX
    return [(p + "next_input_ids", "int64", ["batch", 1]), (p + "next_position_ids", "int64", ["batch", 1]),
            (p + "next_seqlens_k", "int32", ["batch"]), (p + "seen_out", "bool", ["batch", vocab]),
            (p + "counts_out", "float32", ["batch", vocab]), (p + "step_out", "int64", ["batch"]),
            (p + "history_out", "int64", ["batch", window])]


def _build(vocab: int, window: int, segments: int = 1, fused: bool = False, branch: bool = False) -> GraphBuilder:
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    g = GraphBuilder("lmforge_step", prefix=PREFIX)
    p = PREFIX
    names = declare_row_inputs(g, vocab, prefix=p, host_inputs=STEP_HOST_INPUTS)
    last_position = g.input(p + "last_position", "int64", ["batch"])
    history = g.input(p + "history", "int64", ["batch", window])
    axis1 = g.const(np.array([1], np.int64))
    # the row's last real token: column seqlens_k − position_ids[:, 0] of this run's logits (0 in
    # decode; the prompt's end in a right-padded batched prefill)
    seqlens = g.op("Unsqueeze", [g.op("Cast", ["seqlens_k"], {"to": _INT64}), axis1])  # [b, 1]
    first_pos = g.op("Gather", ["position_ids", g.const(np.array([0], np.int64))], {"axis": 1})  # [b, 1]
    column = g.op("Expand", [g.op("Unsqueeze", [g.op("Sub", [seqlens, first_pos]), g.const(np.array([2], np.int64))]),
                             g.const(np.array([1, 1, vocab], np.int64))])  # [b, 1, vocab]
    last = g.op("Squeeze", [g.op("GatherElements", ["logits", column], {"axis": 1}), axis1])
    # the sampling nodes write the outputs themselves (an Identity would be a device copy a step)
    written = {"next_ids": p + "next_input_ids", "seen": p + "seen_out", "counts": p + "counts_out",
               "step": p + "step_out"}
    out = add_sampling(g, last, vocab, names, outputs=written, segments=segments, fused=fused, branch=branch)
    nxt = out["next_ids"]
    pos = g.op("Min", [g.op("Add", [seqlens, g.const(1, "int64")]), g.op("Unsqueeze", [last_position, axis1])],
               outputs=[p + "next_position_ids"])
    g.op("Cast", [g.op("Squeeze", [pos, axis1])], {"to": _INT32}, outputs=[p + "next_seqlens_k"])
    slot = g.op("Unsqueeze", [g.op("Mod", [names["step"], g.const(window, "int64")]), axis1])
    g.op("ScatterElements", [history, slot, nxt], {"axis": 1}, outputs=[p + "history_out"])
    for name, dtype, shape in _outputs(vocab, window):
        g.output(name, dtype, shape)
    return g


def step_fragment(vocab: int, window: int = WINDOW, segments: int = 1, fused: bool = False, io: bool = True,
                  branch: bool = False) -> bytes:
    """The graph fragment to append to a shared-buffer decoder (see the module docstring);
    ``segments``: the top-k / top-p candidates selected in that many parts of the row
    (:func:`runtime.sampler_graph.candidate_segments`; the same values, faster on CUDA).
    ``fused``: the sampling as one ``lmforge.FusedSample`` node (:mod:`runtime.kernels`);
    ``io=False``: nodes and initializers only (:func:`runtime.kernels.graph.fuse_step`);
    ``branch``: a run with no sampled and no penalized row takes an ``If`` branch holding the
    ``ArgMax`` alone (:func:`runtime.sampler_graph.add_sampling`; CPU step models, since CUDA
    graphs capture no control flow)."""
    return fragment_bytes(_build(vocab, window, segments, fused, branch), io=io)


def append_step(decoder: bytes, vocab: int, window: int = WINDOW, segments: int = 1, branch: bool = False) -> bytes:
    """The decoder's ``ModelProto`` bytes with the step fragment merged in (see :func:`step_fragment`)."""
    return decoder + step_fragment(vocab, window, segments, branch=branch)


def step_io(vocab: int, window: int = WINDOW) -> dict[str, list[dict[str, Any]]]:
    """The step's own inputs and outputs, in the manifest's ``io`` shape (appended to the decoder's)."""
    g = _build(vocab, window)
    inputs = [{"name": name, "dtype": dtype, "shape": list(shape)} for name, dtype, shape in g.inputs]
    outputs = [{"name": name, "dtype": dtype, "shape": list(shape)} for name, dtype, shape in _outputs(vocab, window)]
    return {"inputs": inputs, "outputs": outputs}


def manifest_entry(window: int = WINDOW) -> dict[str, Any]:
    """The manifest's ``step`` record for a step model of this module's :data:`FORMAT`."""
    return {"format": FORMAT, "prefix": PREFIX, "window": window}


def neutral_feeds(batch: int, vocab: int, window: int = WINDOW, capacity: int = 1 << 30) -> dict[str, np.ndarray]:
    """Step inputs for ``batch`` greedy rows with no penalties (graph checks, layer-wise runs).

    The decoder's own inputs are not included; the draw and the penalties run on no rows.
    """
    feeds: dict[str, np.ndarray] = {}
    ones = {**{row.name: row.neutral for row in ROW_INPUTS}, "candidates": 1, "last_position": capacity - 1}
    for spec in step_io(vocab, window)["inputs"]:  # all under PREFIX: the decoder's own are the caller's
        name = spec["name"]
        dims = [batch if d == "batch" else 1 if d == "steps" else d for d in spec["shape"]]
        feeds[name] = np.full(dims, ones.get(name[len(PREFIX):], 0), dtype=np.dtype(spec["dtype"]))
    return feeds
