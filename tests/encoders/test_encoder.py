"""runtime.Encoder on the tiny random BERT: order, bucketing, pooling, truncation, threads, bad input."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime import Encoder
from runtime.artifact import load_artifact
from runtime.cpu import available_cores
from runtime.errors import GenerationError, InvalidRequestError

TEXTS = ["a", "a much longer sentence with many more words in it than the others", "mid length one",
         "x y", "another fairly long sentence, though shorter than the longest", "short", "tiny", "zz top"]


@pytest.fixture(scope="module")
def encoder(tiny_bert: Path) -> Encoder:
    return Encoder.load(tiny_bert, threads=1)


def test_manifest_records_default_pooling_for_a_folder_without_sentence_transformers(tiny_bert: Path) -> None:
    block = load_artifact(tiny_bert).manifest["encoder"]
    assert block["pooling"] == "mean" and block["normalize"] is False
    assert block["from"].startswith("default")


def test_bucketing_restores_order_and_matches_one_by_one(encoder: Encoder) -> None:
    result = encoder.encode_with_stats(TEXTS, batch_size=3)
    assert result.embeddings.shape == (len(TEXTS), encoder.dim) and result.embeddings.dtype == np.float32
    alone = np.stack([encoder.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(result.embeddings, alone, atol=1e-5)
    # reversed input gives reversed rows
    np.testing.assert_allclose(encoder.encode(TEXTS[::-1], batch_size=3), result.embeddings[::-1], atol=1e-5)


def test_bucketing_reports_padding_saved(encoder: Encoder) -> None:
    stats = encoder.encode_with_stats(TEXTS, batch_size=3).stats
    lengths = [len(encoder.tokenizer.encode(t).ids) for t in TEXTS]
    assert stats.tokens == sum(lengths)
    assert stats.batches == 3
    # input order: each batch padded to its own longest row
    assert stats.unsorted_padded_tokens == sum(max(lengths[i:i + 3]) * len(lengths[i:i + 3]) for i in (0, 3, 6))
    ordered = sorted(lengths, reverse=True)
    assert stats.padded_tokens == sum(max(ordered[i:i + 3]) * len(ordered[i:i + 3]) for i in (0, 3, 6))
    assert stats.padded_tokens < stats.unsorted_padded_tokens and 0 < stats.padding_saved < 1


def test_pooling_and_normalization(encoder: Encoder) -> None:
    tokens = encoder.encode_tokens(TEXTS[:3])
    assert [t.shape[0] for t in tokens] == [len(encoder.tokenizer.encode(t).ids) for t in TEXTS[:3]]
    np.testing.assert_allclose(encoder.encode(TEXTS[:3]), np.stack([t.mean(axis=0) for t in tokens]), atol=1e-5)
    np.testing.assert_allclose(encoder.encode(TEXTS[:3], pooling="cls"), np.stack([t[0] for t in tokens]), atol=1e-6)
    np.testing.assert_allclose(encoder.encode(TEXTS[:3], pooling="max"), np.stack([t.max(axis=0) for t in tokens]),
                               atol=1e-6)
    unit = encoder.encode(TEXTS[:3], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(np.linalg.norm(encoder.encode(TEXTS[:3]), axis=1), 1.0)


def test_encode_ids_equals_encode(encoder: Encoder) -> None:
    ids = [encoder.tokenizer.encode(t).ids for t in TEXTS]
    np.testing.assert_allclose(encoder.encode_ids(ids), encoder.encode(TEXTS), atol=1e-6)


def test_truncation_warns_or_refuses(encoder: Encoder, caplog: pytest.LogCaptureFixture) -> None:
    long = "word " * (encoder.max_length + 50)
    with caplog.at_level(logging.WARNING, logger="runtime.encoder"):
        stats = encoder.encode_with_stats([long, "short"]).stats
    assert stats.truncated == 1 and stats.tokens == encoder.max_length + len(encoder.tokenizer.encode("short").ids)
    assert "truncated 1 of 2" in caplog.text
    with pytest.raises(InvalidRequestError, match="longer than the model's maximum") as info:
        encoder.encode([long], truncate=False)
    assert "truncate=True" in str(info.value)


def test_concurrent_callers_get_their_own_rows(encoder: Encoder) -> None:
    expected = {i: encoder.encode(TEXTS[i:] + TEXTS[:i], batch_size=2) for i in range(4)}
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            for _ in range(5):
                got[i] = encoder.encode(TEXTS[i:] + TEXTS[:i], batch_size=2)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        np.testing.assert_allclose(got[i], expected[i], atol=1e-6)


@pytest.mark.parametrize("texts, match", [
    ([], "no texts"),
    ([""], r"texts\[0\] is empty"),
    (["ok", "   "], r"texts\[1\] is empty"),
    (["ok", 3], r"texts\[1\] is not a string"),
    ([None], r"texts\[0\] is not a string"),
    ({"a": 1}, "list of strings"),
])
def test_bad_texts(encoder: Encoder, texts: object, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        encoder.encode(texts)  # type: ignore[arg-type]


def test_bad_call_options(encoder: Encoder) -> None:
    with pytest.raises(InvalidRequestError, match="unknown pooling"):
        encoder.encode(["a"], pooling="median")
    with pytest.raises(InvalidRequestError, match="invalid batch_size"):
        encoder.encode(["a"], batch_size=0)


@pytest.mark.parametrize("threads", [0, -2])
def test_bad_threads(tiny_bert: Path, threads: int) -> None:
    with pytest.raises(GenerationError, match="invalid threads"):
        Encoder.load(tiny_bert, threads=threads)


def test_too_many_threads(tiny_bert: Path) -> None:
    with pytest.raises(GenerationError, match="invalid threads"):
        Encoder.load(tiny_bert, threads=len(available_cores()) + 1)


def test_decoder_artifact_is_refused_naming_engine(fake_decoder: Path) -> None:
    with pytest.raises(GenerationError, match="is a decoder") as info:
        Encoder.load(fake_decoder)
    assert "runtime.Engine" in str(info.value)


def test_encoder_artifact_is_refused_by_engine(tiny_bert: Path) -> None:
    from runtime import Engine

    with pytest.raises(GenerationError, match="is an encoder"):
        Engine.load(tiny_bert)


def test_closed_encoder_refuses(tiny_bert: Path) -> None:
    enc = Encoder.load(tiny_bert, threads=1)
    with enc:
        assert enc.encode(["a"]).shape == (1, enc.dim)
    with pytest.raises(GenerationError, match="closed"):
        enc.encode(["a"])


def test_manifest_pooling_is_followed(tiny_bert: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "cls"
    shutil.copytree(tiny_bert, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["encoder"] = {"pooling": "cls", "normalize": True, "max_seq_length": 8, "from": "test"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    enc = Encoder.load(copy, threads=1)
    assert (enc.pooling, enc.normalize, enc.max_length) == ("cls", True, 8)
    tokens = enc.encode_tokens(["hello there"])[0]
    assert tokens.shape[0] == 8  # truncated to the recorded maximum
    first = tokens[0] / np.linalg.norm(tokens[0])
    np.testing.assert_allclose(enc.encode(["hello there"])[0], first, atol=1e-6)
