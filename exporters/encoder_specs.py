"""Encoder architecture specs: BERT and the encoder families sentence-transformers models are built on.

Data only, registered into :mod:`exporters.specs`' table (``ModelKind.ENCODER``). Each tiny config
is the family's real transformers config class with the options of a real checkpoint left on
(RoBERTa's one token type and padding-offset positions, DeBERTa-v3's disentangled attention with
log buckets, ModernBERT's alternating local/global attention, GLU and rotary) and only the sizes
shrunk. ``expected_fusions`` lists the contrib ops onnxruntime has for the family's block; where one
cannot fire, ``notes`` says why (the fusion report names the pass and the tracer's reason too).
"""

from __future__ import annotations

import dataclasses

from exporters.specs import ArchSpec, Feature, ModelKind, register

__all__ = ["ENCODER_TINY_WINDOW", "ENCODER_FAMILIES", "NOT_FUSABLE", "PADDING_OFFSET", "encoder_max_positions"]

_TINY_VOCAB = 320  # the byte-level test tokenizer's vocabulary (as exporters.specs)
# Every tiny encoder: 4 heads of 16, 2 layers (ModernBERT: 3, for one local layer between globals).
_SMALL = dict(vocab_size=_TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=128)
# ModernBERT's local attention window in the tiny config (the real one: 128 tokens); shorter than
# the sentences tests encode, so the sliding-window mask is exercised.
ENCODER_TINY_WINDOW = 8

# Learned positions counted from ``pad_token_id + 1`` (RoBERTa, XLM-RoBERTa, MPNet): a model with 514
# position rows takes 512 tokens.
PADDING_OFFSET = "learned-padding-offset"


def encoder_max_positions(positions: str, max_position_embeddings: int | None, pad_token_id: int | None) -> int | None:
    """The longest input (in tokens) an encoder's position table allows."""
    if not max_position_embeddings:
        return None
    if positions == PADDING_OFFSET:
        return int(max_position_embeddings) - int(pad_token_id or 0) - 1
    return int(max_position_embeddings)


_BERT_FUSIONS = ("LayerNormalization", "SkipLayerNormalization", "Gelu", "Attention")

_BERT_LIKE = ArchSpec(
    name="", model_types=(), kind=ModelKind.ENCODER, positions="learned", norm="layernorm",
    activation="gelu-erf", attention="mha", expected_fusions=_BERT_FUSIONS, tiny_reference="",
    tiny_config={}, default_max_context=512,
)


@register
def _bert() -> ArchSpec:
    return dataclasses.replace(
        _BERT_LIKE, name="bert", model_types=("bert",),
        tiny_reference="sentence-transformers/all-MiniLM-L6-v2 (post-norm BERT, erf GELU)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=128, type_vocab_size=2,
            hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
        ),
    )


# RoBERTa-shaped checkpoints: one token type (no token_type_ids input), positions counted from
# pad_token_id + 1 over the non-pad tokens (514 position rows for 512 tokens).
_ROBERTA_CONFIG = dict(_SMALL, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                       eos_token_id=2, layer_norm_eps=1e-5, hidden_act="gelu")


@register
def _roberta() -> ArchSpec:
    return dataclasses.replace(
        _BERT_LIKE, name="roberta", model_types=("roberta",), positions=PADDING_OFFSET,
        tiny_reference="FacebookAI/roberta-base, sentence-transformers/all-distilroberta-v1 "
                       "(one token type, padding-offset positions)",
        tiny_config=dict(_ROBERTA_CONFIG),
        notes="positions = pad_token_id + cumsum(input_ids != pad) are computed in the graph from input_ids",
    )


@register
def _xlm_roberta() -> ArchSpec:
    return dataclasses.replace(
        _BERT_LIKE, name="xlm-roberta", model_types=("xlm-roberta",), positions=PADDING_OFFSET,
        tiny_reference="intfloat/multilingual-e5-small, BAAI/bge-m3 (RoBERTa block, 250k vocabulary)",
        tiny_config=dict(_ROBERTA_CONFIG),
        notes="the RoBERTa block; bge-m3's dense vector is CLS pooling + normalize",
    )


@register
def _distilbert() -> ArchSpec:
    return dataclasses.replace(
        _BERT_LIKE, name="distilbert", model_types=("distilbert",),
        tiny_reference="distilbert/distilbert-base-uncased, sentence-transformers/msmarco-distilbert-base-v4 "
                       "(no token types, no pooler)",
        tiny_config=dict(vocab_size=_TINY_VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                         max_position_embeddings=128, activation="gelu", pad_token_id=0),
    )


