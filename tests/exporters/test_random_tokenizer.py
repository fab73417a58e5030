"""The stand-in tokenizer of ``random:`` shapes names every id, so generated ids decode to text."""

from __future__ import annotations

from exporters.sources import tiny_tokenizer


def test_random_shape_tokenizer_decodes_every_id_and_still_round_trips_text() -> None:
    tok = tiny_tokenizer(49152, fill=True)
    assert len(tok) == 49152
    assert tok.decode([18083]) == " t18083" and tok.decode([49151]) == " t49151"
    assert tok.decode([300, 301]) == " t300 t301"
    text = "hello wörld <|im_end|>"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode("any text at all")) < 259  # encoding uses the bytes only


def test_tiny_tokenizer_keeps_the_bytes_only() -> None:
    tok = tiny_tokenizer(320)
    assert len(tok) == 259 and tok.decode([300]) == ""
