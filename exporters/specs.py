"""Architecture specs: one data-only record per supported architecture, registered by decorator.

A spec says what the exporter and the passes need to know about a family — which Hugging Face
``model_type`` values it covers, whether it is a decoder or an encoder, its positional scheme,
norm, activation and attention layout (the passes use these to decide which fusions to expect),
and a *tiny* configuration: the real architecture's config with the sizes shrunk, used by
``tiny:<name>`` sources for fast tests.

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
    "ArchSpec",
    "Dims",
    "register",
    "get_spec",
    "spec_for_model_type",
    "all_specs",
    "canonical_dims",
]


class ModelKind(str, enum.Enum):
    DECODER = "decoder"
    ENCODER = "encoder"


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


def _supported() -> str:
    return ", ".join(sorted({t for s in _REGISTRY.values() for t in s.model_types}))


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


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The spec covering a Hugging Face ``config.model_type``; refuses unsupported ones."""
    for spec in _REGISTRY.values():
        if model_type in spec.model_types:
            return spec
    raise ExportError(
        f"unsupported architecture {model_type!r}",
        expected="one of " + _supported(),
        fix="lmforge exports only these families; open an issue to add one",
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
# The specs. Tiny configs keep each family's real hyper-parameters (rope theta, eps, activation,
# tying, GQA ratio) and shrink only sizes, so the exported graph has the real shape of ops.

_TINY_VOCAB = 320  # the byte-level test tokenizer's vocabulary (256 bytes + specials, padded)


@register
def _llama() -> ArchSpec:
    return ArchSpec(
        name="llama",
        model_types=("llama",),
        kind=ModelKind.DECODER,
        positions="rotary",
        norm="rmsnorm",
        activation="silu-gate",
        attention="gqa",
        expected_fusions=("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention"),
        tiny_reference="HuggingFaceTB/SmolLM2-135M-Instruct (rope 1e5, tied embeddings, 3:1 GQA)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
        default_max_context=8192,
        notes="SmolLM2, Llama 2/3 and derivatives",
    )


@register
def _mistral() -> ArchSpec:
    return ArchSpec(
        name="mistral",
        model_types=("mistral",),
        kind=ModelKind.DECODER,
        positions="rotary",
        norm="rmsnorm",
        activation="silu-gate",
        attention="gqa",
        expected_fusions=("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention"),
        tiny_reference="mistralai/Mistral-7B-v0.1 (rope 1e4, untied, 4:1 GQA, no sliding window)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, sliding_window=None,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
        default_max_context=4096,
    )


@register
def _qwen2() -> ArchSpec:
    return ArchSpec(
        name="qwen2",
        model_types=("qwen2",),
        kind=ModelKind.DECODER,
        positions="rotary",
        norm="rmsnorm",
        activation="silu-gate",
        attention="gqa",
        expected_fusions=("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention"),
        tiny_reference="Qwen/Qwen2.5-0.5B (QKV bias, rope 1e6, tied, 7:1 GQA)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=112, intermediate_size=288, num_hidden_layers=2,
            num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=512,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
        default_max_context=32768,
    )


@register
def _gpt2() -> ArchSpec:
    return ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        kind=ModelKind.DECODER,
        positions="learned",
        norm="layernorm",
        activation="gelu-tanh",
        attention="mha",
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "FastGelu", "MultiHeadAttention"),
        tiny_reference="openai-community/gpt2 (Conv1D, gelu_new, learned positions)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
            activation_function="gelu_new", layer_norm_epsilon=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
        default_max_context=1024,
    )


@register
def _bloom() -> ArchSpec:
    return ArchSpec(
        name="bloom",
        model_types=("bloom",),
        kind=ModelKind.DECODER,
        positions="alibi",
        norm="layernorm",
        activation="gelu-tanh",
        attention="mha",
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "FastGelu", "MultiHeadAttention"),
        tiny_reference="bigscience/bloom-560m (ALiBi, fused QKV, embedding LayerNorm)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=64, n_layer=2, n_head=4,
            layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
        default_max_context=2048,
        notes="ALiBi: no position_ids input; positions come from the attention mask",
    )


@register
def _bert() -> ArchSpec:
    return ArchSpec(
        name="bert",
        model_types=("bert",),
        kind=ModelKind.ENCODER,
        positions="learned",
        norm="layernorm",
        activation="gelu-erf",
        attention="mha",
        expected_fusions=("LayerNormalization", "SkipLayerNormalization", "Gelu", "Attention"),
        tiny_reference="sentence-transformers/all-MiniLM-L6-v2 (post-norm BERT, erf GELU)",
        tiny_config=dict(
            vocab_size=_TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=128, type_vocab_size=2,
            hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
        ),
        default_max_context=512,
    )
