"""The engine's options and their defaults, in one place.

:class:`EngineOptions` is what :class:`runtime.Engine` is built with; ``Engine.load(path,
max_batch=8)`` is shorthand for ``Engine.load(path, options=EngineOptions(max_batch=8))``. The
server, ``bench-serve`` and the ``--instances`` workers read their defaults from here too, so a
default changes in one line.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from runtime.errors import InvalidRequestError
from runtime.sampler_graph import BOUNDED_CANDIDATES

__all__ = ["EngineOptions", "DEFAULTS"]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How an :class:`~runtime.engine.Engine` runs its artifact (checked when the engine starts).

    ``cuda_graph`` (default: on for a shared-buffer artifact on CUDA) captures the decode step per
    batch-size bucket; ``max_batch`` is how many requests decode together (for a shared-buffer
    artifact the KV pool is allocated once: ``max_batch`` rows of ``max_context`` positions, the
    manifest's by default, fewer when ``kv_memory_gb`` caps it); ``max_queue`` bounds the waiting
    requests; ``read_every`` is how many steps run between reads of the new ids (default 8 on
    CUDA, 1 on the CPU); ``threads`` are onnxruntime's intra-op threads (default on the CPU: the
    physical cores this process may use); ``candidates`` bounds the sorted set that top-k / top-p
    read (:mod:`runtime.sampler_graph`; a request with a larger top-k is refused);
    ``prefill_chunk`` bounds the tokens of one prefill run (requests admitted together prefill in
    one run, padded to one length; a longer prompt runs alone, in chunks of that size on a
    shared-buffer artifact); ``prefill_tokens`` bounds the prompt tokens admitted at one step
    boundary (a longer prompt is admitted alone), so that running requests wait for one budget of
    prefill between two decode blocks, not for every new request: ``None`` is the device's default
    (:data:`CUDA_PREFILL_TOKENS` on CUDA, where a decode block is 8 steps and many arrivals at once
    held every stream for all their prefills; none on the CPU), ``0`` admits every waiting request
    a free slot takes (docs/serving.md, "HTTP against the engine at its best, on a GPU").
    """

    max_batch: int = 16
    max_queue: int = 256
    cuda_graph: bool | None = None
    read_every: int | None = None
    threads: int | None = None
    max_context: int | None = None
    kv_memory_gb: float | None = None
    candidates: int = BOUNDED_CANDIDATES
    prefill_chunk: int = 1024
    prefill_tokens: int | None = None

    def prefill_budget(self, device: str) -> int | None:
        """The prompt tokens admitted per step boundary on ``device`` (None: no budget)."""
        tokens = self.prefill_tokens
        if tokens is None:
            return CUDA_PREFILL_TOKENS if device == "cuda" else None
        if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0:
            raise InvalidRequestError("invalid prefill_tokens", expected="an integer ≥ 1, or 0 for no budget",
                                      got=repr(tokens))
        return int(tokens) or None

    def with_overrides(self, **overrides: Any) -> EngineOptions:
        """A copy with ``overrides`` (field names) replaced; an unknown name is refused."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidRequestError(f"unknown engine option {unknown[0]!r}", expected=", ".join(sorted(names)),
                                      fix="pass one of EngineOptions' fields")
        return dataclasses.replace(self, **overrides) if overrides else self


DEFAULTS = EngineOptions()

CUDA_PREFILL_TOKENS = 1024
"""The prompt tokens admitted per step boundary on CUDA by default (``EngineOptions.prefill_tokens``)."""
