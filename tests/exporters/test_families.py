"""What the family table does not gate: a default Mistral config, a family without a tuned spec,
and the refusals of what cannot work (encoder-decoder, multimodal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from exporters.convert import convert
from exporters.sources import tiny_tokenizer
from runtime.artifact import load_artifact
from runtime.engine import Engine
from runtime.errors import ExportError

_SIZES = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _hf_folder(tmp_path: Path, model_type: str, **overrides: Any) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of a seeded random model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**_SIZES, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    tiny_tokenizer(320).save_pretrained(folder)
    return folder


def _greedy_matches_transformers(folder: Path, artifact: Path, prompt_len: int) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    prompt = torch.randint(3, 300, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    engine = Engine.load(artifact, "cpu")
    try:
        assert engine.generate_ids([prompt[0].tolist()], max_new_tokens=8)[0] == ref[0, prompt_len:].tolist()
    finally:
        engine.close()


def test_default_mistral_converts_with_its_4096_window(tmp_path: Path) -> None:
    """MistralConfig() keeps Mistral-7B-v0.1's sliding_window=4096; torch.export used to stop on a
    guard of the sliding cache (past <= 4095). The window is recorded, and honoured by the mask."""
    folder = _hf_folder(tmp_path, "mistral")
    out = convert(str(folder), tmp_path / "art", progress=False)
    arch = load_artifact(out).architecture
    assert arch["sliding_window"] == 4096 and arch["name"] == "mistral" and arch["tuned"] is True
    _greedy_matches_transformers(folder, out, 20)


def test_a_family_without_a_spec_converts_through_the_generic_path(tmp_path: Path) -> None:
    """SmolLM3 (no-rope layers every fourth layer) has no tuned spec: it converts, is recorded as
    untuned, and generates transformers' greedy ids."""
    folder = _hf_folder(tmp_path, "smollm3", num_hidden_layers=4)
    out = convert(str(folder), tmp_path / "art", progress=False)
    arch = load_artifact(out).architecture
    assert arch["name"] == "smollm3" and arch["tuned"] is False and arch["layers"] == 4
    _greedy_matches_transformers(folder, out, 12)


@pytest.mark.parametrize("model_type,reason", [("t5", "encoder-decoder"), ("llava", "multimodal")])
def test_what_cannot_work_is_refused_before_loading_weights(tmp_path: Path, model_type: str, reason: str) -> None:
    from transformers import AutoConfig

    folder = tmp_path / model_type
    AutoConfig.for_model(model_type).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not read")  # refused from the config alone
    with pytest.raises(ExportError, match=reason) as info:
        convert(str(folder), tmp_path / "art", progress=False)
    assert "fix" in str(info.value) or "|" in str(info.value)
    assert not (tmp_path / "art").exists()
