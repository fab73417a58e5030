"""Architecture specs: one data-only record per *tuned* architecture family, registered by decorator.

A spec says what the exporter and the passes know about a family — which Hugging Face
``model_type`` values it covers, whether it is a decoder or an encoder, its positional scheme,
norm, activation and attention layout, what it carries beyond a Llama block (:class:`Feature`:
sliding windows, q/k norms, soft-capping, MoE …), the fusions ``optimize`` should produce for it,
and a *tiny* configuration: the real architecture's config with the sizes shrunk, used by
``tiny:<name>`` sources for fast tests.

The table is not a gate. A decoder whose ``model_type`` is not listed still converts through
:func:`generic_spec` — transformers' own model code traced by ``torch.export`` — and ``optimize``
fuses what its rules match and reports the rest; only what cannot work (encoder-decoder models,
multimodal inputs) is refused, by :func:`spec_for_config`.

Dimensions are read through one function, :func:`canonical_dims`, which uses optimum's normalized
configs (they already know each family's attribute names) and falls back to the plain
``transformers`` attributes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

from runtime.errors import ExportError

__all__ = [
    "ModelKind",
    "Feature",
    "ArchSpec",
    "Dims",
    "register",
    "get_spec",
    "spec_for_model_type",
    "spec_for_config",
    "generic_spec",
    "TINY_WINDOW",
    "all_specs",
    "canonical_dims",
]


class ModelKind(str, enum.Enum):
    DECODER = "decoder"
    ENCODER = "encoder"


class Feature(str, enum.Enum):
    """What a family's block carries beyond Llama's; recorded in the manifest, read by the passes."""

    SLIDING_WINDOW = "sliding-window"  # every layer attends to the last ``sliding_window`` tokens
    ALTERNATING_WINDOW = "alternating-window"  # local and global layers (``layer_types``)
    QK_NORM = "qk-norm"  # RMSNorm/LayerNorm on queries and keys before rotary
    PARTIAL_ROTARY = "partial-rotary"  # rotary on the first part of each head only
    SOFTCAP = "softcap"  # tanh soft-capping of attention scores and final logits
    EMBEDDING_SCALE = "embedding-scale"  # embeddings multiplied by √hidden
    SANDWICH_NORM = "sandwich-norm"  # norms before and after attention and MLP
    POST_NORM = "post-norm"  # norms after attention and MLP only
    PACKED_QKV = "packed-qkv"  # one projection for q, k and v
    PACKED_GATE_UP = "packed-gate-up"  # one projection for the MLP's gate and up
    PARALLEL_RESIDUAL = "parallel-residual"  # attention and MLP read the same input
    MULTI_QUERY = "multi-query"  # one KV head
    MULTIPLIERS = "multipliers"  # scalar multipliers on embeddings, residuals, attention, logits
    MOE = "moe"  # routed experts


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What lmforge knows about one architecture family. Data only."""

    name: str
    model_types: tuple[str, ...]
    kind: ModelKind
    positions: str  # "rotary" | "learned" | "alibi"
    norm: str  # "rmsnorm" | "layernorm"
    activation: str  # "silu-gate" | "gelu-tanh" | "gelu-erf"
    attention: str  # "gqa" | "mha"
    # Fusions the passes should produce for this family, by contrib op name.
    expected_fusions: tuple[str, ...]
    # The real config the tiny model is derived from, and the overrides that shrink it.
    tiny_reference: str
    tiny_config: dict[str, Any]
    default_max_context: int = 2048
    features: tuple[Feature, ...] = ()
    tuned: bool = True  # False: built by generic_spec for a model_type this table does not list
    notes: str = ""


