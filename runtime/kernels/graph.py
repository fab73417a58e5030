"""Swap a shipped step model's sampling nodes for the fused kernel, on the serialized bytes.

The step model in an artifact (:mod:`runtime.step_graph`) carries the ONNX sampler. When the
kernels library is present, the slots backend loads the same graph with its step nodes rebuilt
around one ``lmforge.FusedSample`` node (:func:`fuse_step`): every node, initializer and
value-info record whose name is under the step's prefix is dropped from the ``GraphProto``, and
the step's nodes built with ``fused=True`` are appended as a fragment (protobuf's merge, as
:func:`runtime.step_graph.append_step` does). The graph's inputs and outputs stay as declared,
so the backends bind exactly what they bind today; the host inputs that only the ONNX sampler
read (``candidates``, ``sampled_rows``, …) are still declared and bound, and read by nothing.

The same swap serves a CUDA session without the kernels library that opens a step model built
for the CPU (:func:`unbranch_step`): a CPU step holds an ``If`` (its greedy branch,
:func:`runtime.sampler_graph.add_sampling`), which a CUDA graph cannot capture, so its step nodes
are rebuilt as a CUDA artifact ships them.

No ``onnx`` dependency: the walk reads protobuf's wire format (varint keys, length-delimited
fields) and copies every field it does not drop byte for byte, the decoder's weights included.
"""

from __future__ import annotations

from collections.abc import Iterator

from runtime._onnx_proto import _bytes as _length_delimited
from runtime._onnx_proto import _int, _str, read_varint
from runtime.kernels import DOMAIN, SILU_MUL
from runtime.sampler_graph import candidate_segments
from runtime.step_graph import PREFIX, step_fragment

__all__ = ["SILU_GATE_PREFIX", "fuse_silu_gates", "fuse_step", "has_branch", "step_node_names", "unbranch_step"]

SILU_GATE_PREFIX = "lmforge_silu_mul."
"""The names :func:`passes.fuse_projections.name_silu_gates` gives a SwiGLU gate's four nodes
(``<prefix><k>.split`` / ``.sigmoid`` / ``.silu`` / ``.gate``)."""

_GRAPH, _OPSET_IMPORT = 7, 8  # ModelProto fields
_NODE, _INITIALIZER, _VALUE_INFO = 1, 5, 13  # GraphProto fields
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_DOMAIN = 1, 2, 3, 4, 7  # NodeProto fields
_TENSOR_NAME, _VALUE_INFO_NAME = 8, 1
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2  # OperatorSetIdProto fields


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field, wire type, start of the record, start of the payload, end)`` for each record."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, end = read_varint(buf, pos)
        elif wire == 1:
            end = pos + 8
        elif wire == 5:
            end = pos + 4
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            end = pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if end > len(buf):
            raise ValueError("truncated protobuf field")
        yield field, wire, start, pos, end
        pos = end


def _name(message: memoryview, field: int) -> str:
    for number, wire, _, payload, end in _fields(message):
        if number == field and wire == 2:
            return bytes(message[payload:end]).decode("utf-8", errors="replace")
    return ""


_NAMED = {_NODE: _NODE_NAME, _INITIALIZER: _TENSOR_NAME, _VALUE_INFO: _VALUE_INFO_NAME}


def _without_step(graph: memoryview) -> tuple[bytes, int]:
    """The GraphProto without the step's nodes, initializers and value infos; how many nodes went."""
    kept, dropped = [], 0
    for field, wire, start, payload, end in _fields(graph):
        if wire == 2 and field in _NAMED and _name(graph[payload:end], _NAMED[field]).startswith(PREFIX):
            dropped += field == _NODE
            continue
        kept.append(graph[start:end])
    return b"".join(kept), dropped


def step_node_names(model: bytes) -> list[str]:
    """The names of the step nodes of a serialized model (for tests and checks)."""
    buf = memoryview(model)
    names = []
    for field, wire, _, payload, end in _fields(buf):
        if field == _GRAPH and wire == 2:
            graph = buf[payload:end]
            for number, kind, _, start, stop in _fields(graph):
                if number == _NODE and kind == 2:
                    name = _name(graph[start:stop], _NODE_NAME)
                    if name.startswith(PREFIX):
                        names.append(name)
    return names


def has_branch(model: bytes) -> bool:
    """Whether the step model's sampling holds the greedy ``If`` (a step built for the CPU)."""
    return any(name.startswith(PREFIX + "If_") for name in step_node_names(model))


def fuse_step(model: bytes, vocab: int, window: int) -> bytes:
    """``model`` (a shared-buffer decoder with its step model) with the step's nodes rebuilt around
    the fused sampling kernel. Raises ``ValueError`` when the bytes hold no step nodes."""
    return _replace_step(model, step_fragment(vocab, window, fused=True, io=False))


