"""Peak memory while a runner loads and runs, for runners that share one process.

Every in-process runner is loaded before the alternating rounds start, so the process's peak
RSS (or the device's used memory) says nothing about one runner. What is attributable to a
runner is measured as deltas instead: what :meth:`Runner.prepare` added (weights, sessions), plus
the largest rise above the level at the start of any of its runs (activations, KV cache, arena
growth). A background thread samples the level every few milliseconds:

* ``cpu``: resident set size (``/proc/self/statm``, else psutil, else ``ru_maxrss``);
* ``cuda``: device memory in use, device-wide (so it covers ORT's arenas too): NVML
  (``nvidia-ml-py``) when it is installed, else ``torch.cuda.mem_get_info`` when torch sees the
  GPU, else ``nvidia-smi --query-gpu=memory.used``.

NVML comes first because the sampler shares the process with the runner it measures: an NVML
query asks the driver, outside any CUDA context, through ``ctypes`` (which releases the
interpreter lock while it waits), whereas ``torch.cuda.mem_get_info`` enters the CUDA context
that onnxruntime is launching on, and ``nvidia-smi`` forks the process every sample. Either of
those can land inside a timed prefill and add to its time to first token.

Memory a runner freed and the allocator kept (glibc, torch's caching allocator, ORT's arena) is
still counted by the next delta's baseline, so the numbers are estimates to compare runtimes,
not exact footprints; the report says which method was used.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import threading
from collections.abc import Callable

__all__ = ["MemorySampler", "memory_probe"]

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_statm() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE / 2**20


def _rss_psutil() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _rss_maxrss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _cuda_torch() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def _cuda_smi() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, timeout=10, check=True)
    return float(out.stdout.strip().splitlines()[0])


class _Nvml:
    """Device 0's used memory through NVML (``pynvml``, from ``nvidia-ml-py``)."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._pynvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def __call__(self) -> float:
        return float(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used) / 2**20


def memory_probe(device: str) -> tuple[Callable[[], float], str]:
    """A function returning the current level in MB, and the method's name for the report."""
    candidates: list[tuple[Callable[[], float], str]]
    if device == "cuda":
        candidates = []
        try:
            candidates.append((_Nvml(), "device used memory, NVML"))
        except Exception as exc:  # noqa: BLE001 - no pynvml, no driver: the next probe
            log.debug("memory probe NVML unavailable: %s", exc)
        try:
            import torch

            if torch.cuda.is_available():
                candidates.append((_cuda_torch, "device used memory, torch.cuda.mem_get_info"))
        except ImportError:
            pass
        candidates.append((_cuda_smi, "device used memory, nvidia-smi"))
    else:
        candidates = [(_rss_statm, "process RSS, /proc/self/statm"), (_rss_psutil, "process RSS, psutil"),
                      (_rss_maxrss, "process peak RSS, getrusage (monotonic: deltas are lower bounds)")]
    for probe, method in candidates:
        try:
            probe()
            return probe, method
        except Exception as exc:  # noqa: BLE001 - any failing probe: try the next
            log.debug("memory probe %s unavailable: %s", method, exc)
    return (lambda: 0.0), "unavailable"


class MemorySampler:
    """Samples a memory level on a thread; :meth:`mark` starts a window, :meth:`peak_rise` ends it."""

    def __init__(self, device: str, interval_s: float | None = None) -> None:
        self._probe, self.method = memory_probe(device)
        slow = "nvidia-smi" in self.method
        self._interval = interval_s if interval_s is not None else (0.1 if slow else 0.01)
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> float:
        try:
            level = self._probe()
        except Exception:  # noqa: BLE001 - a failed sample is skipped
            return self._peak
        with self._lock:
            self._peak = max(self._peak, level)
        return level

    def level(self) -> float:
        return self._sample()

    def mark(self) -> float:
        """Start a window: return the current level and reset the peak to it."""
        level = self._probe()
        with self._lock:
            self._peak = level
        return level

    def peak_rise(self, since: float) -> float:
        """The highest level since :meth:`mark` minus ``since`` (MB, never negative)."""
        self._sample()
        with self._lock:
            return max(0.0, self._peak - since)
