"""Every encoder family (tiny:<family>, the real config class): convert, the graph's inputs, fusions,
fp32 and int8 ``verify`` against transformers, and parity past ModernBERT's local window."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from exporters.encoder_specs import ENCODER_FAMILIES, ENCODER_TINY_WINDOW
from exporters.specs import ModelKind, all_specs, get_spec
from parity.encoder_verify import verify_encoder
from passes.pipeline import optimize_artifact
from runtime import Encoder
from runtime.artifact import load_artifact

# Fused op counts of the fp32 CPU graph of each 2-layer tiny model (ModernBERT: 3 layers). Measured;
# a change here is a behaviour change.
_BERT_OPS = {"Attention": 2, "BiasGelu": 2, "LayerNormalization": 1, "SkipLayerNormalization": 4}
_ROBERTA_OPS = {"Attention": 2, "BiasGelu": 2, "SkipLayerNormalization": 5}  # the embedding LayerNorm too
FUSED_OPS: dict[str, dict[str, int]] = {
    "bert": _BERT_OPS, "electra": _BERT_OPS, "distilbert": _BERT_OPS,
    "roberta": _ROBERTA_OPS, "xlm-roberta": _ROBERTA_OPS,
    "mpnet": _ROBERTA_OPS,  # position bias + mask summed by passes.rule_encoder, then Attention
    "deberta-v2": {"BiasGelu": 2, "LayerNormalization": 2, "SkipLayerNormalization": 4},
    "modernbert": {"Gelu": 3, "LayerNormalization": 1, "MultiHeadAttention": 3, "SkipLayerNormalization": 6},
}
TOKEN_TYPES = {"bert", "electra"}  # the families whose tiny config has more than one token type
NOT_FUSABLE = {"deberta-v2": {"Attention", "MultiHeadAttention"}, "modernbert": {"RotaryEmbedding"}}
TEXTS = ["a short one", "the quick brown fox jumps over the lazy dog, twice over, and then some more",
         "naïve café — 東京 ✓", "x"]


def test_every_encoder_family_is_registered_and_tested() -> None:
    encoders = {s.name for s in all_specs() if s.kind is ModelKind.ENCODER}
    assert encoders == set(ENCODER_FAMILIES) == set(FUSED_OPS)
    assert len(encoders) == 8


@pytest.fixture(scope="module")
def optimized(artifact_cache: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("enc-opt")
    made: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(family: str, precision: str):  # type: ignore[no-untyped-def]
        if (family, precision) not in made:
            out = root / f"{family}-{precision}"
            report = optimize_artifact(artifact_cache(f"tiny:{family}"), out, "cpu", precision, check=True,
                                       progress=False)
            made[(family, precision)] = (out, report)
        return made[(family, precision)]

    return get


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_family_converts_fuses_and_verifies(family: str, artifact_cache, optimized) -> None:  # type: ignore[no-untyped-def]
    src = artifact_cache(f"tiny:{family}")
    manifest = load_artifact(src).manifest
    inputs = [t["name"] for t in manifest["io"]["inputs"]]
    assert inputs == ["input_ids", "attention_mask"] + (["token_type_ids"] if family in TOKEN_TYPES else [])
    assert manifest["model_kind"] == "encoder" and manifest["export"]["check_max_abs_diff"] < 1e-5

    fp32 = verify_encoder(src)
    assert fp32.passed, fp32.reasons
    assert fp32.to_json()["summary"]["min_cosine"] >= 0.9999

    _, report = optimized(family, "fp32")
    for op, n in FUSED_OPS[family].items():
        assert report.ops.get(op, 0) == n, (op, report.ops)
    assert report.missing == {}, report.missing  # every expected fusion fired (or was absorbed)
    assert set(report.not_fusable) == NOT_FUSABLE.get(family, set())
    assert all(len(reason) > 40 for reason in report.not_fusable.values())  # each says why
    assert report.check is not None and report.check["ok"]

    int8_path, int8_report = optimized(family, "int8")
    assert int8_report.ops.get("MatMulInteger", 0) + int8_report.ops.get("QAttention", 0) >= 2 * 4
    int8 = verify_encoder(int8_path)
    assert int8.passed, int8.reasons
    summary = int8.to_json()["summary"]
    assert summary["min_cosine"] >= 0.99 and summary["top1_agreement"] == 1.0


def test_padding_offset_positions_bound_the_length(artifact_cache) -> None:  # type: ignore[no-untyped-def]
    # RoBERTa and MPNet count positions from pad_token_id + 1: 130 position rows take 128 tokens
    for family in ("roberta", "xlm-roberta", "mpnet"):
        arch = load_artifact(artifact_cache(f"tiny:{family}")).architecture
        spec = get_spec(family)
        rows, pad = spec.tiny_config["max_position_embeddings"], spec.tiny_config["pad_token_id"]
        assert arch["max_positions"] == rows - pad - 1
    assert load_artifact(artifact_cache("tiny:bert")).architecture["max_positions"] == 128


@pytest.mark.parametrize("family", ["modernbert", "roberta", "deberta-v2"])
def test_encode_equals_transformers_past_the_window(family: str, artifact_cache) -> None:  # type: ignore[no-untyped-def]
    """Encoder.encode (bucketed, padded batches) = transformers' hidden states mean-pooled, one
    text at a time, for texts longer than ModernBERT's 8-token local window."""
    import torch

    from exporters.sources import load_source

    loaded = load_source(f"tiny:{family}")
    encoder = Encoder.load(artifact_cache(f"tiny:{family}"), threads=1)
    got = encoder.encode(TEXTS, batch_size=4)
    assert max(len(encoder.tokenizer.encode(t).ids) for t in TEXTS) > 4 * ENCODER_TINY_WINDOW
    for row, text in zip(got, TEXTS):
        ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        want = hidden.mean(dim=0).numpy()
        cosine = float(row @ want / (np.linalg.norm(row) * np.linalg.norm(want)))
        assert cosine >= 0.9999 and np.abs(row - want).max() < 1e-4