@dataclasses.dataclass(frozen=True)
class Dims:
    """Canonical dimensions of a model, whatever its config calls them."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_positions: int | None


_REGISTRY: dict[str, ArchSpec] = {}


def register(fn: Callable[[], ArchSpec]) -> Callable[[], ArchSpec]:
    """Decorator: register the spec a function returns, keyed by its name and model types."""
    spec = fn()
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return fn


def all_specs() -> list[ArchSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: s.name)



def get_spec(name: str) -> ArchSpec:
    """The spec registered under ``name`` (as used by ``tiny:<name>``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ExportError(
            f"unknown architecture {name!r}",
            expected="one of " + ", ".join(sorted(_REGISTRY)),
            fix="pick a supported architecture",
        ) from None


def spec_for_model_type(model_type: str) -> ArchSpec | None:
    """The tuned spec covering a Hugging Face ``config.model_type``, or ``None``."""
    for spec in _REGISTRY.values():
        if model_type in spec.model_types:
            return spec
    return None


def _is_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def spec_for_config(config: Any) -> ArchSpec:
    """The spec a config exports with: its tuned family's, else a generic decoder spec.

    Refuses, before any weight is read, what the decoder contract cannot carry: encoder-decoder
    models (two graphs and cross-attention), models whose config holds a vision or audio part
    (their inputs are not token ids), and model types transformers has no causal-LM class for.
    """
    model_type = str(getattr(config, "model_type", "") or "")
    spec = spec_for_model_type(model_type)
    if spec is not None:
        return spec
    if getattr(config, "is_encoder_decoder", False):
        raise ExportError(
            f"{model_type!r} is an encoder-decoder model",
            expected="a decoder-only causal LM (or an encoder: " + _encoders() + ")",
            fix="lmforge's decoder contract is one graph with a KV cache; export encoder-decoder models "
                "with optimum's seq2seq exporter",
        )
    composite = [k for k in ("vision_config", "audio_config", "speech_config", "vision_tower") if
                 getattr(config, k, None) is not None]
    if composite:
        raise ExportError(
            f"{model_type!r} is a multimodal model ({', '.join(composite)})",
            expected="a text-only decoder",
            fix="export its text model: pass a folder whose config.json is the text config (e.g. gemma3_text)",
        )
    if not _is_causal_lm(model_type):
        raise ExportError(
            f"transformers has no causal-LM class for model type {model_type!r}",
            expected="a decoder (AutoModelForCausalLM) or one of the encoders: " + _encoders(),
            fix="check config.json's model_type; models with remote code cannot be loaded offline",
        )
    return generic_spec(config)


def _encoders() -> str:
    return ", ".join(sorted({t for s in _REGISTRY.values() if s.kind is ModelKind.ENCODER for t in s.model_types}))


def generic_spec(config: Any) -> ArchSpec:
    """A decoder spec for a model type without a tuned entry, read from its config.

    Positions are ALiBi where the config says so, learned where the model has no rotary settings,
    else rotary; no fusions are expected (``optimize`` fuses what its rules match and reports it).
    """
    model_type = str(config.model_type)
    if getattr(config, "alibi", False) or model_type in ("bloom", "mpt"):
        positions = "alibi"
    elif getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None):
        positions = "rotary"
    else:
        positions = "learned"
    features: list[Feature] = []
    if getattr(config, "sliding_window", None):
        features.append(Feature.SLIDING_WINDOW)
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        features.append(Feature.MOE)
    return ArchSpec(
        name=model_type, model_types=(model_type,), kind=ModelKind.DECODER, positions=positions,
        norm="unknown", activation="unknown", attention="unknown", expected_fusions=(),
        tiny_reference="", tiny_config={}, default_max_context=4096, features=tuple(features), tuned=False,
        notes="generic: transformers' model code traced by torch.export; no tuned fusions",
    )


def canonical_dims(config: Any) -> Dims:
    """Read layers, heads, kv heads, head dim, hidden size, vocab and max positions of a config."""
    from optimum.utils import NormalizedConfigManager

    try:
        normalized = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
        layers = int(normalized.num_layers)
        heads = int(normalized.num_attention_heads)
        hidden = int(normalized.hidden_size)
        vocab = int(normalized.vocab_size)
    except (KeyError, AttributeError, NotImplementedError):
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
        vocab = int(config.vocab_size)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return Dims(
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=hidden,
        vocab=vocab,
        max_positions=int(max_positions) if max_positions else None,
    )


