"""The KV backend interface the engine is typed against, and the registry by ``kv_mode``.

A backend owns the KV memory of the running requests and runs the decoder over them: it hands
out *slots* (one per running request), prefills admitted requests into their slots, and runs
blocks of decode steps for every occupied slot. :class:`runtime.engine.Engine` never branches on
which backend it has; it calls :func:`open_backend` with the artifact's ``kv_mode``.

Two backends ship: ``concat`` (:mod:`runtime.kv_concat`, the portable contract, any execution
provider) and ``slots`` (:mod:`runtime.kv_slots`, the shared-buffer contract: fixed rows updated
in place, CUDA graphs). A third (paged KV, say) implements :class:`KvBackend` in its own module
and registers its class for its ``kv_mode`` with :func:`register_backend`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar, Protocol, TypeVar

import numpy as np

from runtime.artifact import Artifact, KvMode
from runtime.decoder_io import DecoderIO
from runtime.device import Device
from runtime.errors import GenerationError
from runtime.sampling import Plan

__all__ = ["BackendOptions", "KvBackend", "Started", "register_backend", "backend_class",
           "open_backend"]

Started = Callable[[dict[int, tuple[int, "np.ndarray | None"]]], None]
"""Called after each prefill run with ``{slot: (first token, last logits or None)}``."""


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """What the engine asks of any backend (each reads what applies to it)."""

    max_batch: int  # slots
    capacity: int  # KV positions per slot
    read_every: int = 1  # decode steps between host reads of the new ids
    cuda_graph: bool = False  # capture the decode step (backends with ``captures``)
    prefill_chunk: int = 1024  # tokens of one prefill run


class KvBackend(Protocol):
    """The running requests' KV memory and the decoder runs over it."""

    kind: ClassVar[str]  # its name in logs and metrics
    preallocates: ClassVar[bool]  # KV for every slot allocated at load (``kv_memory_gb`` caps it)
    captures: ClassVar[bool]  # can replay its decode step as CUDA graphs
    can_launch_ahead: ClassVar[bool]  # :meth:`launch_next` overlaps the host's work with the GPU's
    max_block: int  # the most decode steps one :meth:`decode_block` call runs

    @property
    def free_slots(self) -> int: ...

    def allocate(self) -> int:
        """A free slot (the lowest)."""
        ...

    def release(self, slot: int) -> None:
        """The slot's request is done; its KV may be reused."""
        ...

    def reset(self) -> None:
        """Forget every running request (a failed step failed them all)."""
        ...

    def bucket(self, rows: int) -> int:
        """The batch size a decode over ``rows`` rows runs at."""
        ...

    def stage(self, slot: int, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check and cast one admitted request's sampling rows (:func:`runtime.sampling.row_arrays`)
        before its prefill; a row that does not fit raises for that request alone."""
        ...

    def prefill_many(self, admitted: list[tuple[int, list[int], dict[str, np.ndarray]]], want_logits: bool,
                     plan: Plan, started: Started) -> None:
        """Prefill ``(slot, prompt ids, staged rows)``; hand ``started`` each slot's first token."""
        ...

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """``(rows, length)`` prefill shapes worth running at warm-up."""
        ...

    def decode_block(self, rows: int, steps: int, generated: dict[int, int], want_logits: bool, plan: Plan,
                     interrupt: Callable[[], bool] | None = None) -> tuple[dict[int, list[int]], np.ndarray | None]:
        """Up to ``steps`` decode steps for rows ``0:rows``: the new ids per slot (and the last
        step's logits by slot when asked); ``interrupt`` ends the block early after a step."""
        ...

    def launch_next(self, rows: int, plan: Plan, slots: Iterable[int]) -> None:
        """Start the next block's first step for ``slots`` now (backends with ``can_launch_ahead``)."""
        ...


_REGISTRY: dict[KvMode, type[KvBackend]] = {}
_B = TypeVar("_B", bound=type)


def register_backend(mode: KvMode) -> Callable[[_B], _B]:
    """Class decorator: the backend that serves artifacts of ``mode`` (constructed as
    ``cls(artifact, device, io, options)``)."""

    def add(cls: _B) -> _B:
        if mode in _REGISTRY and _REGISTRY[mode] is not cls:
            raise ValueError(f"a KV backend for {mode.value!r} is already registered: {_REGISTRY[mode].__name__}")
        _REGISTRY[mode] = cls
        return cls

    return add


def backend_class(mode: KvMode) -> type[KvBackend]:
    """The registered backend class for ``mode`` (the shipped ones register on first use)."""
    for module in ("runtime.kv_concat", "runtime.kv_slots"):  # importing one registers its backend
        importlib.import_module(module)

    try:
        return _REGISTRY[mode]
    except KeyError:
        raise GenerationError(f"no KV backend serves kv_mode {mode.value!r}",
                              expected=", ".join(sorted(m.value for m in _REGISTRY)),
                              fix="re-export the artifact, or register a backend for it") from None


def open_backend(artifact: Artifact, device: Device, io: DecoderIO, options: BackendOptions) -> KvBackend:
    """The backend for ``artifact``'s ``kv_mode``, loaded on ``device``."""
    cls: Callable[[Artifact, Device, DecoderIO, BackendOptions], KvBackend] = backend_class(artifact.kv_mode)
    return cls(artifact, device, io, options)
