"""Compile lmforge's CUDA kernels (``SOURCES``: ``sampling.cu``, ``silu_mul.cu``) into an onnxruntime custom-op library.

The library is built for one GPU architecture (the installed GPU's compute capability, or the
``arch`` asked for) into a cache folder named by a digest of the sources, the headers'
onnxruntime API version and the architecture, so that a changed source or another GPU builds
anew and a finished build is found again without a compiler: ``~/.cache/lmforge/kernels/<digest>/
liblmforge_kernels.so`` (``$LMFORGE_CACHE`` or ``$XDG_CACHE_HOME`` move the root). The CUDA
runtime is linked statically, so the library needs only the driver and onnxruntime-gpu.

nvcc is looked for in this order: ``$NVCC``; PyPI's ``nvidia-cuda-nvcc`` (``pip install
lmforge[kernels]``: ``nvidia/cu13/bin/nvcc`` or ``nvidia/cuda_nvcc/bin/nvcc`` in site-packages);
``$CUDA_HOME/bin/nvcc``; ``nvcc`` on ``PATH``; ``/usr/local/cuda/bin/nvcc``. The onnxruntime
C/C++ API headers are vendored in ``include/`` (MIT, see ``include/LICENSE``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.errors import LmforgeError

__all__ = ["KernelBuildError", "Build", "LIBRARY_NAME", "SOURCES", "build_library", "cache_root", "detect_arch",
           "find_nvcc", "library_path", "ort_api_version", "run_selftest"]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = ("sampling.cu", "silu_mul.cu")
SELFTEST = "selftest.cu"  # the kernel alone, without onnxruntime (:func:`run_selftest`)
# what the selftest links: it includes sampling.cu, whose RegisterCustomOps names the other sources' ops
SELFTEST_SOURCES = (SELFTEST, *(name for name in SOURCES if name != "sampling.cu"))
SELFTEST_FLAGS = ("-std=c++17", "-O3", "-cudart", "static")  # an executable, the CUDA runtime linked in
INCLUDE = HERE / "include"
LIBRARY_NAME = "liblmforge_kernels.so"
_ARCH = re.compile(r"^sm_(\d{2,3})a?$")


class KernelBuildError(LmforgeError):
    """The CUDA kernels could not be built (no nvcc, no GPU, a compiler error)."""


@dataclasses.dataclass(frozen=True)
class Build:
    """A built (or already cached) library."""

    path: Path
    arch: str
    nvcc: str
    cached: bool
    seconds: float


def cache_root() -> Path:
    """Where built libraries live: ``$LMFORGE_CACHE/kernels``, else ``$XDG_CACHE_HOME/lmforge/kernels``,
    else ``~/.cache/lmforge/kernels``."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"]) / "kernels"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmforge" / "kernels"


def ort_api_version() -> int:
    """``ORT_API_VERSION`` of the vendored headers (the C API the library asks onnxruntime for)."""
    text = (INCLUDE / "onnxruntime_c_api.h").read_text(encoding="utf-8", errors="replace")
    found = re.search(r"#define ORT_API_VERSION (\d+)", text)
    return int(found.group(1)) if found else 0