# ------------------------------------------------------------------------------------------------
# The specs. A family is a base plus a few lines (``dataclasses.replace``). Tiny configs are the
# family's real config class with its defaults left on — sliding windows, soft-capping, q/k norms,
# partial rotary, MoE routing — and only the sizes shrunk (2 layers, hidden 64), so the exported
# graph has the real shape of ops. Where a real option only shows past a long context (a 4,096
# sliding window), the tiny config shrinks that length too, so tests at short contexts exercise it.

_TINY_VOCAB = 320  # the byte-level test tokenizer's vocabulary (256 bytes + specials, padded)
_IDS = dict(vocab_size=_TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
# The common shrink for Llama-like configs: 4 heads of 16, 2 KV heads, 2 layers.
_SMALL = dict(_IDS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
TINY_WINDOW = 16  # the sliding window of tiny configs whose family has one (the real ones: 4,096)

_RMS_FUSIONS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention")
_GEMMA_FUSIONS = (*_RMS_FUSIONS, "FastGelu")
_LN_GELU_FUSIONS = ("LayerNormalization", "SkipLayerNormalization", "FastGelu", "MultiHeadAttention")

# Llama-shaped: rotary, RMSNorm, SiLU-gated MLP, grouped-query attention.
_LLAMA_LIKE = ArchSpec(
    name="", model_types=(), kind=ModelKind.DECODER, positions="rotary", norm="rmsnorm",
    activation="silu-gate", attention="gqa", expected_fusions=_RMS_FUSIONS, tiny_reference="",
    tiny_config={}, default_max_context=4096,
)
# GPT-shaped: LayerNorm, GELU MLP, multi-head attention.
_GPT_LIKE = dataclasses.replace(
    _LLAMA_LIKE, positions="learned", norm="layernorm", activation="gelu-tanh", attention="mha",
    expected_fusions=_LN_GELU_FUSIONS, default_max_context=2048,
)


@register
def _llama() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="llama", model_types=("llama",), default_max_context=8192,
        tiny_reference="HuggingFaceTB/SmolLM2-135M-Instruct (rope 1e5, tied embeddings, 3:1 GQA)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
        notes="SmolLM2, Llama 2/3 and derivatives",
    )


@register
def _mistral() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="mistral", model_types=("mistral",), features=(Feature.SLIDING_WINDOW,),
        tiny_reference="mistralai/Mistral-7B-v0.1 (rope 1e4, untied, 4:1 GQA, sliding window)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, sliding_window=TINY_WINDOW,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
    )


@register
def _qwen2() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="qwen2", model_types=("qwen2",), default_max_context=32768,
        tiny_reference="Qwen/Qwen2.5-0.5B (QKV bias, rope 1e6, tied, 7:1 GQA)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=112, intermediate_size=288, num_hidden_layers=2,
            num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=512,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
    )


@register
def _qwen3() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="qwen3", model_types=("qwen3",), features=(Feature.QK_NORM,),
        default_max_context=32768, tiny_reference="Qwen/Qwen3-0.6B (q/k RMSNorm, explicit head_dim)",
        tiny_config=dict(_SMALL, head_dim=16, tie_word_embeddings=True),
    )


@register
def _qwen2_moe() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="qwen2_moe", model_types=("qwen2_moe",), features=(Feature.MOE,),
        default_max_context=32768, tiny_reference="Qwen/Qwen1.5-MoE-A2.7B (routed + shared experts)",
        tiny_config=dict(_SMALL, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                         num_experts_per_tok=2),
    )


@register
def _qwen3_moe() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="qwen3_moe", model_types=("qwen3_moe",), features=(Feature.MOE, Feature.QK_NORM),
        default_max_context=32768, tiny_reference="Qwen/Qwen3-30B-A3B (128 experts, top-8, q/k norm)",
        tiny_config=dict(_SMALL, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    )


