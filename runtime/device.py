"""What every KV backend needs from onnxruntime: providers, sessions, device tensors, row views.

:class:`Device` opens sessions on one execution provider and makes ``OrtValue`` s there. Row
views (:meth:`Device.bind_rows`) bind rows ``start:start + n`` of a ``[rows, …]`` device buffer to
a session input or output by address, so a batch-1 prefill writes into its slot of a pool and
a decode step reads the first ``n`` rows, with nothing copied.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import mmap
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from runtime.errors import GenerationError
from runtime.kernels import kernel_library
from runtime.text import error_line

__all__ = ["Device", "ORT_ERRORS", "NP_DTYPES", "loadable_kernels", "ort_failure"]

log = logging.getLogger(__name__)

NP_DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
                             "bool": np.bool_}
ORT_ERRORS: tuple[type[BaseException], ...] = (MemoryError, RuntimeError) + tuple(
    cls for cls in vars(_ort_state).values() if isinstance(cls, type) and issubclass(cls, Exception)
)


def lazy_zeros(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A zero-filled host array backed by its own anonymous mapping, in base pages (see
    :meth:`Device.sparse_zeros`); the array keeps the mapping alive."""
    count = int(np.prod(shape, dtype=np.int64))
    size = max(count * np.dtype(dtype).itemsize, 1)
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere the mapping is already in base pages
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(list(shape))


def ort_failure(exc: BaseException) -> GenerationError:
    """The error a request sees when onnxruntime fails under it (the loop keeps serving)."""
    return GenerationError(
        "generation failed inside onnxruntime", got=error_line(exc),
        fix="this request failed and the engine keeps serving; on out-of-memory, lower max_batch or the prompt length",
    )


def installed_onnxruntime() -> str:
    """Which onnxruntime distribution provides the module (for the CUDA error message)."""
    found = []
    for dist in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-qnn", "ort-nightly-gpu", "ort-nightly"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found) or f"onnxruntime {ort.__version__} (distribution unknown)"


def cuda_options_from_env() -> dict[str, str]:
    """Extra CUDA provider options from ``LMFORGE_CUDA_PROVIDER_OPTIONS`` ("key=value,key=value"),
    e.g. ``sdpa_kernel=1`` to pick onnxruntime's attention kernels; for measurements."""
    raw = os.environ.get("LMFORGE_CUDA_PROVIDER_OPTIONS", "").strip()
    options = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GenerationError("LMFORGE_CUDA_PROVIDER_OPTIONS is malformed", expected="key=value,key=value",
                                  got=repr(raw), fix="fix or unset the environment variable")
        options[key.strip()] = value.strip()
    return options


def check_device(device: str) -> str:
    """``"cpu"`` or ``"cuda"``, refusing a CUDA request the installed onnxruntime cannot serve."""
    if device == "cpu":
        return device
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise GenerationError(
                "device='cuda' needs onnxruntime's CUDAExecutionProvider, which is not available",
                expected="CUDAExecutionProvider among the providers",
                got=f"{', '.join(available)} from {installed_onnxruntime()}",
                fix="pip uninstall onnxruntime && pip install onnxruntime-gpu (matching your CUDA), "
                "or use device='cpu'",
            )
        return device
    raise GenerationError("unknown device", expected="'cpu' or 'cuda'", got=repr(device))


def loadable_kernels(path: Path | None) -> Path | None:
    """``path`` when onnxruntime loads it as a custom-op library, else None with a warning: a
    kernels library that does not load (built for another onnxruntime, a damaged file) leaves the
    ONNX sampler serving rather than failing every CUDA session; the warning says how to fix it."""
    if path is None:
        return None
    try:
        ort.SessionOptions().register_custom_ops_library(str(path))
    except ORT_ERRORS as exc:
        log.warning("onnxruntime cannot load lmforge's kernels library %s (%s): sampling runs as ONNX nodes; "
                    "rebuild it with `lmforge kernels build --force`, or set LMFORGE_KERNELS=0 to stop this warning",
                    path, error_line(exc))
        return None
    return path


_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
CUDA_ROW_COPY = True
"""Whether :meth:`Device.write_rows` copies the changed rows alone through the CUDA runtime on CUDA
(``cudaMemcpy``; off: the whole tensor, ``update_inplace``). ``tests/runtime/test_gpu.py`` checks
that both ways leave the same device constants and tokens after every admission."""
_H2D = 1  # cudaMemcpyHostToDevice


