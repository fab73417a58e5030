"""Real weights: all-MiniLM-L6-v2 through Encoder against PyTorch (fp32 exact, int8 under its policy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_int8(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from passes.pipeline import optimize_artifact

    out = tmp_path_factory.mktemp("enc") / "minilm-int8"
    optimize_artifact(minilm, out, device="cpu", precision="int8", progress=False)
    return out


def test_manifest_records_the_sentence_transformers_configuration(minilm: Path) -> None:
    from runtime.artifact import load_artifact

    block = load_artifact(minilm).manifest["encoder"]
    assert block == {"pooling": "mean", "normalize": True, "max_seq_length": 256,
                     "from": "sentence-transformers modules.json", "prompts": {}, "default_prompt_name": None,
                     "include_prompt": True, "token_type_ids": True}


def test_fp32_matches_pytorch_within_1e4_per_element(minilm: Path) -> None:
    from parity.encoder_reference import reference_embeddings
    from parity.encoder_verify import load_pairs, load_sentences
    from parity.reference import load_reference_source
    from runtime import Encoder
    from runtime.artifact import load_artifact

    texts = [t for _, t in load_sentences()] + [q for _, q, _ in load_pairs()] + ["word " * 400]  # one truncated
    enc = Encoder.load(minilm)
    got = enc.encode(texts, batch_size=8)
    ref = reference_embeddings(load_reference_source(load_artifact(minilm).manifest), texts, "mean", True, 256)
    assert got.shape == ref.shape == (len(texts), 384)
    assert np.abs(got - ref).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the sentences are not all alike: the check above compares real structure
    assert (got @ got.T)[np.triu_indices(len(texts), 1)].min() < 0.2


def test_int8_passes_its_policy(minilm_int8: Path) -> None:
    from parity.encoder_verify import verify_encoder

    result = verify_encoder(minilm_int8)
    summary = result.to_json()["summary"]
    assert result.precision == "int8" and result.passed, result.reasons
    assert summary["top1_agreement"] == 1.0
    assert summary["min_cosine"] >= 0.97 and summary["mean_cosine"] >= 0.99
    assert summary["min_cosine"] < 0.9999  # it is really int8, not a copy of fp32


def test_verify_cli_on_an_encoder(minilm_int8: Path, tmp_path: Path) -> None:
    from lmforge.cli import main

    assert main(["-q", "verify", str(minilm_int8), "--json", str(tmp_path / "v.json"),
                 "--report", str(tmp_path / "report")]) == 0
    document = json.loads((tmp_path / "v.json").read_text())
    assert document["kind"] == "encoder" and document["passed"] is True
    assert len(document["queries"]) == 16 and len(document["sentences"]) == 24 + 32
    assert "PASS" in (tmp_path / "report" / "report.md").read_text()