@register
def _mpnet() -> ArchSpec:
    return dataclasses.replace(
        _BERT_LIKE, name="mpnet", model_types=("mpnet",), positions=PADDING_OFFSET,
        tiny_reference="sentence-transformers/all-mpnet-base-v2 (relative position bias, padding-offset positions)",
        tiny_config=dict(_SMALL, max_position_embeddings=130, relative_attention_num_buckets=32, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, hidden_act="gelu"),
        notes="the relative position bias (one [batch, heads, seq, seq] tensor shared by all layers) and the "
              "padding mask are added to the scores one after the other; passes.rule_encoder sums them first, "
              "so Attention takes them as one attention_bias (int8: MultiHeadAttention after an int8 projection)",
    )


@register
def _deberta_v2() -> ArchSpec:
    return dataclasses.replace(
        _BERT_LIKE, name="deberta-v2", model_types=("deberta-v2",), positions="relative",
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "Gelu"),
        tiny_reference="microsoft/deberta-v3-base, mixedbread-ai/mxbai-rerank-base-v1 (disentangled attention: "
                       "content-to-position and position-to-content with log-bucketed relative positions)",
        tiny_config=dict(_SMALL, max_position_embeddings=128, type_vocab_size=0, relative_attention=True,
                         position_buckets=32, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                         norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
                         layer_norm_eps=1e-7, hidden_act="gelu", pad_token_id=0),
        notes="no attention fusion: the scores add content-to-position and position-to-content terms gathered "
              "from a relative-position table (Gather along the key axis by a [seq, seq] index), which none of "
              "onnxruntime's Attention / MultiHeadAttention kernels computes; LayerNorm and GELU fuse",
    )


@register
def _electra() -> ArchSpec:
    return dataclasses.replace(
        _BERT_LIKE, name="electra", model_types=("electra",),
        tiny_reference="google/electra-base-discriminator, cross-encoder/ms-marco-electra-base "
                       "(BERT block, embeddings projected from embedding_size)",
        tiny_config=dict(_SMALL, embedding_size=32, type_vocab_size=2, hidden_act="gelu", pad_token_id=0),
    )


@register
def _modernbert() -> ArchSpec:
    return dataclasses.replace(
        _BERT_LIKE, name="modernbert", model_types=("modernbert",), positions="rotary",
        activation="gelu-glu", default_max_context=8192,
        features=(Feature.ALTERNATING_WINDOW, Feature.PACKED_QKV, Feature.PACKED_GATE_UP),
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "Gelu", "MultiHeadAttention"),
        tiny_reference="answerdotai/ModernBERT-base, Alibaba-NLP/gte-modernbert-base, nomic-ai/modernbert-embed-base "
                       "(rotary 1.6e5 global / 1e4 local, a global layer every third, 128-token local window, "
                       "GLU MLP, packed Wqkv, bias-free LayerNorm)",
        tiny_config=dict(_SMALL, num_hidden_layers=3, intermediate_size=96, max_position_embeddings=256,
                         global_attn_every_n_layers=3, local_attention=ENCODER_TINY_WINDOW,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
        notes="runs padded (transformers' eager path: the local window is a mask, no unpadding); the bias-free "
              "LayerNorm fuses through passes.rule_encoder",
    )


# Fusions onnxruntime has for a block like the family's that cannot fire on it, and why. The fusion
# report prints them beside the expected ones, so a user reads "cannot", not "missed".
NOT_FUSABLE: dict[str, dict[str, str]] = {
    "deberta-v2": {
        "Attention": "disentangled attention adds content-to-position and position-to-content scores gathered "
                     "from a relative-position table by a [seq, seq] index; no onnxruntime attention kernel "
                     "computes them",
        "MultiHeadAttention": "the same disentangled scores: they are not an additive bias known before q·kᵀ",
    },
    "modernbert": {
        "RotaryEmbedding": "ModernBERT computes its positions inside the model (arange over the sequence), so "
                           "the graph has no position_ids [batch, seq] for onnxscript's cos/sin-cache rule; "
                           "the rotary stays as Mul/Add/Slice ops inside the fused attention's inputs",
    },
}

ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "deberta-v2", "electra", "modernbert")
