"""The one error hierarchy of lmforge.

It lives in ``runtime`` (the lowest layer) so that every package, including services that load an
artifact with onnxruntime alone, can catch the same classes.

Messages are shaped ``what | expected | got | how to fix`` so that the command line can print
them as one line.
"""

from __future__ import annotations

__all__ = [
    "LmforgeError",
    "ExportError",
    "PassError",
    "ArtifactError",
    "GenerationError",
    "InvalidRequestError",
    "QueueFullError",
    "EngineClosedError",
    "ParityError",
    "format_message",
]


def format_message(what: str, expected: str | None = None, got: str | None = None, fix: str | None = None) -> str:
    """Join the parts of an error message in the house shape."""
    parts = [what]
    if expected is not None:
        parts.append(f"expected {expected}")
    if got is not None:
        parts.append(f"got {got}")
    if fix is not None:
        parts.append(fix)
    return " | ".join(parts)


class LmforgeError(Exception):
    """Base class: a problem the user can fix; the CLI prints it as one line and exits 2."""

    exit_code = 2

    def __init__(self, what: str, expected: str | None = None, got: str | None = None, fix: str | None = None):
        super().__init__(format_message(what, expected, got, fix))
        self.what = what
        self.expected = expected
        self.got = got
        self.fix = fix


class ExportError(LmforgeError):
    """Loading a source model or exporting it to ONNX failed."""


class PassError(LmforgeError):
    """A graph pass or the optimize pipeline refused its input or produced a bad graph."""


class ArtifactError(LmforgeError):
    """An artifact folder is missing, malformed, altered, or cannot be written."""


class GenerationError(LmforgeError):
    """A generation request is invalid or failed."""


class InvalidRequestError(GenerationError):
    """A request was refused before it took a slot: bad prompt, bad parameters, too long (HTTP 400)."""


class QueueFullError(GenerationError):
    """The engine's bounded queue is full; try again later (HTTP 429 with ``Retry-After``)."""

    def __init__(self, what: str, expected: str | None = None, got: str | None = None, fix: str | None = None,
                 retry_after_s: float = 1.0):
        super().__init__(what, expected, got, fix)
        self.retry_after_s = retry_after_s


class EngineClosedError(GenerationError):
    """The engine is closing or closed and takes no new requests (HTTP 503)."""


class ParityError(LmforgeError):
    """The parity suite could not run (bad prompts, missing reference, stale cache)."""
