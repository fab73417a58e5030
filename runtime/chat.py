"""Chat templates: found in the artifact's tokenizer files, rendered in Jinja's sandbox.

A chat template comes from whoever made the model, so it is untrusted code. It is rendered in
``jinja2.sandbox.ImmutableSandboxedEnvironment`` (as transformers does): no attribute starting
with ``_``, no mutation of lists or dicts, no unsafe callables. Unlike a plain sandbox, which
turns ``''.__class__`` into a silent empty string, this one raises at the first unsafe access,
and every template failure becomes a :class:`GenerationError`.

The environment matches transformers' (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``,
``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape), and the template
sees ``messages``, ``add_generation_prompt`` and the special tokens of ``tokenizer_config.json``
(``bos_token``, ``eos_token``, …).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.errors import GenerationError, InvalidRequestError
from runtime.text import check_text

__all__ = ["load_chat_template", "special_tokens", "render_chat", "normalize_messages"]

log = logging.getLogger(__name__)


def _read_config(tokenizer_dir: Path) -> dict[str, Any]:
    path = tokenizer_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise GenerationError(f"{path} cannot be read as JSON ({exc})", fix="re-export the artifact") from exc
    return data if isinstance(data, dict) else {}


def load_chat_template(tokenizer_dir: Path) -> str | None:
    """``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (or its
    ``default`` entry when it is a list of named templates); ``None`` when the model has none."""
    jinja_file = tokenizer_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_config(tokenizer_dir).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def special_tokens(tokenizer_dir: Path) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ``pad_token``, … as strings, for the template's context."""
    out: dict[str, str] = {}
    for key, value in _read_config(tokenizer_dir).items():
        if not key.endswith("_token"):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Raise on an unsafe attribute at once (the base class returns an Undefined that renders as '')."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


def _environment() -> _StrictSandbox:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _content_text(index: int, content: Any) -> str:
    """A message's ``content`` as text: a string, or OpenAI's list of content parts (text parts
    joined; any other part refused, since the artifact reads text only)."""
    if isinstance(content, str):
        return check_text(content, f"chat message {index}'s content")
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(check_text(part["text"], f"chat message {index}'s content part {j}"))
                continue
            raise InvalidRequestError(
                f"chat message {index}'s content part {j} is not text",
                expected='{"type": "text", "text": "…"} (this model reads text only)',
                got=repr(kind if kind is not None else part)[:80],
                fix="send the text parts only",
            )
        return "".join(texts)
    raise InvalidRequestError(
        f"chat message {index}'s content is not text",
        expected='a string, or a list of {"type": "text", "text": "…"} parts',
        got=f"{type(content).__name__} {content!r}"[:80],
    )


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check chat messages and give each a string ``content``; raise :class:`InvalidRequestError`.

    Accepted: a non-empty list of mappings with a string ``role`` and a ``content`` that is a
    string or OpenAI's list of content parts (the ``text`` parts are joined). Refused: a missing
    role or content, ``None``, numbers and other types, image or audio parts, and text holding a
    lone surrogate. Other keys of a message (``name``, ``tool_calls``, …) are kept as they are.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError(
            "chat messages must be a non-empty list",
            expected='[{"role": "user", "content": "…"}, …]',
            got=repr(messages)[:80],
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
            raise InvalidRequestError(
                f"chat message {i} is malformed",
                expected="a mapping with a string 'role' and a 'content'",
                got=repr(message)[:80],
            )
        normalized = dict(message)
        normalized["content"] = _content_text(i, message["content"])
        out.append(normalized)
    return out


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tokens: Mapping[str, str],
    add_generation_prompt: bool = True,
) -> str:
    """Render ``template`` for ``messages`` in the sandbox; any failure is a GenerationError."""
    checked = normalize_messages(messages)
    try:
        compiled = _environment().from_string(template)
        return compiled.render(messages=checked, add_generation_prompt=add_generation_prompt, **tokens)
    except SecurityError as exc:
        raise GenerationError(
            "the artifact's chat template tried to reach Python internals; the sandbox refused it",
            got=str(exc),
            fix="use a trusted chat template (tokenizer/chat_template.jinja)",
        ) from exc
    except TemplateError as exc:
        raise GenerationError(
            "the artifact's chat template failed to render",
            got=f"{type(exc).__name__}: {exc}",
            fix="check the messages, or fix tokenizer/chat_template.jinja",
        ) from exc
