"""lmforge's own CUDA kernels, loaded into the stock onnxruntime-gpu as a custom-op library.

Two ops. ``lmforge.FusedSample`` (``sampling.cu``): the step model's whole sampling block
(penalties, min-new-tokens masking, greedy, temperature, top-k, top-p, min-p, the seeded draw and
the state update) in one kernel launch, where the ONNX sampler (:mod:`runtime.sampler_graph`)
launches ~80 small kernels. ``lmforge.SiluMul`` (``silu_mul.cu``): a SwiGLU gate over the fused
gate|up projection of a CUDA fp16 artifact in one launch, where onnxruntime runs a Split, a
QuickGelu and a Mul. ``lmforge kernels build`` compiles them for the installed GPU
(:mod:`runtime.kernels.build`); :func:`kernel_library` finds that build when a CUDA session is
opened, and the slots backend then swaps the step model's sampling nodes for the one fused node
(:func:`runtime.kernels.graph.fuse_step`) and each named SwiGLU gate for one ``SiluMul``
(:func:`runtime.kernels.graph.fuse_silu_gates`; ``LMFORGE_KERNELS_SILU=0`` keeps the gates' ONNX
nodes). Without a build, or with ``LMFORGE_KERNELS=0``, nothing changes: the ONNX nodes serve, as
on the CPU.
docs/kernels.md has the details and the numbers.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

__all__ = ["DOMAIN", "FUSED_SAMPLE", "SILU_MUL", "SILU_MUL_VERSION", "kernel_library", "library_version",
           "silu_gates_on"]

log = logging.getLogger(__name__)

DOMAIN = "lmforge"  # the custom ops' ONNX domain
FUSED_SAMPLE = "FusedSample"
SILU_MUL = "SiluMul"
SILU_MUL_VERSION = 2  # the library version (``lmforge_kernels_version``) from which it holds SiluMul


@functools.cache
def library_version(path: Path) -> int:
    """The interface version a kernels library reports (``lmforge_kernels_version``; 0 when it
    reports none): a library named by ``LMFORGE_KERNELS_LIB`` may predate an op."""
    try:
        fn = ctypes.CDLL(str(path)).lmforge_kernels_version
    except (OSError, AttributeError):
        return 0
    fn.restype = ctypes.c_int
    return int(fn())


def silu_gates_on() -> bool:
    """Whether SwiGLU gates run as ``lmforge.SiluMul`` when the library holds it (read per session:
    ``LMFORGE_KERNELS_SILU=0`` keeps their ONNX nodes, for A/B timing and as an escape hatch)."""
    return os.environ.get("LMFORGE_KERNELS_SILU", "").strip().lower() not in ("0", "off", "false", "no")


@functools.cache
def kernel_library() -> Path | None:
    """The built custom-op library for this machine's GPU, or None (then the ONNX sampler serves).

    Used whenever it is built (``lmforge kernels build``, which ``make setup`` runs on a CUDA
    machine); ``LMFORGE_KERNELS=0`` turns it off (the ONNX sampler then serves, as without a build).
    ``LMFORGE_KERNELS_LIB=/path/lib.so`` names a library to use; otherwise the cached build for the
    first GPU's architecture, when there is one. Called only for CUDA sessions (it asks
    ``nvidia-smi``)."""
    setting = os.environ.get("LMFORGE_KERNELS", "").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return None
    named = os.environ.get("LMFORGE_KERNELS_LIB", "").strip()
    if named:
        path = Path(named)
        if not path.is_file():
            log.warning("LMFORGE_KERNELS_LIB=%s is not a file: the ONNX sampler serves", named)
            return None
        return path
    from runtime.kernels.build import detect_arch, library_path

    arch = detect_arch()
    if arch is None:
        return None
    path = library_path(arch)
    if not path.is_file():
        log.info("no lmforge kernels built for %s (`lmforge kernels build`): the ONNX sampler serves", arch)
        return None
    return path