def unbranch_step(model: bytes, vocab: int, window: int) -> bytes:
    """``model`` with the step's nodes rebuilt as a CUDA artifact ships them: the ONNX sampler
    without the greedy ``If``, its candidates selected in parts of the row. Raises ``ValueError``
    when the bytes hold no step nodes."""
    return _replace_step(model, step_fragment(vocab, window, candidate_segments(vocab), io=False))


def _replace_step(model: bytes, fragment: bytes) -> bytes:
    buf = memoryview(model)
    parts, dropped = [], 0
    for field, wire, start, payload, end in _fields(buf):
        if field == _GRAPH and wire == 2:
            graph, gone = _without_step(buf[payload:end])
            dropped += gone
            parts.append(_length_delimited(_GRAPH, graph))
        else:
            parts.append(bytes(buf[start:end]))
    if not dropped:
        raise ValueError("the model holds no step nodes to rebuild")
    return b"".join(parts) + fragment


def _strings(message: memoryview, field: int) -> list[str]:
    return [bytes(message[payload:end]).decode("utf-8", errors="replace")
            for number, wire, _, payload, end in _fields(message) if number == field and wire == 2]


def _node(name: str, op_type: str, domain: str, inputs: list[str], outputs: list[str]) -> bytes:
    """A serialized NodeProto."""
    body = b"".join(_str(_NODE_INPUT, i) for i in inputs) + b"".join(_str(_NODE_OUTPUT, o) for o in outputs)
    return body + _str(_NODE_NAME, name) + _str(_NODE_OP_TYPE, op_type) + _str(_NODE_DOMAIN, domain)


def fuse_silu_gates(model: bytes) -> tuple[bytes, int]:
    """``model`` with each named SwiGLU gate (:data:`SILU_GATE_PREFIX`, named by
    :func:`passes.fuse_projections.name_silu_gates`) replaced by one ``lmforge.SiluMul`` node:
    ``y = silu(h[..., :I]) * h[..., I:]`` from the fused gate|up projection ``h`` (the group's
    ``Split`` input) to the group's output ``y``, in the place of the group's last node. Returns
    the bytes and how many gates were replaced (0: the bytes unchanged). The ``lmforge`` domain is
    imported (version 1) when the model does not import it yet. A model may hold several graph
    records (:func:`fuse_step` appends one, which protobuf merges); each is rewritten on its own."""
    buf = memoryview(model)
    graphs = [buf[payload:end] for field, wire, _, payload, end in _fields(buf) if field == _GRAPH and wire == 2]
    groups: dict[str, dict[str, tuple[list[str], list[str]]]] = {}
    for graph in graphs:
        for field, wire, _, payload, end in _fields(graph):
            if field != _NODE or wire != 2:
                continue
            node = graph[payload:end]
            name = _name(node, _NODE_NAME)
            if name.startswith(SILU_GATE_PREFIX):
                group, _, part = name[len(SILU_GATE_PREFIX):].rpartition(".")
                groups.setdefault(group, {})[part] = (_strings(node, _NODE_INPUT), _strings(node, _NODE_OUTPUT))
    whole = {g: parts for g, parts in groups.items() if set(parts) == {"split", "sigmoid", "silu", "gate"}}
    if not whole:
        return model, 0

    def rewrite(graph: memoryview) -> bytes:
        kept = []
        for field, wire, start, payload, end in _fields(graph):
            if field == _NODE and wire == 2:
                name = _name(graph[payload:end], _NODE_NAME)
                group, _, part = name[len(SILU_GATE_PREFIX):].rpartition(".") \
                    if name.startswith(SILU_GATE_PREFIX) else ("", "", "")
                if group in whole:
                    if part == "gate":
                        parts = whole[group]
                        kept.append(_length_delimited(_NODE, _node(f"{SILU_GATE_PREFIX}{group}", SILU_MUL, DOMAIN,
                                                                   parts["split"][0][:1], parts["gate"][1][:1])))
                    continue
            kept.append(bytes(graph[start:end]))
        return b"".join(kept)

    imported = any(_name(buf[payload:end], _OPSET_DOMAIN) == DOMAIN
                   for field, wire, _, payload, end in _fields(buf) if field == _OPSET_IMPORT and wire == 2)
    out = [_length_delimited(_GRAPH, rewrite(buf[payload:end])) if field == _GRAPH and wire == 2
           else bytes(buf[start:end]) for field, wire, start, payload, end in _fields(buf)]
    if not imported:
        out.append(_length_delimited(_OPSET_IMPORT, _str(_OPSET_DOMAIN, DOMAIN) + _int(_OPSET_VERSION, 1)))
    return b"".join(out), len(whole)
