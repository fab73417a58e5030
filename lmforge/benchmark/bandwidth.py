"""Memory-bandwidth utilisation: bytes a decode step reads, against the device's measured copy rate.

Decode at small batch is bound by memory traffic: each step reads every weight once and each
row's KV cache. Utilisation = bytes read per step × steps/s ÷ the bandwidth a plain copy reaches
on the same device — a number near 1 means the runtime is at the hardware's floor, a small one
that the time goes elsewhere (kernel launches, host work). The copy rate is measured here, not
taken from a data sheet: a large device-to-device copy (torch when it sees the GPU, else
onnxruntime's CUDA provider running a one-node graph), or a large numpy copy on the CPU; it
counts bytes read plus bytes written, as ``bandwidthTest`` does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

__all__ = ["copy_bandwidth", "kv_bytes_per_row", "bytes_per_step", "utilisation"]

log = logging.getLogger(__name__)


def _best_of(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_copy(nbytes: int, repeats: int) -> float:
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    return 2 * src.nbytes / _best_of(lambda: np.copyto(dst, src), repeats)


def _cuda_copy_torch(nbytes: int, repeats: int) -> float:
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()

    copy()
    return 2 * src.numel() * 4 / _best_of(copy, repeats)


def _cuda_copy_ort(nbytes: int, repeats: int) -> float:
    """A one-node ``Neg`` graph on the CUDA provider: one read and one write of every element."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])], "copy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    n = nbytes // 4
    x = ort.OrtValue.ortvalue_from_numpy(np.ones(n, dtype=np.float32), "cuda", 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", x)
    binding.bind_ortvalue_output("y", y)

    def copy() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    copy()
    return 2 * n * 4 / _best_of(copy, repeats)


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 10) -> tuple[float, str]:
    """The device's copy bandwidth in bytes/s (read + write), and how it was measured.

    ``nbytes`` defaults to 1 GiB on CUDA and 256 MiB on the CPU (well past the last-level cache).
    """
    if device == "cuda":
        size = nbytes or 2**30
        try:
            import torch

            if torch.cuda.is_available():
                return _cuda_copy_torch(size, repeats), f"torch device-to-device copy of {size >> 20} MiB"
        except ImportError:
            pass
        return _cuda_copy_ort(size, repeats), f"onnxruntime CUDA Neg of {size >> 20} MiB"
    size = nbytes or 2**28
    return _cpu_copy(size, repeats), f"numpy copy of {size >> 20} MiB"


def kv_bytes_per_row(architecture: dict[str, Any], context: float, bytes_per_elem: int) -> float:
    """K and V of every layer for one row at ``context`` tokens."""
    return (2 * int(architecture["layers"]) * int(architecture["kv_heads"]) * int(architecture["head_dim"])
            * context * bytes_per_elem)


def bytes_per_step(weight_bytes: int, architecture: dict[str, Any], batch: int, mean_context: float,
                   kv_bytes_per_elem: int) -> float:
    """What one decode step of a batch reads: the weights once, plus every row's KV cache."""
    return weight_bytes + batch * kv_bytes_per_row(architecture, mean_context, kv_bytes_per_elem)


def utilisation(step_bytes: float, steps_per_s: float, bandwidth: float) -> float:
    return step_bytes * steps_per_s / bandwidth if bandwidth > 0 else 0.0
