"""Incremental detokenization and exact stop-string cutting for streamed generation.

:class:`IncrementalDetokenizer` turns a growing list of token ids into text pieces whose
concatenation is the decoded text, without decoding the whole output at each step. It decodes a
small window (the approach of vLLM and TGI): ``prefix`` = the tokens whose text was already
emitted, ``new`` = the same plus the pending tokens; the piece is ``decode(new)[len(decode(
prefix)):]``. A piece is held back while it ends in U+FFFD, i.e. while a byte-level token has
produced only part of a multi-byte UTF-8 character; the next token completes it. Decoding with
the last few prompt tokens as context makes a word-initial token's leading space come out as it
would in the middle of text (SentencePiece decoders drop the space of a text's first token).

:class:`StopStrings` cuts the text just before the first stop string, and holds back a tail
that could still become one, so that streamed pieces never have to be taken back: the
concatenation of what is emitted equals the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "StopStrings"]

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text pieces for tokens pushed one at a time (``tokenizers.Tokenizer``, special tokens skipped)."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:]) if _CONTEXT_TOKENS else []
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=True)

    def _advance(self, final: bool) -> str:
        new_text = self._decode(self._prefix)
        if len(new_text) <= len(self._prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        piece = new_text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._prefix, self._read)
        return piece

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became certain (often the token's text, or '')."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end comes out as U+FFFD)."""
        return self._advance(final=True)


class StopStrings:
    """Accumulates text, cuts it at the first stop string, and says what is safe to emit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def add(self, piece: str) -> str:
        """Append ``piece``; return the newly safe text (everything left once a stop string hit)."""
        if self.stopped or not piece:
            return ""
        old_len = len(self.text)
        self.text += piece
        cut = -1
        for stop in self._stops:
            at = self.text.find(stop, max(0, old_len - len(stop) + 1))
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return self.finish()
        safe = max(self._emitted, len(self.text) - self._held_back())
        out = self.text[self._emitted : safe]
        self._emitted = safe
        return out

    def finish(self) -> str:
        """Release the held-back tail (the request is over)."""
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out