def _digest(arch: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    h.update(f"api={ort_api_version()};arch={arch};flags={' '.join(_FLAGS)}".encode())
    return h.hexdigest()[:16]


def library_path(arch: str) -> Path:
    """Where the library for ``arch`` (``sm_90``) is, once built."""
    return cache_root() / _digest(arch) / LIBRARY_NAME


def check_arch(arch: str) -> str:
    if not _ARCH.match(arch):
        raise KernelBuildError("unknown GPU architecture", expected="sm_XY, e.g. sm_90 for H100 / H200, sm_89 for L4",
                               got=repr(arch), fix="pass --arch sm_XY, or leave it out on the GPU machine")
    return arch


def detect_arch() -> str | None:
    """The first GPU's architecture (``sm_90``) from ``nvidia-smi``, or None when there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
    major, _, minor = first.partition(".")
    return f"sm_{major}{minor}" if major.isdigit() and minor.isdigit() else None


def _pip_cuda_roots() -> list[Path]:
    """The CUDA folders of PyPI's nvidia-* wheels (``nvidia/cu13``, ``nvidia/cuda_nvcc``, …)."""
    roots = []
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            roots += [nvidia / sub for sub in ("cu13", "cu12", "cuda_nvcc", "cuda_runtime", "cuda_cccl")
                      if (nvidia / sub).is_dir()]
    return roots


def find_nvcc() -> Path | None:
    """nvcc, in the order of the module docstring, or None."""
    candidates: list[Path] = []
    if os.environ.get("NVCC"):
        candidates.append(Path(os.environ["NVCC"]))
    candidates += [root / "bin" / "nvcc" for root in _pip_cuda_roots()]
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


# LMFORGE_KERNELS_CUDART=shared links the CUDA runtime dynamically (the libcudart.so.13 that
# onnxruntime-gpu loads) instead of statically: a second variant, cached under its own digest.
_CUDART = "shared" if os.environ.get("LMFORGE_KERNELS_CUDART", "").strip() == "shared" else "static"
_FLAGS = ("-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-cudart", _CUDART)


def _command(nvcc: Path, arch: str, out: Path, sources: tuple[str, ...] = SOURCES,
             flags: tuple[str, ...] = _FLAGS) -> list[str]:
    number = arch[len("sm_"):]
    command = [str(nvcc), *flags, f"-gencode=arch=compute_{number},code={arch}", f"-I{INCLUDE}"]
    for root in [nvcc.parent.parent, *_pip_cuda_roots()]:  # a pip nvcc's headers and static cudart
        if (root / "include").is_dir():
            command.append(f"-I{root / 'include'}")
        if (root / "lib").is_dir():
            command.append(f"-L{root / 'lib'}")
    return [*command, "-o", str(out), *(str(HERE / name) for name in sources)]


def build_library(arch: str | None = None, force: bool = False) -> Build:
    """Build the library for ``arch`` (default: the installed GPU's) unless it is cached."""
    started = time.perf_counter()
    if arch is None:
        arch = detect_arch()
        if arch is None:
            raise KernelBuildError("no NVIDIA GPU found to build the kernels for", expected="nvidia-smi listing a GPU",
                                   got="no nvidia-smi or no GPU", fix="pass --arch sm_90 (H100/H200) to build anyway")
    check_arch(arch)
    target = library_path(arch)
    nvcc = find_nvcc()
    if target.is_file() and not force:
        return Build(target, arch, str(nvcc or ""), True, time.perf_counter() - started)
    if nvcc is None:
        raise KernelBuildError("nvcc (the CUDA compiler) not found", expected="nvcc 12.x or 13.x",
                               got="none in $NVCC, site-packages, $CUDA_HOME, PATH or /usr/local/cuda",
                               fix="pip install 'lmforge[kernels]' (nvidia-cuda-nvcc), or set NVCC=/path/to/nvcc")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / LIBRARY_NAME
        command = _command(nvcc, arch, out)
        log.info("building %s: %s", target, " ".join(command))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError("nvcc could not run", got=f"{nvcc}: {exc}",
                                   fix="check the CUDA installation, or set NVCC") from exc
        if done.returncode != 0 or not out.is_file():
            lines = [line for line in (done.stderr + done.stdout).splitlines() if "error" in line.lower()]
            first = (lines or (done.stderr + done.stdout).strip().splitlines() or ["(no output)"])[0]
            raise KernelBuildError("nvcc failed to build the kernels", got=first.strip()[:300],
                                   fix=f"run with --debug for the full log; nvcc was {nvcc}")
        os.replace(out, target)  # atomic: never a half-written library in the cache
    record = {"arch": arch, "nvcc": str(nvcc), "ort_api_version": ort_api_version(), "sources": list(SOURCES)}
    (target.parent / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    return Build(target, arch, str(nvcc), False, time.perf_counter() - started)


def run_selftest(arch: str | None = None, timeout: float = 120.0) -> tuple[int, str]:
    """Compile ``selftest.cu`` (the kernel without onnxruntime) and run it on this GPU; its exit
    code and output. A hang past ``timeout`` seconds is reported as exit code 124."""
    arch = check_arch(arch or detect_arch() or "")
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc (the CUDA compiler) not found", fix="pip install 'lmforge[kernels]'")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "lmforge_kernels_selftest"
        done = subprocess.run(_command(nvcc, arch, exe, SELFTEST_SOURCES, SELFTEST_FLAGS), capture_output=True,
                              text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise KernelBuildError("nvcc failed to build the selftest", got=(done.stderr or done.stdout)[-300:])
        wrap = os.environ.get("LMFORGE_SELFTEST_WRAP", "").split()  # e.g. "compute-sanitizer --tool synccheck"
        try:
            ran = subprocess.run([*wrap, str(exe)], capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return 124, out + f"\nTIMEOUT after {timeout:.0f} s (the last line names the launch that hung)"
        return ran.returncode, ran.stdout + ran.stderr
