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

from runtime._onnx_proto import read_varint
from runtime.sampler_graph import candidate_segments
from runtime.step_graph import PREFIX, step_fragment

__all__ = ["fuse_step", "has_branch", "step_node_names", "unbranch_step"]

_GRAPH = 7  # ModelProto.graph
_NODE, _INITIALIZER, _VALUE_INFO = 1, 5, 13  # GraphProto fields
_NODE_NAME, _TENSOR_NAME, _VALUE_INFO_NAME = 3, 8, 1


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


def _length_delimited(field: int, payload: bytes) -> bytes:
    out, value = bytearray(), (field << 3) | 2
    for number in (value, len(payload)):
        while True:
            byte = number & 0x7F
            number >>= 7
            out.append(byte | (0x80 if number else 0))
            if not number:
                break
    return bytes(out) + payload


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
