"""The fixed prompt sets of the parity suite and their loader.

A prompt file is JSON Lines: one object a line, ``{"id": str, "prompt": str, "chat": bool}``.
``chat: true`` means the prompt is a user message to be wrapped in the artifact's chat template;
``chat: false`` means the text is fed to the tokenizer as is. Keys beyond these three are allowed
(and ignored) so that a file may carry a note; blank lines are skipped.

Ids name a prompt in reports, in the reference cache and in file names, so they are restricted to
``[A-Za-z0-9._-]`` and must be unique within a file.

The committed sets live next to this module:

* ``prompts/default.jsonl`` – the full set ``verify`` runs (short and long, several languages and
  scripts, code, arithmetic, lists, adversarial text, chat and raw);
* ``prompts/smoke.jsonl`` – six short prompts for fast CI runs, a subset of the default set (same
  ids, same text) so that cached references serve both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

from runtime.errors import ParityError
from runtime.text import lone_surrogate

__all__ = ["Prompt", "load_prompts", "default_prompts_path", "smoke_prompts_path"]

log = logging.getLogger(__name__)

_PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
_FORMAT = '{"id": str, "prompt": str, "chat": bool}'


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One parity prompt: a stable id, the text, and whether to apply the chat template."""

    id: str
    prompt: str
    chat: bool


def default_prompts_path() -> Path:
    """The committed full prompt set (``parity/prompts/default.jsonl``)."""
    return _PROMPTS_DIR / "default.jsonl"


def smoke_prompts_path() -> Path:
    """The committed six-prompt set for fast CI runs (``parity/prompts/smoke.jsonl``)."""
    return _PROMPTS_DIR / "smoke.jsonl"


def _field_error(path: Path, lineno: int, field: str, problem: str) -> ParityError:
    return ParityError(
        f"prompts file {path}, line {lineno}: field {field!r} {problem}",
        expected=f"one JSON object a line, {_FORMAT}",
        fix="fix that line",
    )


def _parse_line(path: Path, lineno: int, line: str) -> Prompt:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ParityError(
            f"prompts file {path} is not JSON Lines: line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})",
            expected=f"one JSON object a line, {_FORMAT}",
            fix="fix that line; a prompt spanning several lines must escape its newlines as \\n",
        ) from exc
    if not isinstance(data, dict):
        raise ParityError(
            f"prompts file {path}, line {lineno} is a JSON {type(data).__name__}, not an object",
            expected=f"one JSON object a line, {_FORMAT}",
            fix="fix that line",
        )
    for field, kind in (("id", str), ("prompt", str), ("chat", bool)):
        if field not in data:
            raise _field_error(path, lineno, field, "is missing")
        value = data[field]
        if not isinstance(value, kind):
            wanted = "boolean" if kind is bool else "string"
            raise _field_error(path, lineno, field, f"must be a JSON {wanted}, got {json.dumps(value)[:40]}")
    if not _ID_PATTERN.fullmatch(data["id"]):
        raise _field_error(path, lineno, "id", f"must be non-empty and use only A-Z a-z 0-9 . _ -, got {data['id']!r}")
    if data["prompt"] == "":
        raise _field_error(path, lineno, "prompt", "is empty")
    surrogate = lone_surrogate(data["prompt"])
    if surrogate is not None:  # an unpaired "\ud800" escape: valid JSON, not encodable text
        raise _field_error(
            path, lineno, "prompt",
            f"holds a lone surrogate U+{ord(data['prompt'][surrogate]):04X} at character {surrogate}, "
            "which is not valid Unicode text",
        )
    return Prompt(id=data["id"], prompt=data["prompt"], chat=data["chat"])


def load_prompts(path: str | os.PathLike[str]) -> list[Prompt]:
    """Read a prompts file; raise :class:`ParityError` with a one-line message naming the line.

    Refused: a missing or unreadable file, a line that is not a JSON object, a missing or mistyped
    field, an invalid or duplicate id, an empty prompt, and a file without any prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise ParityError(
            f"prompts file {path} {'is a folder' if path.is_dir() else 'does not exist'}",
            expected="a .jsonl file",
            fix=f"pass --prompts FILE.jsonl, or omit it to use {default_prompts_path()}",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ParityError(
            f"prompts file {path} is not UTF-8 (byte {exc.start})", fix="save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise ParityError(f"prompts file {path} cannot be read ({exc.strerror})") from exc

    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    # split("\n") rather than splitlines(): prompts may contain U+2028 and friends, which JSON
    # allows unescaped and splitlines() would treat as line ends.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        prompt = _parse_line(path, lineno, line)
        if prompt.id in seen:
            raise ParityError(
                f"prompts file {path}, line {lineno}: duplicate id {prompt.id!r} (first on line {seen[prompt.id]})",
                fix="give every prompt a unique id",
            )
        seen[prompt.id] = lineno
        prompts.append(prompt)
    if not prompts:
        raise ParityError(
            f"prompts file {path} is empty",
            expected=f"at least one line {_FORMAT}",
            fix=f"add prompts, or omit --prompts to use {default_prompts_path()}",
        )
    log.debug("loaded %d prompts from %s", len(prompts), path)
    return prompts
