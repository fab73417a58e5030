"""Full-size model shapes for ``random:<shape>`` sources: real configs, random weights.

Random weights of a real shape run at real speed, so benchmarks on machines without the
checkpoint (the lent GPU has no hub) still measure what users will see. Data only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SHAPES"]

# name -> (spec name, config overrides). Values copied from the public config.json of each model.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": ("llama", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )),
    # meta-llama/Llama-3.2-1B (its llama3 rope scaling changes only the rotary frequencies, not
    # the cost, and is left out)
    "llama-3.2-1b": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=128000, eos_token_id=128001, pad_token_id=128001,
    )),
    # Qwen/Qwen3-0.6B (q/k RMSNorm, head_dim 128 with hidden 1024)
    "qwen3-0.6b": ("qwen3", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )),
    # microsoft/Phi-3-mini-4k-instruct (packed qkv_proj and gate_up_proj, 32 KV heads, sliding
    # window 2047)
    "phi-3-mini": ("phi3", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=2047,
        tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    )),
    # google/gemma-3-1b-it (q/k norm, 5 local layers of window 512 to 1 global, head_dim 256, one KV
    # head; its rotary bases, 1e4 local and 1e6 global, are the config class's defaults)
    "gemma-3-1b": ("gemma3_text", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
        rms_norm_eps=1e-6, sliding_window=512, query_pre_attn_scalar=256, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )),
}
