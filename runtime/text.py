"""Text at the runtime's edges: prompts that the tokenizer can take, error text that fits one line.

A Python ``str`` may hold lone UTF-16 surrogates (U+D800–U+DFFF without a partner): ``"abc \\ud800"``
typed as an escape, a JSON string with an unpaired ``\\ud800`` escape, or a command-line argument
that was not valid UTF-8 (Python decodes argv with ``surrogateescape``, so byte 0xFF arrives as
U+DCFF). Such a string cannot be encoded as UTF-8, and the Rust tokenizer raises a bare
``TypeError`` on it. :func:`check_text` refuses it first, naming where it is.

:func:`error_line` turns an onnxruntime (or any) exception into one line that keeps the cause:
onnxruntime's messages put a source location and a C++ signature before the sentence that matters
("Unsupported model IR version: 14, max supported IR version: 13"), so cutting the first line at a
fixed width drops exactly that sentence.
"""

from __future__ import annotations

import re

from runtime.errors import InvalidRequestError

__all__ = ["lone_surrogate", "check_text", "error_line"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_ORT_SOURCE = re.compile(r"/\S*?onnxruntime_src/\S+:\d+\s+")  # /onnxruntime_src/…/model.cc:256
_CPP_SIGNATURE = re.compile(r"(?<![\w:])(?:[\w~<>]+::)+[\w~<>]+\((?:[^()]|\([^()]*\))*\)(?:\s*const)?\s*")


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text``, or None when it encodes as UTF-8.

    A ``str`` made by Python never holds a valid surrogate *pair* (it holds the code point), so
    any code point in U+D800–U+DFFF is unpaired.
    """
    match = _SURROGATE.search(text)
    return None if match is None else match.start()


def check_text(text: str, what: str) -> str:
    """Return ``text`` if it is a string that encodes as UTF-8; raise :class:`InvalidRequestError`.

    ``what`` names the text in the message ("the prompt", "message 2's content").
    """
    if not isinstance(text, str):
        raise InvalidRequestError(f"{what} must be a string", expected="str", got=type(text).__name__)
    index = lone_surrogate(text)
    if index is not None:
        start = max(0, index - 10)
        context = text[start:index + 10].encode("utf-8", "backslashreplace").decode("ascii", "replace")
        raise InvalidRequestError(
            f"{what} is not valid Unicode: a lone surrogate U+{ord(text[index]):04X} at character {index}",
            expected="text that encodes as UTF-8",
            got=f"…{context}…" if start or index + 10 < len(text) else context,
            fix="remove or replace that character (a command-line argument that is not UTF-8 arrives like this)",
        )
    return text


def error_line(exc: BaseException, limit: int = 400) -> str:
    """One line of ``exc``'s message that keeps its cause.

    onnxruntime's source locations and C++ signatures are dropped, lines are joined with " / ",
    and the result is cut at ``limit`` characters; an empty message gives the exception's type.
    """
    text = str(exc)
    text = _ORT_SOURCE.sub(" ", text)
    text = _CPP_SIGNATURE.sub(" ", text)
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    joined = " / ".join(lines) or type(exc).__name__
    return joined if len(joined) <= limit else joined[: limit - 1] + "…"
