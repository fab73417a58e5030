"""The batch-compaction graph: drop finished rows from every per-row tensor in one device run.

When rows of a batch finish, the engine keeps decoding only the others. Their KV cache, the
next step's inputs and the sampler's per-row state are gathered on the device by this graph
(one ``Gather`` per tensor, all in one session run, bound with IO binding), so compaction moves
no tensor through the host: only the ``keep [rows]`` index list is uploaded.
"""

from __future__ import annotations

from typing import Sequence

from runtime._onnx_proto import GraphBuilder

__all__ = ["build_compact_model", "COMPACT_INDEX"]

COMPACT_INDEX = "keep_rows"


def build_compact_model(tensors: Sequence[tuple[str, str, int, int]]) -> bytes:
    """ModelProto bytes gathering ``keep_rows`` along each tensor's batch axis.

    ``tensors``: ``(name, dtype, rank, batch_axis)``; the output of ``name`` is ``name + "__kept"``.
    """
    g = GraphBuilder("lmforge_compact")
    keep = g.input(COMPACT_INDEX, "int64", ["kept"])
    for name, dtype, rank, axis in tensors:
        shape: list[int | str] = [f"{name}_d{i}" for i in range(rank)]
        g.input(name, dtype, shape)
        g.op("Gather", [name, keep], {"axis": axis}, outputs=[f"{name}__kept"])
        g.output(f"{name}__kept", dtype, [("kept" if i == axis else d) for i, d in enumerate(shape)])
    return g.to_bytes()
