"""Tiny GGUF files of real architectures, written from seeded random transformers models.

No GGUF file of Qwen, Gemma, Phi-3 or Mistral exists offline, so the tests write one: the
``tiny:<family>`` model of :mod:`exporters.specs` (its real config class, shrunk sizes), saved the
way llama.cpp's ``convert_hf_to_gguf.py`` saves that family — tensor names from
``gguf.get_tensor_name_map``, the metadata keys llama.cpp writes, the forward transforms it applies
(Llama's rotary q/k row permutation, Gemma's ``1 + w`` norm weights), fp32 tensors — and a
byte-level ``gpt2`` vocabulary taken from the tiny model's tokenizer. Loading the file back must
then give the model it was written from, exactly (fp32 round trip).

Where the GGUF format cannot say what the tiny spec sets (Gemma's ``query_pre_attn_scalar``, which
llama.cpp takes as the head size; Gemma 3's layer pattern, which llama.cpp fixes at five local
layers to one global), :data:`GGUF_OVERRIDES` builds the source model with the value a GGUF
implies, so that the file and the model describe the same network.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.sources import TINY_SEED, tiny_tokenizer
from exporters.specs import get_spec

__all__ = ["GgufFixture", "GGUF_ARCH", "GGUF_OVERRIDES", "DEFAULT", "tiny_model", "write_gguf", "tiny_gguf"]

# spec name -> llama.cpp's ``general.architecture`` (Mistral is written as Llama, as llama.cpp does)
GGUF_ARCH: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
    "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma": "gemma", "starcoder2": "starcoder2",
    "stablelm": "stablelm", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
}

# What a GGUF file can carry, where the tiny spec sets something else (see the module docstring).
DEFAULT = object()  # an override meaning "the config class's own default"
GGUF_OVERRIDES: dict[str, dict[str, Any]] = {
    # Mistral 7B v0.2 and later have no window; llama.cpp writes Mistral as Llama, without one.
    "mistral": {"sliding_window": None},
    "gemma2": {"query_pre_attn_scalar": 16},  # = head_dim: llama.cpp scales queries by 1/sqrt(head_dim)
    # llama.cpp fixes Gemma 3's pattern (five local layers, then a global one): six layers show it.
    "gemma3_text": {"query_pre_attn_scalar": 16, "layer_types": DEFAULT, "num_hidden_layers": 6},
    # llama.cpp normalizes Qwen3-MoE's top-k routing weights (as Qwen3-30B-A3B's config says)
    "qwen3_moe": {"norm_topk_prob": True},
}


@dataclasses.dataclass(frozen=True)
class GgufFixture:
    path: Path
    model: Any  # the transformers model the file was written from (eval, fp32)
    tokenizer: Any


def tiny_model(family: str, **overrides: Any) -> Any:
    """The ``tiny:<family>`` model as ``exporters.sources`` builds it (same seed and weight scale)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = get_spec(family)
    values = {**spec.tiny_config, **GGUF_OVERRIDES.get(family, {}), **overrides}
    config = AutoConfig.for_model(spec.model_types[0], **{k: v for k, v in values.items() if v is not DEFAULT})
    torch.manual_seed(TINY_SEED)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().float()
    with torch.no_grad():  # the same scaling as tiny: sources, so greedy choices are clear
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(2.0)
    return model


def _llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rotary halves interleaved, which transformers undoes."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama3_rope_freqs(config: Any) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` for a ``llama3`` rope scaling: one divisor per rotary frequency,
    computed as its converter does (``LlamaModel.generate_extra_tensors``)."""
    import math

    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type") != "llama3":
        return None
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write_vocab(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE vocabulary (``tokenizer.ggml.model = gpt2``), padded to the model's size."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    specials = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")  # llama.cpp's name for ids the tokenizer does not use
        tokens.append(token)
        types.append(gguf.TokenType.CONTROL if token in specials else
                     gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # The byte tokenizer has no merges, and an empty array is not written; transformers then derives
    # merges from the scores (none, as the tiny tokenizer has).
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _write_hparams(writer: Any, arch: str, config: Any, name: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    if hasattr(config, "rms_norm_eps"):
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    else:  # LayerNorm families (StarCoder2, StableLM)
        writer.add_layer_norm_eps(getattr(config, "norm_epsilon", None) or config.layer_norm_eps)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in rope:  # per layer type (Gemma 3): the global layers' base is the file's
        rope = rope["full_attention"]
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    rotary = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_dimension_count(rotary)
    if getattr(config, "head_dim", None):  # llama.cpp writes these wherever the config states head_dim
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    full_rope = (getattr(config, "rope_parameters", None) or {}).get("full_attention") or {}
    if full_rope.get("rope_type") == "linear":  # Gemma 3 4B+: linear scaling of the global layers
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full_rope["factor"]))
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if getattr(config, "num_experts", None):  # Qwen2/3-MoE
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_file_type(0)  # ALL_F32


def write_gguf(model: Any, tokenizer: Any, path: Path, family: str, name: str | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None, q8_0: bool = False) -> Path:
    """Write ``model`` as llama.cpp would for its family, with fp32 tensors (and ``extra_tensors``,
    written as named: what llama.cpp adds for some checkpoints, such as ``rope_freqs.weight``).
    ``q8_0``: the matrices in llama.cpp's Q8_0 blocks (norms and biases stay fp32, as it keeps them)."""
    import gguf

    arch = GGUF_ARCH[family]
    config = model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    _write_hparams(writer, arch, config, name or f"tiny-{family}")
    _write_vocab(writer, tokenizer, config.vocab_size)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp writes the output projection only when it is not the embedding
        data = tensor.detach().float().numpy().copy()
        if hf_name.endswith("mlp.experts.gate_up_proj"):  # [experts, 2 x ffn, hidden]: llama.cpp splits it
            block = hf_name.split(".")[2]
            gate, up = np.split(data, 2, axis=1)
            writer.add_tensor(f"blk.{block}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
            writer.add_tensor(f"blk.{block}.ffn_up_exps.weight", np.ascontiguousarray(up))
            continue
        if hf_name.endswith("mlp.experts.down_proj"):
            hf_name += ".weight"
        if hf_name.endswith("shared_expert_gate.weight"):
            data = data.reshape(-1)  # llama.cpp stores the [1, hidden] gate as a vector
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"{hf_name} has no GGUF name for {arch}")
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = _llama_permute(data, heads, heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = _llama_permute(data, heads, kv_heads)
        elif arch in ("gemma", "gemma2", "gemma3") and gguf_name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp stores Gemma's (1 + w) RMSNorm weights as 1 + w
        data = np.ascontiguousarray(data, dtype=np.float32)
        if q8_0 and data.ndim == 2 and data.shape[-1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, data)
    rope_freqs = _llama3_rope_freqs(config) if arch == "llama" else None
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for extra_name, data in (extra_tensors or {}).items():
        writer.add_tensor(extra_name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(family: str, folder: Path, name: str | None = None, extra_tensors: dict[str, np.ndarray] | None = None,
              q8_0: bool = False, **overrides: Any) -> GgufFixture:
    """Build the tiny model of ``family`` (config ``overrides`` on top of the tiny spec's) and write it
    to ``folder/tiny-<family>.gguf``."""
    model = tiny_model(family, **overrides)
    tokenizer = tiny_tokenizer(int(model.config.vocab_size))
    folder.mkdir(parents=True, exist_ok=True)
    path = write_gguf(model, tokenizer, folder / f"tiny-{family}.gguf", family, name, extra_tensors, q8_0)
    return GgufFixture(path, model, tokenizer)
