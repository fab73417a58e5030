"""A tiny ONNX ``ModelProto`` writer, so that ``runtime`` can build its own small graphs.

The runtime builds two helper graphs at load time: the on-device sampler
(:mod:`runtime.sampler_graph`) and the batch-compaction gather. ``runtime`` must not depend on
the ``onnx`` package (services load an artifact with onnxruntime, numpy and tokenizers alone), and
a committed ``.onnx`` binary would be an unreviewable blob, so this module encodes the protobuf
itself: varints and length-delimited fields, ~80 lines for the encoder, plus a small
:class:`GraphBuilder` on top. The bytes go straight to ``onnxruntime.InferenceSession(bytes)``.

It writes only what those graphs need: standard-domain nodes with int/float/ints/tensor
attributes and graph attributes (an ``If``'s branches: a :class:`GraphBuilder` whose nodes read
the enclosing graph's values by name), typed graph inputs and outputs with named or fixed dims,
and initializers as ``raw_data`` (little-endian). ``tests/runtime/test_onnx_proto.py`` round-trips the output through
``onnx.checker.check_model(full_check=True)``.

Field numbers follow ``onnx/onnx.proto`` (proto2 syntax: repeated scalars are written unpacked,
which every protobuf parser accepts).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np

__all__ = ["DTYPE_CODES", "GraphBuilder", "encode_model", "fragment_bytes", "read_varint"]

# TensorProto.DataType
DTYPE_CODES: dict[str, int] = {
    "float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10,
    "float64": 11,
}

# AttributeProto.AttributeType
_ATTR_FLOAT, _ATTR_INT, _ATTR_TENSOR, _ATTR_GRAPH, _ATTR_INTS = 1, 2, 4, 5, 7
# a node attribute's value: a GraphBuilder is a subgraph (an If's branch)
AttrValue: TypeAlias = "int | float | Sequence[int] | np.ndarray | GraphBuilder"


# --------------------------------------------------------------------------------------------
# Protobuf wire format


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``buf[pos:]`` and the position after it (the readers of runtime.artifact and
    runtime.kernels.graph walk serialized models with it)."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 → ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _str(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


def _float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims=1, data_type=2, name=8, raw_data=9."""
    array = np.asarray(array, order="C")  # (ascontiguousarray would turn a scalar into shape [1])
    dtype = DTYPE_CODES[str(array.dtype)]
    out = b"".join(_int(1, d) for d in array.shape) + _int(2, dtype) + _str(8, name)
    return out + _bytes(9, array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def _value_info(name: str, dtype: str, shape: Sequence[int | str]) -> bytes:
    """ValueInfoProto{name=1, type=2: TypeProto{tensor_type=1: {elem_type=1, shape=2}}}."""
    dims = b"".join(
        _bytes(1, _int(1, d) if isinstance(d, int) else _str(2, d)) for d in shape
    )  # TensorShapeProto.dim=1: Dimension{dim_value=1 | dim_param=2}
    tensor_type = _int(1, DTYPE_CODES[dtype]) + _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def _attribute(name: str, value: AttrValue) -> bytes:
    """AttributeProto: name=1, f=2, i=3, t=5, g=6, ints=8, type=20."""
    if isinstance(value, GraphBuilder):
        return _str(1, name) + _bytes(6, _graph_body(value)) + _int(20, _ATTR_GRAPH)
    if isinstance(value, np.ndarray):
        return _str(1, name) + _bytes(5, _tensor("", value)) + _int(20, _ATTR_TENSOR)
    if isinstance(value, (bool, int, np.integer)):
        return _str(1, name) + _int(3, int(value)) + _int(20, _ATTR_INT)
    if isinstance(value, (float, np.floating)):
        return _str(1, name) + _float(2, float(value)) + _int(20, _ATTR_FLOAT)
    return _str(1, name) + b"".join(_int(8, int(v)) for v in value) + _int(20, _ATTR_INTS)


# --------------------------------------------------------------------------------------------
# Graph building


@dataclasses.dataclass
class _Node:
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, AttrValue]
    domain: str = ""


