"""CPU time per generated token, for ``lmforge bench-serve``: what each token costs the server's
processes and the bench-serve process (the load generator, or the engine with its callers).

Where a server and its client share a few cores, the throughput is bounded by the CPU all of
them spend together, and on a shared machine the CPU time per token moves far less from run to
run than the throughput does, so it is what a change to the server is judged by
(docs/serving.md). Read from ``/proc`` (Linux): a process's user + system time, every thread of it
included. Elsewhere :meth:`CpuSampler.sample` returns None and nothing is reported.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["CpuSample", "CpuSampler", "per_token"]

_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # the name (in parentheses) may hold spaces


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (parents read from ``/proc/<pid>/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _cpu_seconds(pid: int) -> float | None:
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclasses.dataclass(frozen=True)
class CpuSample:
    own_s: float  # this process (``time.process_time``: all of its threads)
    server_s: dict[int, float]  # each process of the server's tree


class CpuSampler:
    """Samples this process and, when ``server_pid`` is given, that process and its descendants
    (an ``lmforge serve`` and its engine core and front-ends)."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid

    def sample(self) -> CpuSample | None:
        if not _PROC.is_dir() or _stat_fields(os.getpid()) is None:
            return None
        server: dict[int, float] = {}
        if self.server_pid is not None:
            for pid in _descendants(self.server_pid):
                if (seconds := _cpu_seconds(pid)) is not None:
                    server[pid] = seconds
        return CpuSample(time.process_time(), server)


def per_token(before: CpuSample | None, after: CpuSample | None, tokens: int) -> dict[str, Any] | None:
    """µs of CPU per generated token between two samples: ``bench_serve`` (this process),
    ``server`` (the server's processes together) and ``server_processes`` (each, by pid; one
    that started after ``before`` counts from zero, one gone by ``after`` is not counted)."""
    if before is None or after is None or tokens <= 0:
        return None
    scale = 1e6 / tokens
    out: dict[str, Any] = {"bench_serve": round((after.own_s - before.own_s) * scale, 1)}
    if after.server_s:
        each = {str(pid): round((s - before.server_s.get(pid, 0.0)) * scale, 1) for pid, s in after.server_s.items()}
        out["server"] = round(sum(each.values()), 1)
        out["server_processes"] = each
    return out
