"""The wire between the HTTP front-end(s) and the engine core process: ZeroMQ sockets, msgpack frames.

Two directions, each one kind of socket (vLLM V1's shape: ``AsyncLLM`` ↔ ``EngineCore``):

* **in** (front-ends → core): the core binds one ``PULL`` socket, every front-end connects a
  ``PUSH``. Messages: ``[SUBMIT, epoch, frontend, rid, prompt_ids, max_new_tokens, sampling,
  deadline_s]`` and ``[CANCEL, epoch, frontend, [rid, ...]]``. ``epoch`` is the core's (from its
  hello): a restarted core drops what was queued for its predecessor.
* **out** (core → front-end ``i``): the core binds one ``PUSH`` per front-end, front-end ``i``
  connects a ``PULL``. One message carries, for every request of that front-end that got anything
  since the last message, **the whole block of new token ids** (never one message per token):
  ``[OUTPUT, epoch, stats, [[rid, ids, finish, queue_s, error], ...]]``; ``[HELLO, epoch, info]``
  every :data:`HEARTBEAT_S` (also when idle) says the core is alive and what it serves.

``finish`` is a :class:`runtime.request.FinishReason` value or None; ``error`` is None or
``[class name, what, expected, got, fix, retry_after_s]`` and is rebuilt into the same
:mod:`runtime.errors` class on the front-end (:func:`error_from_wire`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import msgpack

from runtime.errors import EngineClosedError, GenerationError, InvalidRequestError, LmforgeError, QueueFullError
from runtime.sampling import SamplingParams

__all__ = ["CANCEL", "HEARTBEAT_S", "HELLO", "OUTPUT", "SUBMIT", "Addresses", "error_from_wire", "error_to_wire",
           "pack", "sampling_from_wire", "sampling_to_wire", "unpack"]

SUBMIT, CANCEL, OUTPUT, HELLO = 0, 1, 2, 3
HEARTBEAT_S = 0.2
"""How often an idle core says it is alive (front-ends declare it lost after their ``core_timeout_s``)."""

_ERRORS: dict[str, type[GenerationError]] = {c.__name__: c for c in (GenerationError, InvalidRequestError,
                                                                     QueueFullError, EngineClosedError)}


@dataclasses.dataclass(frozen=True)
class Addresses:
    """The ZeroMQ endpoints of one core and its ``frontends`` front-ends (IPC sockets in ``folder``)."""

    folder: str
    frontends: int = 1

    @property
    def inbound(self) -> str:
        return f"ipc://{Path(self.folder) / 'core-in'}"

    def outbound(self, frontend: int) -> str:
        return f"ipc://{Path(self.folder) / f'core-out-{frontend}'}"


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def sampling_to_wire(params: SamplingParams) -> list[Any]:
    return [getattr(params, f.name) for f in dataclasses.fields(SamplingParams)]


def sampling_from_wire(values: list[Any]) -> SamplingParams:
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in zip(names, values)}
    return SamplingParams(**fields)


def error_to_wire(exc: BaseException) -> list[Any]:
    if isinstance(exc, LmforgeError):
        return [type(exc).__name__ if type(exc).__name__ in _ERRORS else "GenerationError", exc.what, exc.expected,
                exc.got, exc.fix, getattr(exc, "retry_after_s", None)]
    return ["GenerationError", "the engine core failed the request", None, f"{type(exc).__name__}: {exc}"[:300],
            "this is a bug in lmforge: please report it with the server's log", None]


def error_from_wire(values: list[Any]) -> GenerationError:
    name, what, expected, got, fix, retry_after = values
    cls = _ERRORS.get(name, GenerationError)
    if cls is QueueFullError:
        return QueueFullError(what, expected, got, fix, retry_after_s=retry_after or 1.0)
    return cls(what, expected, got, fix)