class GraphBuilder:
    """Collects nodes, typed inputs/outputs and initializers; :meth:`to_bytes` encodes them."""

    def __init__(self, name: str, prefix: str = "") -> None:
        self.name = name
        self.prefix = prefix  # for fresh value and node names (a fragment merged into another graph)
        self._nodes: list[_Node] = []
        self.inputs: list[tuple[str, str, tuple[int | str, ...]]] = []  # declared inputs, in order
        self._inputs: list[bytes] = []
        self._outputs: list[bytes] = []
        self._initializers: list[bytes] = []
        self._count = 0
        self.domains: set[str] = set()  # custom operator domains of the nodes (opset version 1 each)

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def input(self, name: str, dtype: str, shape: Sequence[int | str]) -> str:
        self._inputs.append(_value_info(name, dtype, shape))
        self.inputs.append((name, dtype, tuple(shape)))
        return name

    def output(self, name: str, dtype: str, shape: Sequence[int | str]) -> None:
        self._outputs.append(_value_info(name, dtype, shape))

    def const(self, value: np.ndarray | int | float, dtype: str = "") -> str:
        """An initializer holding ``value`` (a numpy array, or a scalar cast to ``dtype``)."""
        array = np.asarray(value, dtype=dtype or None)
        name = self._fresh("const")
        self._initializers.append(_tensor(name, array))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        attrs: dict[str, AttrValue] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> str:
        """Add a one-output node; return its output name (``outputs``: the explicit name, for a
        graph output). An empty string in ``inputs`` marks an omitted optional input."""
        names = self.ops(op_type, inputs, attrs, outputs if outputs is not None else 1)
        if len(names) != 1:
            raise ValueError(f"{op_type}: op() adds one-output nodes; use ops() for {len(names)} outputs")
        return names[0]

    def ops(
        self,
        op_type: str,
        inputs: Sequence[str],
        attrs: dict[str, AttrValue] | None = None,
        outputs: Sequence[str] | int = 1,
        domain: str = "",
    ) -> tuple[str, ...]:
        """Add a node; return its output names (``outputs``: a count of fresh names, or the names;
        ``domain``: a custom operator's domain, imported at opset version 1)."""
        names = (
            tuple(self._fresh(op_type.lower()) for _ in range(outputs))
            if isinstance(outputs, int)
            else tuple(outputs)
        )
        self._nodes.append(_Node(op_type, tuple(inputs), names, dict(attrs or {}), domain))
        if domain:
            self.domains.add(domain)
        return names

    def to_bytes(self, opset: int = 18, ir_version: int = 8, producer: str = "lmforge.runtime") -> bytes:
        return encode_model(self, opset=opset, ir_version=ir_version, producer=producer)


def _node(index: int, node: _Node, prefix: str = "") -> bytes:
    """NodeProto: input=1, output=2, name=3, op_type=4, attribute=5, domain=7."""
    out = b"".join(_str(1, i) for i in node.inputs) + b"".join(_str(2, o) for o in node.outputs)
    out += _str(3, f"{prefix}{node.op_type}_{index}") + _str(4, node.op_type)
    out += b"".join(_bytes(5, _attribute(k, v)) for k, v in node.attrs.items())
    return out + (_str(7, node.domain) if node.domain else b"")


def _graph_body(graph: GraphBuilder, name: bool = True, io: bool = True) -> bytes:
    """GraphProto fields: node=1, name=2, initializer=5, input=11, output=12."""
    body = b"".join(_bytes(1, _node(i, n, graph.prefix)) for i, n in enumerate(graph._nodes))
    if name:
        body += _str(2, graph.name)
    body += b"".join(_bytes(5, t) for t in graph._initializers)
    if not io:
        return body
    body += b"".join(_bytes(11, v) for v in graph._inputs)
    return body + b"".join(_bytes(12, v) for v in graph._outputs)


def _custom_opsets(graph: GraphBuilder) -> bytes:
    """ModelProto.opset_import=8 entries for the graph's custom domains (version 1)."""
    return b"".join(_bytes(8, _str(1, domain) + _int(2, 1)) for domain in sorted(graph.domains))


def encode_model(graph: GraphBuilder, opset: int = 18, ir_version: int = 8, producer: str = "") -> bytes:
    """ModelProto bytes: ir_version=1, producer_name=2, graph=7, opset_import=8."""
    opset_id = _str(1, "") + _int(2, opset)  # OperatorSetIdProto{domain=1, version=2}
    return (_int(1, ir_version) + _str(2, producer) + _bytes(7, _graph_body(graph)) + _bytes(8, opset_id)
            + _custom_opsets(graph))


def fragment_bytes(graph: GraphBuilder, io: bool = True) -> bytes:
    """A ``ModelProto`` holding only ``graph``'s nodes, initializers, inputs and outputs.

    Appended to another model's serialized bytes it *merges* into that model's graph (protobuf
    parsers merge a repeated embedded message field: repeated fields append), so the result is
    the other model plus these nodes, with its inputs/outputs followed by these. No name, IR
    version or opset is written (they would override or duplicate the host model's). Names must
    not collide with the host graph's: give the builder a ``prefix``. ``io=False`` leaves out the
    graph's inputs and outputs (nodes replacing others of a host graph that declares them);
    custom domains are imported (``opset_import``, version 1).
    """
    return _bytes(7, _graph_body(graph, name=False, io=io)) + _custom_opsets(graph)
