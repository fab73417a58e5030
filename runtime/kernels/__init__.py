"""lmforge's own CUDA kernels, loaded into the stock onnxruntime-gpu as a custom-op library.

One op today, ``lmforge.FusedSample`` (``sampling.cu``): the step model's whole sampling block
(penalties, min-new-tokens masking, greedy, temperature, top-k, top-p, min-p, the seeded draw and
the state update) in one kernel launch, where the ONNX sampler (:mod:`runtime.sampler_graph`)
launches ~80 small kernels. ``lmforge kernels build`` compiles it for the installed GPU
(:mod:`runtime.kernels.build`); :func:`kernel_library` finds that build when a CUDA session is
opened, and the slots backend then swaps the step model's sampling nodes for the one fused node
(:func:`runtime.kernels.graph.fuse_step`). Without a build, or with ``LMFORGE_KERNELS=0``, nothing
changes: the ONNX sampler serves, as on the CPU.
docs/kernels.md has the details and the numbers.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

__all__ = ["DOMAIN", "FUSED_SAMPLE", "kernel_library"]

log = logging.getLogger(__name__)

DOMAIN = "lmforge"  # the custom ops' ONNX domain
FUSED_SAMPLE = "FusedSample"


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