@register
def _mixtral() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="mixtral", model_types=("mixtral",), features=(Feature.MOE,),
        tiny_reference="mistralai/Mixtral-8x7B-v0.1 (8 experts, top-2)",
        tiny_config=dict(_SMALL, num_local_experts=4, num_experts_per_tok=2),
    )


@register
def _phi3() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="phi3", model_types=("phi3",),
        features=(Feature.PACKED_QKV, Feature.PACKED_GATE_UP, Feature.PARTIAL_ROTARY),
        tiny_reference="microsoft/Phi-4-mini-instruct (packed qkv and gate/up, 3/4 rotary of 64-wide heads)",
        tiny_config=dict(_SMALL, hidden_size=256, intermediate_size=256,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75)),
    )


@register
def _granite() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="granite", model_types=("granite",), features=(Feature.MULTIPLIERS,),
        tiny_reference="ibm-granite/granite-3.3-2b (embedding, residual, attention and logit multipliers)",
        tiny_config=dict(_SMALL, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                         logits_scaling=8.0),
    )


@register
def _olmo2() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="olmo2", model_types=("olmo2",), features=(Feature.QK_NORM, Feature.POST_NORM),
        tiny_reference="allenai/OLMo-2-0425-1B (norms after attention and MLP, q/k norm over all heads)",
        tiny_config=dict(_SMALL),
    )


@register
def _gemma() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="gemma", model_types=("gemma",), activation="gelu-tanh-gate",
        expected_fusions=_GEMMA_FUSIONS,
        features=(Feature.EMBEDDING_SCALE,), default_max_context=8192,
        tiny_reference="google/gemma-2b ((1 + w) RMSNorm, √hidden embedding scale, GELU-tanh gate)",
        tiny_config=dict(_SMALL, head_dim=16),
    )


@register
def _gemma2() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="gemma2", model_types=("gemma2",), activation="gelu-tanh-gate",
        expected_fusions=_GEMMA_FUSIONS,
        features=(Feature.EMBEDDING_SCALE, Feature.SOFTCAP, Feature.ALTERNATING_WINDOW, Feature.SANDWICH_NORM),
        default_max_context=8192,
        tiny_reference="google/gemma-2-2b (soft-capping 50/30, local/global layers, query_pre_attn_scalar)",
        tiny_config=dict(_SMALL, head_dim=16, query_pre_attn_scalar=24, sliding_window=TINY_WINDOW),
    )


@register
def _gemma3_text() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="gemma3_text", model_types=("gemma3_text",), activation="gelu-tanh-gate",
        expected_fusions=_GEMMA_FUSIONS,
        features=(Feature.EMBEDDING_SCALE, Feature.QK_NORM, Feature.ALTERNATING_WINDOW, Feature.SANDWICH_NORM),
        default_max_context=8192,
        tiny_reference="google/gemma-3-1b-it (q/k norm, local layers at rope 1e4, global at 1e6)",
        tiny_config=dict(_SMALL, head_dim=16, query_pre_attn_scalar=24, sliding_window=TINY_WINDOW,
                         layer_types=["sliding_attention", "full_attention"]),
    )


@register
def _starcoder2() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="starcoder2", model_types=("starcoder2",), norm="layernorm", activation="gelu-tanh",
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "FastGelu", "GroupQueryAttention"),
        tiny_reference="bigcode/starcoder2-3b (LayerNorm with bias, GELU MLP, GQA)",
        tiny_config=dict(_SMALL),
    )


@register
def _cohere() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="cohere", model_types=("cohere",), norm="layernorm",
        features=(Feature.PARALLEL_RESIDUAL,), expected_fusions=("SimplifiedLayerNormalization", "GroupQueryAttention"),
        tiny_reference="CohereForAI/c4ai-command-r-v01 (bias-free LayerNorm, parallel block, logit scale)",
        tiny_config=dict(_SMALL),
    )


