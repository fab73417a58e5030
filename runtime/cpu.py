"""CPU deployment controls: which cores the process may use, how many intra-op threads, pinning.

* :func:`available_cores` — the logical CPUs in the process's affinity mask
  (``os.sched_getaffinity``), not ``os.cpu_count()``: a container or ``taskset`` that gives the
  process 4 of 64 CPUs means 4.
* :func:`physical_cores` — those CPUs grouped by physical core (``/sys`` topology: package id +
  core id), so SMT siblings count once; falls back to the affinity count where ``/sys`` is absent.
* :func:`intra_op_threads` — the onnxruntime intra-op thread count for ``threads=`` on
  ``Engine.load`` / ``Encoder.load``: ``None`` → one thread per physical core the process may use;
  an explicit value is checked against the CPUs the process may use.
* :func:`parse_cpus` / :func:`pin_cpus` — ``"0-7,9"`` → those CPUs, checked, then
  ``os.sched_setaffinity(0, …)``. Threads created afterwards (onnxruntime's pool included) inherit
  the mask, and memory follows the first-touch policy, so pin *before* loading a model.
  ``LMFORGE_CPUS`` is the same spec from the environment (:func:`pin_from_env`).
* :func:`numactl_prefix` — ``numactl --cpunodebind=N --membind=N`` for a worker command when
  ``numactl`` is installed; its absence is reported (``None`` and a log line), not an error.

Standard library only (``runtime`` loads without torch, transformers or onnx).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from runtime.errors import GenerationError

__all__ = [
    "CPUS_ENV",
    "available_cores",
    "physical_cores",
    "intra_op_threads",
    "parse_cpus",
    "format_cpus",
    "pin_cpus",
    "pin_from_env",
    "split_cores",
    "numactl_prefix",
]

log = logging.getLogger(__name__)

CPUS_ENV = "LMFORGE_CPUS"
_SYS_CPU = Path("/sys/devices/system/cpu")


def available_cores() -> list[int]:
    """Logical CPU ids this process may run on, sorted (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))  # macOS / Windows: no affinity API


def _core_key(cpu: int, sys_root: Path) -> tuple[int, int] | None:
    topo = sys_root / f"cpu{cpu}" / "topology"
    try:
        package = int((topo / "physical_package_id").read_text().strip())
        core = int((topo / "core_id").read_text().strip())
    except (OSError, ValueError):
        return None
    return package, core


def physical_cores(cpus: list[int] | None = None, sys_root: Path = _SYS_CPU) -> list[int]:
    """One logical CPU per physical core among ``cpus`` (default: :func:`available_cores`).

    Best effort: SMT siblings share ``(physical_package_id, core_id)`` in ``/sys``; the lowest id
    of each core is kept. Where the topology cannot be read, every CPU counts as a core.
    """
    cpus = available_cores() if cpus is None else sorted(cpus)
    seen: dict[tuple[int, int], int] = {}
    for cpu in cpus:
        key = _core_key(cpu, sys_root)
        if key is None:
            return cpus
        seen.setdefault(key, cpu)
    return sorted(seen.values())


def intra_op_threads(threads: int | None) -> int:
    """The onnxruntime intra-op thread count for ``threads`` (``None``: physical cores allowed).

    Raises :class:`GenerationError` for 0, a negative count, a non-integer, or more threads than
    the logical CPUs the process may use (oversubscription only slows every thread down).
    """
    allowed = available_cores()
    if threads is None:
        return max(1, len(physical_cores(allowed)))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1 or threads > len(allowed):
        raise GenerationError(
            "invalid threads",
            expected=f"an integer from 1 to {len(allowed)} (the CPUs this process may use: {format_cpus(allowed)})",
            got=repr(threads),
            fix=f"pass threads=None (--threads auto) for one per physical core ({len(physical_cores(allowed))}), "
                "or a count within the process's CPUs",
        )
    return threads


def parse_cpus(spec: str) -> list[int]:
    """``"0-7,9"`` → ``[0, 1, …, 7, 9]``; a malformed spec is a :class:`GenerationError`."""
    text = spec.strip() if isinstance(spec, str) else ""
    cpus: set[int] = set()
    bad = not text
    for part in text.split(",") if text else []:
        first, sep, last = part.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            bad = True
            break
        lo, hi = int(first), int(last) if sep else int(first)
        if hi < lo:
            bad = True
            break
        cpus.update(range(lo, hi + 1))
    if bad:
        raise GenerationError("invalid CPU list", expected="ids and ranges like 0-7,9", got=repr(spec),
                              fix="pass --cpus (or LMFORGE_CPUS) as comma-separated ids or ranges")
    return sorted(cpus)


def format_cpus(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"`` (the inverse of :func:`parse_cpus`)."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def pin_cpus(spec: str | list[int]) -> list[int]:
    """Restrict this process (and threads it creates later) to ``spec``; return the CPUs.

    Every CPU must be one the process may already use: pinning only narrows. Call it before
    loading a model so onnxruntime's threads and the weights' first touch land on those cores.
    """
    cpus = parse_cpus(spec) if isinstance(spec, str) else sorted(set(spec))
    allowed = available_cores()
    outside = [c for c in cpus if c not in allowed]
    if not cpus or outside:
        raise GenerationError(
            f"cannot pin to CPUs {format_cpus(outside) if outside else '(none)'}: this process may not use them",
            expected=f"a subset of {format_cpus(allowed)}",
            got=spec if isinstance(spec, str) else format_cpus(cpus),
            fix="pick CPUs from the process's affinity (see `taskset -p $$`), or widen it first",
        )
    if not hasattr(os, "sched_setaffinity"):
        raise GenerationError("CPU pinning needs os.sched_setaffinity (Linux)", fix="leave out --cpus / LMFORGE_CPUS")
    os.sched_setaffinity(0, cpus)
    log.info("pinned to CPUs %s", format_cpus(cpus))
    return cpus


def pin_from_env(spec: str | None = None) -> list[int] | None:
    """Pin to ``spec`` if given, else to ``$LMFORGE_CPUS`` if set; ``None`` when neither is."""
    chosen = spec if spec else os.environ.get(CPUS_ENV, "").strip() or None
    return pin_cpus(chosen) if chosen else None


def split_cores(cpus: list[int], instances: int) -> list[list[int]]:
    """Split ``cpus`` into ``instances`` equal, contiguous slices (a remainder is left unused).

    Physical cores are spread first: with SMT, each slice gets whole cores (the lowest sibling),
    then siblings are added back only when there are not enough cores.
    """
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1 or instances > len(cpus):
        raise GenerationError(
            "invalid instance count", expected=f"1 to {len(cpus)} (one core per instance at least)",
            got=repr(instances), fix="lower --instances, or give the process more CPUs (--cpus)")
    cores = physical_cores(cpus)
    pool = cores if len(cores) >= instances else sorted(cpus)
    per = len(pool) // instances
    return [pool[i * per:(i + 1) * per] for i in range(instances)]


def numactl_prefix(node: int | None) -> list[str] | None:
    """``numactl --cpunodebind=N --membind=N`` to prefix a worker command, or ``None``.

    ``None`` when no node is asked for, or when ``numactl`` is not installed (logged: memory then
    follows the first-touch policy of the pinned threads).
    """
    if node is None:
        return None
    exe = shutil.which("numactl")
    if exe is None:
        log.warning("numactl is not installed: --numa-node %d is not applied (memory follows first touch)", node)
        return None
    return [exe, f"--cpunodebind={node}", f"--membind={node}"]
