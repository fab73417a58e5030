"""Incremental detokenization (multi-byte text) and exact stop-string cutting."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from runtime.detokenize import IncrementalDetokenizer, StopStrings

TEXT = "Grüße aus Zürich! 東京は雨です。Ça va? 🙂🚀 naïve café — ελληνικά, русский, עברית. def f(x): return x**2"


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """A byte-level BPE trained on TEXT: multi-byte characters split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([TEXT.replace("🙂", "")] * 4, trainer=trainer)  # emoji stay raw bytes
    return tok


def test_pieces_concatenate_to_the_full_decode(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode(TEXT).ids
    assert len(ids) < len(TEXT.encode()) and len(ids) > 20
    partial = [i for i in range(len(ids)) if "\ufffd" in byte_bpe.decode(ids[i : i + 1])]
    assert partial, "the test needs tokens holding part of a character"
    detok = IncrementalDetokenizer(byte_bpe)
    pieces = [detok.push(t) for t in ids]
    tail = detok.flush()
    assert "".join(pieces) + tail == TEXT == byte_bpe.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens completed nothing and were held back


def test_prompt_context_and_special_tokens(byte_bpe: Tokenizer) -> None:
    prompt = byte_bpe.encode("Grüße aus").ids
    gen = byte_bpe.encode(" Zürich! 🙂").ids + [byte_bpe.token_to_id("<eos>")]
    detok = IncrementalDetokenizer(byte_bpe, prompt)
    out = "".join(detok.push(t) for t in gen) + detok.flush()
    assert out == " Zürich! 🙂"


def test_flush_releases_an_incomplete_character(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode("ok 🙂").ids
    detok = IncrementalDetokenizer(byte_bpe)
    out = "".join(detok.push(t) for t in ids[:-1])
    assert out == "ok "
    assert detok.flush() == byte_bpe.decode(ids[:-1])[len("ok "):] and "\ufffd" in byte_bpe.decode(ids[:-1])


def test_stop_string_cut_exactly_across_pieces() -> None:
    stops = StopStrings(["END", "\n\n"])
    emitted = [stops.add(p) for p in ["Hello E", "N", "o, wor", "ld E", "ND tail"]]
    assert stops.stopped and stops.text == "Hello ENo, world "
    assert emitted == ["Hello ", "", "ENo, wor", "ld ", ""]  # "E", "EN" and the last "E" held back until decided
    assert "".join(emitted) + stops.finish() == stops.text


def test_earliest_stop_string_wins_and_no_stop_releases_everything() -> None:
    stops = StopStrings(["bc", "abcd"])
    assert stops.add("xxab") == "xx"
    stops.add("cd")
    assert stops.text == "xx"  # "abcd" starts before "bc"
    free = StopStrings(["zzz"])
    assert free.add("abz") + free.add("zq") + free.finish() == "abzzq" and not free.stopped