@register
def _stablelm() -> ArchSpec:
    return dataclasses.replace(
        _LLAMA_LIKE, name="stablelm", model_types=("stablelm",), norm="layernorm",
        features=(Feature.PARTIAL_ROTARY,),
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "GroupQueryAttention"),
        tiny_reference="stabilityai/stablelm-2-1_6b (LayerNorm, 1/4 rotary of 64-wide heads)",
        tiny_config=dict(_SMALL, hidden_size=256, intermediate_size=256),
    )


@register
def _phi() -> ArchSpec:
    return dataclasses.replace(
        _GPT_LIKE, name="phi", model_types=("phi",), positions="rotary",
        features=(Feature.PARTIAL_ROTARY, Feature.PARALLEL_RESIDUAL),
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "FastGelu", "MultiHeadAttention"),
        tiny_reference="microsoft/phi-2 (parallel attention + MLP, 1/2 rotary, gelu_new)",
        tiny_config=dict(_SMALL, num_key_value_heads=4),
    )


@register
def _gpt_neox() -> ArchSpec:
    return dataclasses.replace(
        _GPT_LIKE, name="gpt_neox", model_types=("gpt_neox",), positions="rotary", activation="gelu-erf",
        features=(Feature.PARTIAL_ROTARY, Feature.PARALLEL_RESIDUAL, Feature.PACKED_QKV),
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "BiasGelu", "MultiHeadAttention"),
        tiny_reference="EleutherAI/pythia-160m (packed QKV, 1/4 rotary, parallel residual)",
        tiny_config=dict(_IDS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512),
    )


@register
def _falcon() -> ArchSpec:
    return dataclasses.replace(
        _GPT_LIKE, name="falcon", model_types=("falcon",), positions="rotary", activation="gelu-erf",
        features=(Feature.MULTI_QUERY, Feature.PARALLEL_RESIDUAL, Feature.PACKED_QKV),
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "Gelu", "MultiHeadAttention"),
        tiny_reference="tiiuae/falcon-7b (multi-query, parallel attention, one LayerNorm a block)",
        tiny_config=dict(_IDS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                         max_position_embeddings=512),
    )


@register
def _gpt2() -> ArchSpec:
    return dataclasses.replace(
        _GPT_LIKE, name="gpt2", model_types=("gpt2",), default_max_context=1024,
        tiny_reference="openai-community/gpt2 (Conv1D, gelu_new, learned positions)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
            activation_function="gelu_new", layer_norm_epsilon=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
    )


@register
def _gpt_bigcode() -> ArchSpec:
    return dataclasses.replace(
        _GPT_LIKE, name="gpt_bigcode", model_types=("gpt_bigcode",), features=(Feature.MULTI_QUERY,),
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "FastGelu", "MultiHeadAttention"),
        tiny_reference="bigcode/gpt_bigcode-santacoder (multi-query, learned positions)",
        tiny_config=dict(_IDS, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    )


@register
def _opt() -> ArchSpec:
    return dataclasses.replace(
        _GPT_LIKE, name="opt", model_types=("opt",), activation="relu",
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "MultiHeadAttention"),
        tiny_reference="facebook/opt-125m (learned positions offset by 2, ReLU)",
        tiny_config=dict(_IDS, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256),
    )


@register
def _bloom() -> ArchSpec:
    return dataclasses.replace(
        _GPT_LIKE, name="bloom", model_types=("bloom",), positions="alibi", features=(Feature.PACKED_QKV,),
        tiny_reference="bigscience/bloom-560m (ALiBi, fused QKV, embedding LayerNorm)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=64, n_layer=2, n_head=4,
            layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
        notes="ALiBi: no position_ids input; positions come from the attention mask",
    )


# The encoder families (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, MPNet, DeBERTa-v2, ELECTRA, ModernBERT)
# live in their own module, registered into this table.
from exporters import encoder_specs  # noqa: E402,F401
