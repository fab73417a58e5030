"""An artifact's tokenizer and chat template: what :class:`runtime.Engine` and a front-end of an
engine core process (:class:`runtime.serve.client.CoreClient`) both offer their callers.

:class:`TextHelpers` is a mixin: the class that uses it calls :meth:`TextHelpers._load_text` once
with the artifact's folders, and gets ``encode`` / ``decode`` / ``apply_chat_template`` /
``chat_ids`` with one behaviour and one set of errors. The ``tokenizer`` attribute may be set to
None afterwards (an engine core moves ids only), and then text calls fail with the error that
names the missing ``tokenizer.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.chat import load_chat_template, render_chat, special_tokens
from runtime.errors import GenerationError, InvalidRequestError
from runtime.text import check_text

__all__ = ["TextHelpers", "load_tokenizer"]

log = logging.getLogger(__name__)


def load_tokenizer(folder: Path) -> Any:
    """``folder/tokenizer.json`` as a ``tokenizers.Tokenizer``, or None when the file is missing."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        log.info("no tokenizer.json in %s: only token-id prompts will work", folder)
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


class TextHelpers:
    """Tokenization and chat rendering with an artifact's tokenizer folder (see the module docstring)."""

    tokenizer: Any
    chat_template: str | None
    _special_tokens: dict[str, str]
    _artifact_path: str
    _tokenizer_dir: Path

    def _load_text(self, artifact_path: Path | str, tokenizer_dir: Path) -> None:
        self._artifact_path = str(artifact_path)
        self._tokenizer_dir = tokenizer_dir
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.chat_template = load_chat_template(tokenizer_dir)
        self._special_tokens = special_tokens(tokenizer_dir)

    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"{what} needs the artifact's tokenizer, and {self._tokenizer_dir}/tokenizer.json is missing",
                fix="pass token ids, or re-export the artifact with its tokenizer",
            )
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` with the artifact's tokenizer."""
        check_text(text, "the prompt")
        return list(self._need_tokenizer("text prompts").encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._need_tokenizer("decoding").decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``, rendered with the artifact's template in the sandbox."""
        if self.chat_template is None:
            raise InvalidRequestError(
                f"artifact {self._artifact_path} has no chat template",
                expected="tokenizer/chat_template.jinja or chat_template in tokenizer_config.json",
                fix="use generate() with a plain prompt, or export an instruct model",
            )
        try:
            return render_chat(self.chat_template, messages, self._special_tokens, add_generation_prompt)
        except InvalidRequestError:
            raise
        except GenerationError as exc:
            raise InvalidRequestError(exc.what, exc.expected, exc.got, exc.fix) from None

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of the chat prompt (the template writes the special tokens itself)."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)