def _cudart() -> Any:
    """The CUDA runtime library, by name (the one the CUDA provider loaded, where that is on the
    search path; None where none is found): ``cudaMemcpy`` of
    part of a device buffer. onnxruntime's Python API copies whole tensors only
    (``OrtValue.update_inplace``) and has no view of part of one; a small session copying rows by
    address was tried and slowed the decoder's captured step (docs/benchmarks.md)."""
    for name in _CUDART_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemcpy.restype = ctypes.c_int
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaStreamSynchronize.restype = ctypes.c_int
        return lib
    return None


class Device:
    """Sessions and tensors on one execution provider (``cpu`` or ``cuda``, device 0)."""

    def __init__(self, device: str, threads: int | None = None, fp32_exact: bool = False) -> None:
        self.type = check_device(device)
        self.threads = threads
        self._cuda: dict[str, str] = {}
        self._rows_copy: Any = None  # write_rows: "cpu", the CUDA runtime, False (whole copies); None: not looked up
        # lmforge's custom CUDA ops (runtime.kernels), registered in every CUDA session when built
        self.kernels: Path | None = loadable_kernels(kernel_library()) if self.type == "cuda" else None
        if self.type == "cuda":
            self._cuda = {"device_id": "0", **cuda_options_from_env()}
            if fp32_exact:
                # An fp32 artifact promises fp32 numerics (the parity policy holds logits to 1e-3);
                # the CUDA provider's TF32 matmuls would round inputs to 10 mantissa bits.
                self._cuda["use_tf32"] = "0"

    def providers(self, cuda_graph: bool = False) -> list[Any]:
        if self.type == "cpu":
            return ["CPUExecutionProvider"]
        options = dict(self._cuda)
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]

    def session(self, model: str | bytes, small: bool = False, cuda_graph: bool = False,
                weights_dir: Path | None = None) -> ort.InferenceSession:
        """A session on ``model`` (a path, or bytes whose external data lives in ``weights_dir``)."""
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.kernels is not None:
            try:
                options.register_custom_ops_library(str(self.kernels))
            except ORT_ERRORS as exc:
                raise GenerationError(
                    "onnxruntime cannot load lmforge's kernels library", got=error_line(exc),
                    fix="rebuild it with `lmforge kernels build --force`, or set LMFORGE_KERNELS=0 to run without it",
                ) from exc
        if weights_dir is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
        if self.type == "cpu":
            # Spinning intra-op threads wait on each other at every op when another process holds a
            # core, and not spinning costs nothing on a quiet machine (docs/benchmarks.md, "CPU:
            # fused, shared-buffer, int8 and int4 artifacts").
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if small:
                options.intra_op_num_threads = 1  # helper graphs: thread wake-ups cost more than they save
            elif self.threads:
                options.intra_op_num_threads = int(self.threads)
        try:
            return ort.InferenceSession(model, sess_options=options, providers=self.providers(cuda_graph))
        except ORT_ERRORS as exc:
            if cuda_graph and "graph capture" in str(exc).lower():
                raise GenerationError(
                    "CUDA graphs: onnxruntime cannot place every node of this graph on CUDA",
                    got=error_line(exc),
                    fix="re-optimize with `lmforge optimize --device cuda` (fp16/int8/int4), or pass cuda_graph=False",
                ) from exc
            raise GenerationError(
                "onnxruntime cannot open the model", got=error_line(exc),
                fix="re-export the artifact, or check the onnxruntime version",
            ) from exc

    def step_model(self, model: bytes, vocab: int, window: int) -> bytes:
        """The slots step model to open: with its sampling nodes swapped for the fused kernel when
        the kernels library is present (:func:`runtime.kernels.graph.fuse_step`), and its named
        SwiGLU gates for ``lmforge.SiluMul`` (:func:`runtime.kernels.graph.fuse_silu_gates`,
        unless ``LMFORGE_KERNELS_SILU=0`` or the library predates the op); on CUDA without
        it, a step built for the CPU rebuilt without its greedy ``If``, which CUDA graphs cannot
        capture (:func:`runtime.kernels.graph.unbranch_step`); else as shipped."""
        from runtime.kernels import SILU_MUL_VERSION, library_version, silu_gates_on
        from runtime.kernels.graph import fuse_silu_gates, fuse_step, has_branch, unbranch_step

        if self.kernels is not None:
            log.info("sampling with lmforge's fused kernel (%s)", self.kernels)
            model = fuse_step(model, vocab, window)
            if silu_gates_on() and library_version(self.kernels) >= SILU_MUL_VERSION:
                model, gates = fuse_silu_gates(model)
                if gates:
                    log.info("%d SwiGLU gate(s) run as lmforge.SiluMul", gates)
            return model
        if self.type == "cuda" and has_branch(model):
            log.info("a step model built for the CPU: its sampling rebuilt without the greedy branch for CUDA")
            return unbranch_step(model, vocab, window)
        return model

    def put(self, array: np.ndarray) -> ort.OrtValue:
        """A device copy of a host array."""
        if not array.flags.c_contiguous:
            array = array.copy()  # (np.ascontiguousarray would turn a 0-d array into shape [1])
        return ort.OrtValue.ortvalue_from_numpy(array, self.type, 0)

    def zeros(self, shape: Sequence[int], dtype: str) -> ort.OrtValue:
        return self.put(np.zeros(list(shape), dtype=NP_DTYPES[dtype]))

    def sparse_zeros(self, shape: Sequence[int], dtype: str) -> ort.OrtValue:
        """Zeros for a large buffer that is written a little at a time (the KV pool: a row's
        positions fill as its request grows). On the CPU it is an anonymous mapping in base pages,
        so memory is taken as positions are first written, 4 KiB at a time. numpy asks the kernel
        for transparent huge pages for arrays of 4 MiB or more; a 2 MiB page for each head of each
        layer a prompt touches made every prefilled row of a pool cost about two thirds of its
        whole-context KV, kept (docs/benchmarks.md, "CPU: decode against the peers")."""
        if self.type != "cpu":
            return self.zeros(shape, dtype)
        return self.put(lazy_zeros(shape, NP_DTYPES[dtype]))

    @staticmethod
    def host_scalar(value: int) -> ort.OrtValue:
        """An int32 scalar in host memory (GroupQueryAttention reads total_sequence_length there)."""
        return ort.OrtValue.ortvalue_from_numpy(np.array(value, dtype=np.int32))

    def write_rows(self, value: ort.OrtValue, host: np.ndarray, rows: Iterable[int]) -> None:
        """Copy ``rows`` of ``host`` (an array of ``value``'s shape and dtype) into ``value`` in
        place, a run of consecutive rows in one copy; the whole array when no CUDA runtime can be
        called (``update_inplace``). On CUDA the copies are complete on return (the legacy stream
        is synchronized), before any later onnxruntime run reads them."""
        if self._rows_copy is None:
            self._rows_copy = ((CUDA_ROW_COPY and _cudart()) or False) if self.type == "cuda" else "cpu"
        if self._rows_copy is False:
            value.update_inplace(host)
            return
        width = host[0].nbytes if host.ndim else host.nbytes
        base = value.data_ptr()
        runs: list[list[int]] = []
        for row in sorted(set(rows)):
            if runs and runs[-1][1] == row:
                runs[-1][1] = row + 1
            else:
                runs.append([row, row + 1])
        for start, end in runs:
            src, dst, size = host.ctypes.data + start * width, base + start * width, (end - start) * width
            if self._rows_copy == "cpu":
                ctypes.memmove(dst, src, size)
            elif (code := self._rows_copy.cudaMemcpy(dst, src, size, _H2D)) != 0:
                raise GenerationError("copying sampling rows to the GPU failed", got=f"cudaMemcpy error {code}")
        if self._rows_copy != "cpu" and runs and (code := self._rows_copy.cudaStreamSynchronize(None)) != 0:
            raise GenerationError("copying sampling rows to the GPU failed", got=f"cudaStreamSynchronize error {code}")

    def bind_rows(self, binding: Any, name: str, value: ort.OrtValue, start: int, n: int, output: bool) -> None:
        """Bind rows ``start:start + n`` of ``value`` (by address: nothing is copied)."""
        shape = list(value.shape())
        if not shape or (start == 0 and n == shape[0]):
            (binding.bind_ortvalue_output if output else binding.bind_ortvalue_input)(name, value)
            return
        kind = value.data_type()[len("tensor("):-1]  # "tensor(float)" → "float"
        dtype = np.dtype(np.float32 if kind == "float" else kind)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.type, 0, dtype.type, [n, *shape[1:]], value.data_ptr() + start * row)

    def run(self, session: ort.InferenceSession, binding: Any, options: ort.RunOptions | None = None) -> None:
        """``run_with_iobinding``; an onnxruntime failure becomes a :class:`GenerationError`."""
        try:
            session.run_with_iobinding(binding, options)
        except ORT_ERRORS as exc:
            raise ort_failure(exc) from exc
